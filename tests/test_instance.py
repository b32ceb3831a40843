"""How `zswapd run` starts and what it trusts (issue #22): only installed
code runs, one instance holds a device for as long as any of its processes
lives, configured paths are resolved once and checked, the config file is
root's alone, and nothing the caller left open reaches a worker.

Privilege: root, /dev/fuse.  Swap stays off: the kills here hit daemons
that hold no process's pages.  Every daemon, mount, directory and stray
worker is cleaned up even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, force_cleanup, kill_instance, run_daemon, write_config
from test_failclosed import wait_for
from test_takeover import worker_pid

from zswapd.config import ConfigError, load
from zswapd.fuse import mount as fmount

pytestmark = pytest.mark.root

MIB = 1 << 20


def zswapd_script() -> str:
    """The installed console script, as a user runs it.  (`python -m zswapd`
    puts the current directory first on sys.path: whoever types that in a
    directory has chosen to run what is there.)"""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(directory, "zswapd")
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("zswapd")
    if found is None:
        pytest.fail("no zswapd console script: `pip install -e .` installs one")
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it holds no fd any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def killed_at_exit(pids: list[int]) -> Iterator[list[int]]:
    """SIGKILL whatever pid the test adds here, if it still lives at the end
    (a worker left on its own, a second instance that should have refused)."""
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), what=f"pid {pid} to exit")  # type: ignore[misc]


def pattern(npages: int) -> bytes:
    """Distinct, compressible pages."""
    return b"".join(((b"page %08d " % i) * 300)[:4096] for i in range(npages))


def write_file(d: Daemon, data: bytes, offset: int = 0) -> None:
    fd = os.open(d.file, os.O_RDWR)
    try:
        for at in range(0, len(data), MIB):
            os.pwrite(fd, data[at : at + MIB], offset + at)
    finally:
        os.close(fd)


def read_file(d: Daemon, size: int, offset: int = 0) -> bytes:
    fd = os.open(d.file, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, min(MIB, size - at), offset + at) for at in range(0, size, MIB))
    finally:
        os.close(fd)


def start_second(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`zswapd run` on a config an instance already serves.  It must refuse
    at once; if it starts instead (the bug), it is stopped here."""
    p = subprocess.Popen([sys.executable, "-m", "zswapd", "run", "--config", str(config)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        pytest.fail(f"a second instance started on the same config instead of refusing:\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# -- only installed code runs ----------------------------------------------------------


def test_a_hostile_package_in_the_start_directory_is_never_imported(tmp_path: Path) -> None:
    """A user's zswapd/ in the directory root starts the daemon from: `zswapd
    run` (the console script), then `zswapd reload` from there too.  Neither
    the supervisor, nor a forked worker, nor the reload's fresh worker may
    import it; the relative --config still names the same file after the
    supervisor has left for /."""
    start = tmp_path / "start"
    (start / "zswapd").mkdir(parents=True)
    mark = tmp_path / "imported"
    for name in ("__init__.py", "__main__.py"):
        (start / "zswapd" / name).write_text(
            f"import os, sys\nwith open({str(mark)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}} {{sys.argv}}\\n')\n"
        )
    script = zswapd_script()
    with run_daemon(tmp_path, command=[script], cwd=start, config_arg="../d.toml") as d:
        old = worker_pid(d)
        r = subprocess.run([script, "reload", "--socket", d.socket], cwd=start, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr + d.logtext()
        new = worker_pid(d)
        assert new != old
        for pid in (d.proc.pid, new):
            assert os.readlink(f"/proc/{pid}/cwd") == "/", pid
        with open(f"/proc/{new}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[1:5] == [b"-I", b"-m", b"zswapd", b"worker"], argv
        data = pattern(256)
        write_file(d, data)
        assert read_file(d, len(data)) == data
        assert d.stats()["reloads"] == 0 and "cannot start" not in d.logtext()
    assert not mark.exists(), f"the hostile package was imported: {mark.read_text()}"


# -- one instance, always --------------------------------------------------------------


def test_reload_then_supervisor_killed_keeps_the_instance_and_every_page(tmp_path: Path) -> None:
    """128 MiB written, `zswapd reload`, the supervisor SIGKILLed: the fresh
    worker serves on, starts a new supervisor and hands it every fd, lock
    included, so a new `zswapd run` refuses, naming that supervisor, and
    touches nothing: every page reads back, and SIGTERM to the new
    supervisor stops it all cleanly."""
    with run_daemon(tmp_path) as d, killed_at_exit([]) as strays:
        data = pattern(32768)
        write_file(d, data)
        assert d.stats()["pages_stored"] == 32768
        r = subprocess.run([sys.executable, "-m", "zswapd", "reload", "--socket", d.socket], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        worker = worker_pid(d)
        strays.append(worker)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        wait_for(lambda: d.stats()["process"]["supervisor_start"] == "adopted", what="a new supervisor")  # type: ignore[index]
        process = d.stats()["process"]
        sup = int(process["supervisor_pid"])  # type: ignore[index]
        strays.append(sup)
        assert process["worker_pid"] == worker and process["supervisor_restarts"] == 1, process  # type: ignore[index]
        with open(f"/proc/{sup}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[1:6] == [b"-I", b"-m", b"zswapd", b"run", b"--adopt"]
        second = start_second(d.config)
        assert second.returncode == 2, second.stderr
        assert f"another zswapd (pid {sup}) already holds" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        s = d.stats()
        assert s["pages_stored"] == 32768 and s["process"]["worker_pid"] == worker  # type: ignore[index]
        assert read_file(d, len(data)) == data
        # Released only by the last close: the files stay where they are.
        assert Path(str(d.mountpoint) + ".lock").exists() and Path(d.socket + ".lock").exists()
        os.kill(sup, signal.SIGTERM)
        wait_for(lambda: gone(sup) and gone(worker), what="the instance to stop")
        log = d.logtext()
        assert "taking over from a supervisor that died" in log and "stopped" in log, log
        assert not fmount.is_mountpoint(str(d.mountpoint)), log


def test_lock_files_are_never_unlinked(tmp_path: Path) -> None:
    """The lock files stay where a stopped instance leaves them and the next
    start locks the same files (an unlink at release would let two racing
    starters each lock a file of its own)."""
    with run_daemon(tmp_path) as d:
        lock = Path(str(d.mountpoint) + ".lock")
        inode = os.stat(lock).st_ino
        assert d.stop() == 0
    assert lock.exists() and os.stat(lock).st_ino == inode
    with run_daemon(tmp_path) as d:
        assert os.stat(lock).st_ino == inode and lock.read_text().strip() == str(d.proc.pid)


# -- paths without surprises -----------------------------------------------------------


@contextlib.contextmanager
def symlinked_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a directory reached through a root-owned symlink, its real path).
    Debian's /var/run -> /run where there is one, as in the issue."""
    name = f"zswapd-test-{os.getpid()}-{tmp_path.name}"
    if os.path.realpath("/var/run") == "/run":
        link, real = Path("/var/run") / name, Path("/run") / name
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        link, real = tmp_path / "link" / name, tmp_path / "real" / name
    try:
        yield link, real
    finally:
        force_cleanup(str(real / "mnt"))
        shutil.rmtree(real, ignore_errors=True)


def test_symlinked_mountpoint_is_recovered_after_both_processes_die(tmp_path: Path) -> None:
    """mountpoint = "/var/run/.../mnt": the daemon mounts at the real path
    and says so; after SIGKILL of the supervisor and the worker, a restart
    recognises the dead mount as its own and cleans it up (it used to say
    "already mounted" and exit)."""
    with symlinked_dir(tmp_path) as (link, real):
        with run_daemon(tmp_path, mountpoint=link / "mnt") as d:
            worker = worker_pid(d)
            kill_instance([d.proc.pid, worker])
            d.proc.wait(30)
            wait_for(lambda: gone(worker), what="the worker to die")
            with run_daemon(tmp_path, mountpoint=link / "mnt") as d2:
                assert "left by an instance that is no longer running" in d2.logtext(), d2.logtext()
                assert d2.stats()["device"]["mountpoint"] == str(real / "mnt")  # type: ignore[index]
                data = pattern(16)
                write_file(d2, data)
                assert read_file(d2, len(data)) == data
                assert d2.stop() == 0, d2.logtext()
            assert "Traceback" not in d2.logtext()


def test_a_non_root_symlink_on_the_way_is_refused(tmp_path: Path) -> None:
    """A symlink its owner could repoint (this machine has
    fs.protected_symlinks = 0): refused at load, naming it."""
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    os.lchown(link, 65534, 65534)
    config = tmp_path / "c.toml"
    write_config(config, link / "mnt", str(tmp_path / "ctl" / "s.sock"))
    with pytest.raises(ConfigError) as e:
        load(str(config), strict=True)
    assert f"{link} is a symlink owned by uid 65534" in str(e.value) and "[device] mountpoint" in str(e.value)
    assert load(str(config)).device.mountpoint == str(link / "mnt")  # clients read it as written


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("root's secret\n")
    os.chmod(victim, 0o600)
    return victim


def _assert_untouched(victim: Path) -> None:
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), (st.st_uid, st.st_gid, st.st_mode)


def _reconfigure(d: Daemon, mode: int, socket: str = "", **control: object) -> None:
    """Rewrite ``d``'s config with these [control] keys, then give it ``mode``."""
    write_config(d.config, d.mountpoint, socket or d.socket, control=control)
    os.chmod(d.config, mode)


def _hup_and_wait(d: Daemon, line: str) -> None:
    before = d.logtext().count(line)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.logtext().count(line) > before, what=f"{line!r} in the log")


def test_socket_symlink_attack_through_a_writable_config(tmp_path: Path) -> None:
    """The issue's attack: a user who can write the config points [control]
    socket at a symlink to a root-only file; root reloads; the user sets
    [control] group; SIGHUP.  Now the file is refused (others may write
    it), and the victim keeps its owner and mode."""
    victim = _victim(tmp_path)
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    os.chown(attacker, 65534, 65534)
    (attacker / "s.sock").symlink_to(victim)
    os.lchown(attacker / "s.sock", 65534, 65534)
    with run_daemon(tmp_path) as d:
        _reconfigure(d, 0o666, socket=str(attacker / "s.sock"))
        reply = d.call("reload")
        assert reply["ok"], reply
        wait_for(lambda: "keeping the old one" in d.logtext(), what="the reload to fail")
        assert "writable by group or others (mode 0666)" in d.logtext() and "chmod go-w" in d.logtext()
        _reconfigure(d, 0o666, socket=str(attacker / "s.sock"), group="nogroup")
        _hup_and_wait(d, "reload failed, keeping the running configuration")
        _assert_untouched(victim)
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        assert d.stats()["ok"] and "Traceback" not in d.logtext()


def test_socket_path_changed_to_a_symlink_chowns_only_the_bound_socket(tmp_path: Path) -> None:
    """A root-only config whose [control] socket now names a symlink (root
    made it; the file is fine): after `zswapd reload` and SIGHUP with a
    group, the socket the worker serves gets the group, the link's target
    nothing, and the log says the new path takes a restart."""
    victim = _victim(tmp_path)
    link = tmp_path / "ctl-link.sock"
    link.symlink_to(victim)
    with run_daemon(tmp_path) as d:
        _reconfigure(d, 0o644, socket=str(link))
        r = subprocess.run([sys.executable, "-m", "zswapd", "reload", "--socket", d.socket], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr + d.logtext()
        _reconfigure(d, 0o644, socket=str(link), group="nogroup")
        _hup_and_wait(d, "reloaded ")
        _assert_untouched(victim)
        st = os.stat(d.socket)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 0o660), st
        log = d.logtext()
        assert "[control] group = 'nogroup'" in log and "[control] socket" in log and "until a restart" in log, log


def test_an_adopted_fuse_connection_is_served_wherever_it_is_mounted(tmp_path: Path) -> None:
    """systemd's fd store hands back /dev/fuse (LISTEN_FDS) while [device]
    mountpoint names another place than the mount (the config changed): the
    connection, and any swap on it, is taken over, not closed.  It used to
    be dropped with every adopted fd, and its pages with it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    fd = fmount.open_fuse()
    closed = False
    try:
        fmount.mount(fd, str(elsewhere))
        as_systemd = f'exec 3<&{fd}; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=fuse; exec "$@"'
        with run_daemon(tmp_path, command=["bash", "-c", as_systemd, "bash", sys.executable, "-m", "zswapd"],
                        pass_fds=(fd,)) as d:  # fmt: skip
            os.close(fd)
            closed = True  # the daemon holds the connection alone now
            assert "holds no zswapd mount" in d.logtext(), d.logtext()
            data = pattern(8)
            path = elsewhere / "swap"
            with open(path, "r+b", buffering=0) as f:
                f.write(data)
                f.seek(0)
                assert f.read(len(data)) == data
            assert d.stop() == 0, d.logtext()
        assert os.path.ismount(d.mountpoint) is False
    finally:
        if not closed:
            os.close(fd)
        force_cleanup(str(elsewhere))


# -- a config only root can change -----------------------------------------------------


def _config_in(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "c.toml"
    write_config(config, directory / "mnt", str(directory / "ctl" / "s.sock"))
    return config


@pytest.mark.parametrize(
    "setup, fragments",
    [
        (lambda c: os.chown(c, 65534, 0), ["owned by uid 65534, not root", "chown root"]),
        (lambda c: os.chmod(c, 0o664), ["writable by group or others (mode 0664)", "chmod go-w"]),
        (lambda c: os.chmod(c.parent, 0o777), ["writable by group or others (mode 0777) and not sticky",
                                               "chmod go-w"]),
        (lambda c: os.chown(c.parent, 65534, 65534), ["owned by uid 65534", "chown root"]),
    ],
)  # fmt: skip
def test_a_config_others_can_change_is_refused(tmp_path: Path, setup: object, fragments: list[str]) -> None:
    config = _config_in(tmp_path / "etc")
    setup(config)  # type: ignore[operator]
    with pytest.raises(ConfigError) as e:
        load(str(config), strict=True)
    assert str(e.value).startswith(f"{config}:"), e.value
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    load(str(config))  # a client may still read it, to find the socket
    r = subprocess.run([sys.executable, "-m", "zswapd", "run", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith(f"zswapd: {config}:") and fragments[0] in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_sticky_root_directories_and_root_symlinks_are_accepted(tmp_path: Path) -> None:
    """/tmp's kind of directory (root's, sticky) lets nobody else rename or
    remove root's entries: accepted as an ancestor, as the tests' own
    tmp_path under /tmp is.  A root-owned symlink to the file is followed."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    config = _config_in(sticky / "etc")
    assert load(str(config), strict=True).device.mountpoint == str(sticky / "etc" / "mnt")
    link = tmp_path / "link.toml"
    link.symlink_to(config)
    assert load(str(link), strict=True).path == str(link)
    os.lchown(link, 65534, 65534)
    with pytest.raises(ConfigError, match="symlink owned by uid 65534"):
        load(str(link), strict=True)


def test_a_failed_chown_is_reported_once_per_reload(tmp_path: Path) -> None:
    """[control] group set after the socket's path was removed (a stand-in
    for a chown that fails): one error per SIGHUP, nothing applied, and the
    reload is not retried behind the operator's back (it used to fail and
    start again, doubling its back-off, for ever)."""
    with run_daemon(tmp_path) as d:
        os.unlink(d.socket)
        _reconfigure(d, 0o644, group="nogroup")
        for n in (1, 2):
            _hup_and_wait(d, "reloaded ")
            assert d.logtext().count("[control] group not applied") == n, d.logtext()
        assert "task reload failed" not in d.logtext() and "Traceback" not in d.logtext()
        assert not os.path.exists(d.socket)


# -- nothing inherited -----------------------------------------------------------------


def _holds(pid: int, link: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                return True
    return False


def test_fds_inherited_from_the_caller_are_closed(tmp_path: Path) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        leaked = [f"pipe:[{os.fstat(w).st_ino}]", f"socket:[{os.fstat(b.fileno()).st_ino}]"]
        with run_daemon(tmp_path, pass_fds=(w, b.fileno())) as d:
            pids = [d.proc.pid, worker_pid(d)]
            for pid in pids:
                for link in leaked:
                    assert not _holds(pid, link), (pid, link)
            assert "inherited from the caller" in d.logtext()
            # Nothing of ours lost with them: a page still goes round.
            data = pattern(4)
            write_file(d, data)
            assert read_file(d, len(data)) == data
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # no process of the daemon held the write end
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        a.close()
        b.close()
