"""Fixtures for tests that run the real daemon.

Privilege: tests marked ``root`` need uid 0, /dev/fuse, loop devices and (for
swap tests) cgroup-v1 memory.  They run in CI as root.  Every fixture undoes
what it did even when the test fails: swapoff, loop detach, FUSE abort and
unmount, cgroup removal, process kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from zswapd import libc, swap
from zswapd.bench import remove_cgroup
from zswapd.control import request
from zswapd.pool import CLASSES
from zswapd.state import State

PUNCH = libc.PUNCH_HOLE
# fallocate(2) with a mode, which Python's os module does not offer.
fallocate = libc.fallocate
INJECT = Path(__file__).with_name("inject.py")


def corrupt_object(state: State, idx: int) -> None:
    """Garble the start of page ``idx``'s compressed object, in the arena."""
    entry = state.view("page")[idx]
    assert entry & 3 == 2, "a compressed page"
    loc = state.view("handle")[entry >> 32]
    z, slot = loc >> 16, loc & 0xFFFF
    offset = slot * CLASSES[state.view("zs_class")[z]].size + 4  # past the slot's header
    frame = state.view("zs_first")[z]
    for _ in range(offset // 4096):  # the zspage's chain of frames
        frame = state.view("frame_next")[frame]
    at = frame * 4096 + offset % 4096
    state.arena()[0][at : at + 8] = b"\xff" * 8


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    # Outside CI a non-root developer still gets the pure tests; CI is root.
    if os.environ.get("CI"):
        raise pytest.UsageError("CI must run the tests as root: the root-marked tests may not be skipped")
    skip = pytest.mark.skip(reason="needs root (FUSE mount, loop devices, swap)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    config: Path
    mountpoint: Path
    socket: str
    log: Path

    @property
    def file(self) -> str:
        return str(self.mountpoint / "swap")

    def call(self, cmd: str, **kw: object) -> dict[str, object]:
        return request(self.socket, {"cmd": cmd, **kw})

    def stats(self) -> dict[str, object]:
        s = self.call("stats")
        assert s["ok"], s
        return s

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def write_config(path: Path, mountpoint: Path, socket: str, **sections: dict[str, object]) -> None:
    base: dict[str, dict[str, object]] = {
        "device": {"size": "256M", "mountpoint": str(mountpoint)},
        "swap": {"enable": False},
        "control": {"socket": socket},
        "compaction": {"background": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)  # whatever the umask: the daemon reads only a file root alone can change


def _fuse_connections_for(mountpoint: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == mountpoint:
                dev = parts[2]  # major:minor; the connection id is the minor
                out.append(dev.split(":")[1])
    return out


def pids_holding(path: str) -> list[int]:
    """Processes with an fd open on ``path`` (the instance lock: every
    process of a daemon, supervisors it adopted included)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), st):
                        found.append(int(pid))
                        break
    return found


def kill_instance(pids: list[int]) -> None:
    """SIGKILL every process of a daemon at once, as a crash of the whole
    instance would: stopped first, so that none sees another die and acts
    (a worker would hand its fds to a new supervisor).  Killed in reverse
    order, supervisor (first) last: its death orphans the worker's process
    group, and the kernel sends SIGCONT to an orphaned group that has a
    stopped member."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def force_cleanup(mountpoint: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Undo whatever a daemon left behind, in the safe order."""
    target = os.path.join(mountpoint, "swap")
    for loop in swap.loops_backed_by(target):
        subprocess.run(["swapoff", loop], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    if proc is not None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    # Supervisors a worker started (and their workers) are no child of ours.
    kill_instance(pids_holding(mountpoint.rstrip("/") + ".lock"))
    for conn in _fuse_connections_for(mountpoint):
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{conn}/abort").write_text("1")
    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


@contextlib.contextmanager
def run_daemon(
    tmp: Path,
    name: str = "d",
    ready: bool = True,
    inject: str = "",
    patch: str = "",
    mountpoint: Path | None = None,
    command: list[str] | None = None,
    cwd: Path | None = None,
    config_arg: str = "",
    pass_fds: tuple[int, ...] = (),
    **sections: dict[str, object],
) -> Iterator[Daemon]:
    """A real daemon on a config made from ``sections``.  ``inject`` names a
    function (``module:Class.attr``) that tests/inject.py replaces with one
    that raises; ``patch`` is Python run before the CLI (to plant a subtler
    bug).  Either proves a bug is contained.  ``command`` starts it instead
    of ``python -m zswapd`` (with ``cwd``, from there; ``config_arg`` is
    what it gets for --config, if not the config's absolute path), and
    ``pass_fds`` are left open for it.  The mountpoint is ``mountpoint``,
    or NAME-mnt in ``tmp``."""
    mountpoint = mountpoint or tmp / f"{name}-mnt"
    sock = str(tmp / f"{name}-ctl" / "control.sock")
    config = tmp / f"{name}.toml"
    write_config(config, mountpoint, sock, **sections)
    log = tmp / f"{name}.log"
    logf = open(log, "wb")
    if patch:
        code = (
            patch + f"\nimport sys\nfrom zswapd.cli import main\nsys.exit(main(['run', '--config', {str(config)!r}]))\n"
        )
        argv = [sys.executable, "-c", code]
    else:
        prefix = [sys.executable, str(INJECT), inject] if inject else [sys.executable, "-m", "zswapd"]
        argv = [*(command or prefix), "run", "--config", config_arg or str(config)]
    proc = subprocess.Popen(argv, stdout=logf, stderr=logf, cwd=cwd, pass_fds=pass_fds)
    d = Daemon(proc, config, mountpoint, sock, log)
    try:
        if ready:
            deadline = time.monotonic() + 60
            while "ready:" not in d.logtext():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start:\n{d.logtext()}")
                time.sleep(0.05)
        yield d
    finally:
        try:
            if proc.poll() is None:
                d.stop()
        except subprocess.TimeoutExpired:
            pass
        finally:
            # The mount is at the real path (the daemon resolves it); the
            # mountpoint itself is not stat'ed: a dead mount cannot be.
            force_cleanup(os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name), proc)
            logf.close()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is root's
    alone): for tests that reach the daemon as a member of [control] group."""
    d = Path(tempfile.mkdtemp(prefix="zswapd-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with run_daemon(tmp_path) as d:
        yield d


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    """A cgroup-v1 memory cgroup (or v2 where that is what the machine has)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        path = v1 / name
        path.mkdir(exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(limit))
    else:
        path = Path("/sys/fs/cgroup") / name
        path.mkdir(exist_ok=True)
        (path / "memory.max").write_text(str(limit))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # a cgroup that stays busy is left, as before
            remove_cgroup(path)


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """The test process adopts orphans; the pids it adds are reaped at the end."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    reap: list[int] = []
    try:
        yield reap
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
        for pid in reap:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
