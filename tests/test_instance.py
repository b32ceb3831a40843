"""How `zswapd run` starts and what it trusts (issue #22): only installed
code runs, one instance holds a device for as long as any of its processes
lives, and nothing the caller left open reaches a worker.

Privilege: root, /dev/fuse.  Swap stays off: the kills here hit daemons
that hold no process's pages.  Every daemon, mount and stray worker is
cleaned up even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, run_daemon
from test_failclosed import wait_for
from test_takeover import worker_pid

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
    worker serves on alone and holds the instance lock, so a new `zswapd
    run` refuses, naming it, and touches nothing: every page reads back."""
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
        assert worker_pid(d) == worker  # on its own, still serving
        second = start_second(d.config)
        assert second.returncode == 2, second.stderr
        assert "its supervisor" in second.stderr and "has exited" in second.stderr, second.stderr
        assert f"pid {worker}" in second.stderr and "refusing" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        s = d.stats()
        assert s["pages_stored"] == 32768 and s["process"]["worker_pid"] == worker  # type: ignore[index]
        assert read_file(d, len(data)) == data
        # Released only by the last close: the files stay where they are.
        assert Path(str(d.mountpoint) + ".lock").exists() and Path(d.socket + ".lock").exists()


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
