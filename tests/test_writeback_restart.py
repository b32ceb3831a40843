"""Written-back pages across every kind of restart outside systemd: `zswapd
reload`, a worker's death, the supervisor's death (the worker hands every
fd, the backing file's included, to the supervisor it starts), and both in
turn.  Each time the backing file is the same file (the same inode, the
same bytes, held by the supervisor that lives now: never re-created or
truncated at adoption), the segment table is what it was, and every page
reads back byte for byte, the backed ones from the file (bd_reads grows).
The restart under systemd is in tests/test_systemd.py.

Also: a backing file that vanished or changed is a clear error, never a
silent loss; a second instance cannot take a backing file in use.

Block I/O on the device, swap off: a kill here costs nobody's pages, so no
test needs to bring other processes' pages home first.

Privilege: root and /dev/fuse.  The backing file lives on the root disk
(/var/tmp), never on tmpfs.  The test process is a child subreaper (as in
tests/test_mutual.py), so adopted supervisors are reaped by it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, kill_instance, pids_holding, run_daemon
from test_failclosed import wait_for
from test_mutual import children, exit_status, pair, zswapd
from test_writeback_daemon import _fill, disk

from zswapd import backing
from zswapd.state import State

pytestmark = pytest.mark.root

__all__ = ["disk"]  # a fixture, used by name

MIB = 1 << 20
PAGES = 2048  # 8 MiB written, about 3.5 MiB compressed: the pool holds it all
BACKED = 1536  # of which `zswapd writeback` moves this many to the file


def config(disk: Path, engine: str = "native") -> dict[str, dict[str, object]]:
    return {
        "pool": {"memory_limit": "16M", "engine": engine},
        "writeback": {"enable": True, "file": str(disk / "backing"), "size": "64M"},
    }


def stat(d: Daemon, key: str) -> int:
    return int(d.stats()[key])  # type: ignore[call-overload]


def segments(pid: int) -> dict[int, tuple[int, int, int]]:
    """The segment table in the state the process ``pid`` holds: segment ->
    (live, fill, state), an open or cleaning segment read as full (what the
    rebuild at a takeover makes of it)."""
    fds: dict[str, int] = {}
    try:
        for n in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{n}"
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                for name in ("meta", "arena"):
                    if target.startswith(f"/memfd:zswapd-{name} "):
                        fds[name] = os.open(path, os.O_RDWR)
        st = State.attach([fds["meta"], fds["arena"]])
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        table = st.view("segment").tolist()
    finally:
        st.close()
    full = {backing.SEG_OPEN: backing.SEG_FULL, backing.SEG_CLEANING: backing.SEG_FULL}
    out = {}
    for s, w in enumerate(table):
        if w:
            state = backing.seg_state(w)
            out[s] = (backing.seg_live(w), backing.seg_fill(w), full.get(state, state))
    return out


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Written:
    """Pages written to the device and partly written back, and what the
    backing file held then."""

    def __init__(self, d: Daemon, disk: Path) -> None:
        self.d = d
        self.path = disk / "backing"
        fd = os.open(d.file, os.O_RDWR)
        try:
            self.pages = _fill(fd, 0, PAGES, 7)
        finally:
            os.close(fd)
        out = zswapd(d, "writeback", "--max-pages", str(BACKED))
        assert f"wrote back {BACKED} pages" in out, out
        assert stat(d, "bd_count") == BACKED
        self.bd_reads = stat(d, "bd_reads")
        self.inode = self.path.stat().st_ino
        self.digest = file_digest(self.path)
        self.segments = segments(pair(d)[1])
        self.figures = {k: d.stats()["writeback"][k] for k in ("live_bytes", "dead_bytes", "segments_used")}  # type: ignore[index]
        assert self.figures["live_bytes"] > 0 and self.segments, (self.figures, self.segments)

    def kept(self) -> None:
        """The same file, the same bytes, the same segments, held by the
        processes that live now; every page reads back, the backed ones
        from the file."""
        d = self.d
        sup, worker = pair(d)
        assert sup and worker
        assert self.path.stat().st_ino == self.inode, "the backing file was re-created"
        assert self.path.stat().st_size == 64 * MIB
        assert file_digest(self.path) == self.digest, "the backing file's contents changed"
        assert {sup, worker} <= set(pids_holding(str(self.path))), (sup, worker, set(pids_holding(str(self.path))))
        assert segments(worker) == self.segments
        s = d.stats()
        assert s["bd_count"] == BACKED, s
        assert {k: s["writeback"][k] for k in self.figures} == self.figures, s["writeback"]  # type: ignore[index]
        fd = os.open(d.file, os.O_RDONLY)
        try:
            bad = [i for i, p in self.pages.items() if os.pread(fd, 4096, i * 4096) != p]
        finally:
            os.close(fd)
        assert not bad, f"{len(bad)} pages differ, the first {bad[:8]}"
        s = d.stats()
        assert int(s["bd_reads"]) >= self.bd_reads + BACKED, (self.bd_reads, s["bd_reads"])  # type: ignore[call-overload]
        assert s["failed_reads"] == 0, s
        assert "Traceback" not in d.logtext(), d.logtext()


def kill_supervisor(d: Daemon, subreaper: list[int]) -> None:
    sup, worker = pair(d)
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: pair(d)[0] not in (0, sup), timeout=60, what="a new supervisor")
    p = d.stats()["process"]
    assert p["supervisor_start"] == "adopted" and p["worker_pid"] == worker, p  # type: ignore[index]
    subreaper += [sup, int(p["supervisor_pid"])]  # type: ignore[index]


def kill_worker(d: Daemon, subreaper: list[int]) -> None:
    sup, old = pair(d)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: pair(d)[1] not in (0, old), timeout=60, what="a new worker")
    assert pair(d)[0] == sup
    subreaper.append(old)


def stop(d: Daemon, subreaper: list[int]) -> None:
    """SIGTERM to whichever supervisor lives; it exits 0 and the backing
    file goes with it."""
    sup, _ = pair(d)
    if sup == d.proc.pid:
        assert d.stop() == 0, d.logtext()
    else:
        os.kill(sup, signal.SIGTERM)
        assert exit_status(sup, 120) == 0, d.logtext()
        subreaper.clear()


RESTARTS = ["reload", "worker", "supervisor", "supervisor-then-worker", "worker-then-supervisor"]


@pytest.mark.parametrize("engine", ["native", "python"])
@pytest.mark.parametrize("restart", RESTARTS)
def test_written_back_pages_survive_the_restart(
    tmp_path: Path, disk: Path, subreaper: list[int], restart: str, engine: str
) -> None:
    with run_daemon(tmp_path, **config(disk, engine)) as d:  # type: ignore[arg-type]
        assert d.stats()["engine"] == engine
        w = Written(d, disk)
        if restart == "reload":
            sup, old = pair(d)
            zswapd(d, "reload")
            assert pair(d)[0] == sup and pair(d)[1] != old
        elif restart == "worker":
            kill_worker(d, subreaper)
        elif restart == "supervisor":
            kill_supervisor(d, subreaper)
            # The adopted supervisor holds the file: the next worker gets it.
            w.kept()
            kill_worker(d, subreaper)
        elif restart == "supervisor-then-worker":
            kill_supervisor(d, subreaper)
            kill_worker(d, subreaper)
        else:
            # The supervisor killed while the worker it forked takes over:
            # that worker starts a supervisor and hands it the file.
            sup, old = pair(d)
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not (forked := [c for c in children(sup) if c != old]):
                assert time.monotonic() < deadline, "no new worker"
            os.kill(sup, signal.SIGKILL)
            subreaper += [old, *forked]
            wait_for(lambda: pair(d)[0] not in (0, sup), timeout=60, what="a supervisor the new worker started")
            subreaper.append(pair(d)[0])
        w.kept()
        stop(d, subreaper)
        assert "Traceback" not in d.logtext(), d.logtext()
    assert not (disk / "backing").exists(), "the backing file outlived the daemon"


def test_a_second_instance_cannot_take_a_backing_file_in_use(tmp_path: Path, disk: Path) -> None:
    """Another instance configured with the same file is refused before it
    truncates anything: the file is locked by whoever holds its fd."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        with run_daemon(tmp_path, name="second", ready=False, **config(disk)) as d2:  # type: ignore[arg-type]
            assert d2.proc.wait(60) == 2, d2.logtext()
            log = d2.logtext()
        assert f"[writeback] file {disk / 'backing'} is in use by another zswapd instance" in log, log
        assert "Traceback" not in log, log
        w.kept()
        assert d.stop() == 0, d.logtext()


# pidfd_getfd(2): the x86_64 (and every newer table's) number.
SYS_PIDFD_GETFD = 438
_LIBC = ctypes.CDLL(None, use_errno=True)


def take_fds(pid: int, backing_file: Path | None) -> dict[str, int]:
    """The fds the supervisor ``pid`` holds, duplicated into this process
    by name, as systemd's fd store would hand them back (the control socket
    aside: the next supervisor binds its own); the backing file only if
    ``backing_file`` names it."""
    pidfd = os.pidfd_open(pid)
    named: dict[str, int] = {}
    fuse: list[int] = []
    try:
        for n in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{n}")
            if target == "/dev/fuse":
                name = f"fuse-{len(fuse)}"
            elif target.startswith(("/memfd:zswapd-meta ", "/memfd:zswapd-arena ")):
                name = "state-" + target.split("-")[1].split()[0]
            elif backing_file is not None and target == str(backing_file):
                name = "backing"
            else:
                continue
            fd = _LIBC.syscall(SYS_PIDFD_GETFD, pidfd, int(n), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd of fd {n} of {pid}")
            if name.startswith("fuse-"):
                fuse.append(fd)
            else:
                named[name] = fd
    finally:
        os.close(pidfd)
    # The first /dev/fuse fd the supervisor opened is the connection's own,
    # the rest its clones.
    named["fuse"] = fuse[0]
    named.update((f"fuse-clone-{i}", fd) for i, fd in enumerate(fuse[1:]))
    return named


# Starts `zswapd run` as systemd restarts it: the fds at 3, 4, ... and
# LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES naming them (sd_listen_fds(3)).
LISTEN = """\
import fcntl, os, sys
names, fds = sys.argv[1].split(":"), [int(x) for x in sys.argv[2].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
os.execv(sys.executable, [sys.executable, "-m", "zswapd", *sys.argv[3:]])
"""


@contextlib.contextmanager
def restarted_as_by_systemd(tmp_path: Path, d: Daemon, disk: Path, handed: dict[str, int]) -> Iterator[Daemon]:
    """Every process of ``d`` killed at once; a supervisor started on
    ``handed`` (which this process holds until then, so the FUSE connection
    lives on), on the same mountpoint."""
    sup, worker = pair(d)
    kill_instance([sup, worker])
    d.proc.wait(10)
    wait_for(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker to die")
    names, fds = ":".join(handed), ",".join(map(str, handed.values()))
    try:
        with run_daemon(
            tmp_path,
            name="restarted",
            mountpoint=d.mountpoint,
            command=[sys.executable, "-c", LISTEN, names, fds],
            pass_fds=tuple(handed.values()),
            **config(disk),  # type: ignore[arg-type]
        ) as d2:
            for fd in handed.values():
                os.close(fd)
            handed.clear()
            yield d2
    finally:
        for fd in handed.values():
            os.close(fd)


def test_a_lost_backing_fd_is_reopened_only_if_it_is_the_same_file(tmp_path: Path, disk: Path) -> None:
    """A supervisor restarted (as systemd does) without the backing file's
    fd: it opens that very file again by its path, untouched, and every
    page reads back."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        handed = take_fds(pair(d)[0], None)
        with restarted_as_by_systemd(tmp_path, d, disk, handed) as d2:
            log = d2.logtext()
            assert "handed back no backing file: reopened" in log and "Traceback" not in log, log
            w.d = d2
            w.kept()
            assert d2.stop() == 0, d2.logtext()
    assert not (disk / "backing").exists()


def test_a_backing_file_replaced_is_a_clear_error_and_the_rest_is_served(tmp_path: Path, disk: Path) -> None:
    """The fd lost and the file at the path replaced by another of the same
    size: not taken for ours.  The log says which file the pages were
    written to and that their reads fail; they fail with EIO, never read
    as another file's bytes, and every page in the pool is served."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        handed = take_fds(pair(d)[0], None)
        other = disk / "other"
        with open(other, "wb") as f:
            f.truncate(64 * MIB)
        os.rename(other, disk / "backing")
        with restarted_as_by_systemd(tmp_path, d, disk, handed) as d2:
            log = d2.logtext()
            assert "handed back no backing file, and pages were written back to one" in log, log
            assert "is not the file the pages were written to" in log, log
            assert f"{BACKED} pages live in the backing file device" in log and "fail with EIO" in log, log
            assert_backed_pages_fail_and_the_rest_are_served(d2, w)
            assert d2.stop() == 0, d2.logtext()


def assert_backed_pages_fail_and_the_rest_are_served(d: Daemon, w: Written) -> None:
    s = d.stats()
    assert s["bd_count"] == BACKED, s
    fd = os.open(d.file, os.O_RDONLY)
    served = failed = 0
    try:
        for i, p in w.pages.items():
            try:
                got = os.pread(fd, 4096, i * 4096)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed += 1
                continue
            assert got == p, f"page {i} reads other bytes"
            served += 1
    finally:
        os.close(fd)
    print(f"{served} pages served, {failed} failed with EIO")
    assert failed == BACKED and served == PAGES - BACKED, (served, failed)
    assert "Traceback" not in d.logtext(), d.logtext()


def test_a_backing_file_cut_shorter_under_a_takeover_is_a_clear_error(tmp_path: Path, disk: Path) -> None:
    """The file cut shorter through its path while held, then the worker
    killed: the next worker says the file is not the one the pages were
    written to and serves every other page (no crash loop)."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        os.truncate(disk / "backing", 1 * MIB)
        sup, old = pair(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: pair(d)[1] not in (0, old), timeout=60, what="a new worker")
        log = d.logtext()
        assert "the backing file given is device" in log and f"which {BACKED} pages were written back to" in log, log
        assert_backed_pages_fail_and_the_rest_are_served(d, w)
        assert d.stats()["process"]["worker_restarts"] == 1  # type: ignore[index]
        assert d.stop() == 0, d.logtext()


def test_a_worker_stopping_alone_removes_the_backing_file(tmp_path: Path, disk: Path, subreaper: list[int]) -> None:
    """The supervisor killed and no new one can start (its config made
    writable by others): the orphaned worker serves the written-back pages
    from the file it holds, and a SIGTERM stops it alone, as the supervisor
    would: the backing file goes too."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        sup, worker = pair(d)
        subreaper.append(worker)
        os.chmod(d.config, 0o666)
        os.kill(sup, signal.SIGKILL)
        wait_for(lambda: "still without a supervisor" in d.logtext(), timeout=60, what="a refused new supervisor")
        fd = os.open(d.file, os.O_RDONLY)
        try:
            assert all(os.pread(fd, 4096, i * 4096) == p for i, p in w.pages.items())
        finally:
            os.close(fd)
        assert stat(d, "bd_reads") >= w.bd_reads + BACKED
        os.kill(worker, signal.SIGTERM)
        assert exit_status(worker, 120) == 0, d.logtext()
        log = d.logtext()
        assert f"removed the backing file {disk / 'backing'}" in log and "stopped alone, cleanly" in log, log
        assert "Traceback" not in log, log
    assert not (disk / "backing").exists(), "the backing file outlived the daemon"


def test_a_backing_file_unlinked_while_held_loses_nothing(tmp_path: Path, disk: Path, subreaper: list[int]) -> None:
    """The path removed while the daemon runs: the file lives on in the fd
    the supervisor holds, a takeover gets that fd, every page reads back;
    at the stop the log says there was nothing left to remove."""
    with run_daemon(tmp_path, **config(disk)) as d:  # type: ignore[arg-type]
        w = Written(d, disk)
        os.unlink(disk / "backing")
        kill_worker(d, subreaper)
        fd = os.open(d.file, os.O_RDONLY)
        try:
            bad = [i for i, p in w.pages.items() if os.pread(fd, 4096, i * 4096) != p]
        finally:
            os.close(fd)
        assert not bad, f"{len(bad)} pages differ"
        s = d.stats()
        assert int(s["bd_reads"]) >= w.bd_reads + BACKED and s["failed_reads"] == 0, s  # type: ignore[call-overload]
        assert d.stop() == 0, d.logtext()
        log = d.logtext()
        assert f"the backing file held is no longer at {disk / 'backing'}" in log and "Traceback" not in log, log
