"""The supervisor: the main process of `zswapd run`.

It holds what must outlive any worker, and does nothing that could fail on a
page's contents.  A bug in the pool, the codec or a client handler kills a
worker; the supervisor starts the next one on the same fds within
milliseconds, and every process with pages in our swap goes on as if nothing
happened.

Glossary
--------
worker      the process that serves: FUSE session, control socket, metrics,
            compaction (worker.py).  Forked from the supervisor after a
            crash (fast: the modules are already imported); started as a
            fresh interpreter by `zswapd reload`, so an upgrade runs the code
            installed now.
held fds    /dev/fuse (the connection lives while any process holds it), the
            state memfds (the device's contents), the control socket's
            listening socket (clients see no refused connection during a
            takeover), the instance lock.  The supervisor holds them for
            its whole life, and hands every one of them to each worker.
takeover    a new worker attaching to the held fds: it rebuilds the volatile
            indexes from the state, restores the negotiated FUSE INIT and
            only then sends FUSE_NOTIFY_RESEND, so that every request the
            dead worker had read but not answered is delivered again.
channel     a SOCK_SEQPACKET socketpair, worker to supervisor: "state" with
            the memfds (the first worker creates them, so that geometry and
            pool code stay out of this process), "ready", "replace".

The rules
---------
1. The supervisor never closes /dev/fuse or a state memfd while swap is on,
   except after a successful swapoff.
2. A new worker is started only once the old one has fully exited (we have
   reaped it): a RESEND while the old worker still runs could serve a
   request twice.
3. The state memfds are mapped here and every page they hold is mlocked
   here, so that no page of state is reclaimable between two workers: it
   would be swapped out to the very swap whose server is restarting.  A
   worker locks what it touches (mlockall); this process locks what exists
   (a mincore scan, at each worker death and every LOCK_SCAN_INTERVAL).
4. The supervisor runs one thread.  It forks workers, and a fork from a
   multi-threaded process can inherit a lock held by another thread.
5. Every process that serves holds the instance lock: a worker gets the
   lock fds with the others (forked or started afresh), so while any
   process of an instance lives, no other instance starts, and none takes
   its mount for a dead one.  The lock is released only by the last close.
6. Only installed code runs: the supervisor leaves the directory it was
   started from first thing (process.settle), and a fresh worker is
   `python -I -m zswapd worker` (process.worker_argv).
7. Signals: SIGTERM and SIGINT shut down (swapoff while the worker serves,
   detach, unmount; a failed swapoff keeps serving until the next SIGTERM).
   SIGHUP is forwarded to the worker, which reloads the config.  The rest of
   process.py's ignored signals are logged and ignored here too.  Workers
   run in their own process group, so a terminal's Ctrl-C or hang-up
   reaches only the supervisor.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import paths, swap
from .config import Config, ConfigError
from .fuse import mount as fmount
from .fuse.protocol import FILE_NAME
from .process import (
    EXIT_CONNECTION_GONE,
    IGNORED_SIGNALS,
    StartupError,
    _libc,
    harden,
    no_core_dumps,
    sd_notify,
    settle,
    worker_argv,
)
from .state import read_restarts

if TYPE_CHECKING:
    from .worker import WorkerArgs

log = logging.getLogger("zswapd")

# Restart back-off for a worker that keeps dying before it serves: the first
# restarts are immediate (every millisecond stalls swap-ins), then doubling
# to 1 s, so a crash loop does not eat a CPU.
RESTART_FREE = 3
RESTART_BACKOFF_MAX = 1.0
# Before any worker has served, this many failed starts end `zswapd run`.
START_ATTEMPTS = 5
# A worker that lived this long resets the back-off: its death is a new one.
RESTART_RESET_AFTER = 10.0
# How often resident state pages are mlocked here (rule 3).  Between scans
# the living worker's own lock covers them.
LOCK_SCAN_INTERVAL = 2.0
# A worker that does not exit within this after SIGTERM is killed.
WORKER_STOP_TIMEOUT = 10.0
# How long a statfs of a zswapd mount found at start may take before we call
# the connection held (a server that does not answer is still a holder).
HELD_PROBE_TIMEOUT = 5.0
# Retries of the instance lock when the locked file turns out to be gone
# from its path (an older zswapd unlinked it at exit).
LOCK_ATTEMPTS = 10

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*SHUTDOWN_SIGNALS, signal.SIGHUP, *IGNORED_SIGNALS, signal.SIGCHLD)


# sd_listen_fds(3): passed fds start at 3.
SD_LISTEN_FDS_START = 3
# Names of the fds kept in systemd's fd store, one name per fd so that the
# order LISTEN_FDNAMES gives them back in does not matter.
FD_NAMES = ("fuse", "control", "state-meta", "state-arena", "loop", "backing")
# The FUSE clones are stored as fuse-clone-0, fuse-clone-1, ...
CLONE_PREFIX = "fuse-clone-"


def _known_fd_name(name: str) -> bool:
    return name in FD_NAMES or (name.startswith(CLONE_PREFIX) and name[len(CLONE_PREFIX) :].isdigit())


def listen_fds() -> dict[str, int]:
    """The fds systemd gave back from its fd store (a restart after the
    supervisor died), by name; {} outside systemd or on a first start."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out: dict[str, int] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else ""
        if _known_fd_name(name) and name not in out:
            os.set_inheritable(fd, False)
            out[name] = fd
        else:
            log.warning("ignoring fd %d named %r from systemd's fd store", fd, name)
            os.close(fd)
    return out


def fd_store(name: str, fd: int) -> None:
    """Keep ``fd`` in systemd's fd store (FileDescriptorStoreMax= in the
    unit), so a supervisor restarted after a crash gets it back."""
    if os.environ.get("NOTIFY_SOCKET"):
        sd_notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def fd_store_remove(name: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


# -- start-up checks -------------------------------------------------------------


class InstanceLock:
    """flock'ed files next to the mountpoint and the control socket, holding
    the owner's pid, so a second instance can name the first.  Created in
    root-only directories and never through a symlink (paths.py).

    The lock belongs to the open file: the supervisor hands the fds to
    every worker (rule 5), and it is released only when the last process
    of the instance closes them.  The files are never unlinked: a starter
    that opened the name before an unlink would lock a file nobody else
    can find, and two instances would both win."""

    def __init__(self, lock_paths: list[str]) -> None:
        self.paths = lock_paths
        self.fds: list[int] = []

    def acquire(self) -> None:
        for path in self.paths:
            self.fds.append(self._take(path))

    def _take(self, path: str) -> int:
        for _ in range(LOCK_ATTEMPTS):
            try:
                fd = paths.open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644)
            except paths.UnsafePath as e:
                self.release()
                raise StartupError(f"lock file: {e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = _held_by(fd, path)
                os.close(fd)
                self.release()
                raise StartupError(message) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)  # locked a file since unlinked: take the one at the path now
        self.release()
        raise StartupError(f"lock file {path} keeps being replaced while we lock it; is another zswapd starting?")

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _held_by(fd: int, path: str) -> str:
    """Who holds the lock on ``fd``'s file, for the refusal."""
    owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    holders = _pids_holding(os.fstat(fd))
    if not holders or owner in holders:
        return f"another zswapd (pid {owner}) already holds {path}"
    return (
        f"another zswapd instance already holds {path}: its supervisor (pid {owner}) has exited, but pid "
        f"{', '.join(holders)} (a worker it started) still serves its device; refusing to start a second "
        "instance on it.  Stopping that worker while its device is swap loses every page in it: swapoff first"
    )


def _pids_holding(st: os.stat_result) -> list[str]:
    """Processes with an fd open on the file ``st`` describes, other than
    this one.  Best effort: a process we may not inspect is left out."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), st):
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def check_mountpoint(path: str) -> None:
    if fmount.is_mountpoint(path):
        raise StartupError(f"mountpoint {path} is already mounted")
    try:
        paths.safe_dir(path, 0o700)
    except paths.UnsafePath as e:
        raise StartupError(f"mountpoint: {e}") from None
    except OSError as e:
        raise StartupError(f"mountpoint {path}: {e.strerror}") from None
    if os.listdir(path):
        raise StartupError(f"mountpoint {path} is not empty")


def recover_stale(mountpoint: str) -> None:
    """Clean up what a killed instance left at our mountpoint: its swap area,
    its loop device and its dead FUSE mount.  We hold the instance lock, so
    the instance that made them is gone and nobody can serve them again: any
    page still in that swap was lost when it died."""
    if fmount.mount_type(mountpoint) != "fuse.zswapd":
        return
    if _connection_held(mountpoint):
        # The instance lock is ours, so no zswapd process holds it; but
        # something does, and aborting it would take its pages with it.
        raise StartupError(
            f"the zswapd mount at {mountpoint} is still held by a process that has not got the instance lock "
            "(its connection is alive); refusing to clean it up.  Find it with: fuser -v /dev/fuse"
        )
    log.warning("found a zswapd mount at %s left by an instance that is no longer running; cleaning up", mountpoint)
    backing = os.path.join(mountpoint, FILE_NAME.decode())
    for loop in swap.loops_backed_by(backing):
        used = swap.swap_used_kib(loop)
        if used is not None:
            if used:
                log.error(
                    "%s: %d KiB in use on the dead instance's swap area; any of those pages not still cached in "
                    "RAM was lost (its owner gets SIGBUS on access)",
                    loop,
                    used,
                )
            else:
                log.warning("%s: swap was still on, holding no pages", loop)
            r = subprocess.run(swap.swapoff_argv(loop), capture_output=True, text=True)
            if r.returncode != 0:
                raise StartupError(f"cannot swapoff {loop} left by the dead instance: {r.stderr.strip()}")
        swap.detach_sync(loop)
        log.warning("detached %s", loop)
    fmount.abort_connection(mountpoint)
    fmount.unmount(mountpoint)
    log.warning("unmounted the dead mount at %s", mountpoint)


def _connection_held(mountpoint: str) -> bool:
    """Whether some process still holds the FUSE connection mounted at
    ``mountpoint``.  Once the last /dev/fuse fd on a connection closes, the
    kernel aborts it, and a statfs there fails at once with ENOTCONN; any
    other outcome (an answer, another error, or no answer at all) means a
    holder.  Asked from a child, which is killed if it waits too long."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.statvfs(mountpoint)
        except OSError as e:
            code = 1 if e.errno == errno.ENOTCONN else 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + HELD_PROBE_TIMEOUT
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(waited[1]) != 1


def preflight(cfg: Config) -> None:
    if os.geteuid() != 0:
        raise StartupError("zswapd run must be started as root (it mounts a filesystem and manages swap)")
    if not os.path.exists("/dev/fuse"):
        raise StartupError("/dev/fuse does not exist (load the fuse module: modprobe fuse)")
    if cfg.fuse.backend == "pyfuse3":
        try:
            import pyfuse3  # noqa: F401
        except ImportError:
            raise StartupError(
                f"{cfg.path}: [fuse] backend = 'pyfuse3' needs the optional extra: pip install 'zswapd[pyfuse3]' "
                "(which builds against the Debian packages libfuse3-dev, fuse3 and pkg-config)"
            ) from None
    if cfg.swap.enable:
        try:
            swap.preflight()
        except swap.SwapError as e:
            raise StartupError(f"swap is enabled but cannot be set up: {e}") from None
        warn_kernel_zswap()


ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"


def warn_kernel_zswap() -> None:
    """The kernel's zswap would sit in front of us: it compresses every page
    a second time and fills its own pool first (zram's documentation says
    the same of zram)."""
    try:
        with open(ZSWAP_ENABLED) as f:
            enabled = f.read().strip()
    except OSError:
        return
    if enabled in ("Y", "1"):
        log.warning(
            "the kernel's zswap is enabled (%s): it compresses pages before they reach zswapd, a second time, "
            "and fills its own pool first; boot with zswap.enabled=0 or write N to that file",
            ZSWAP_ENABLED,
        )


def open_backing(cfg: Config) -> int:
    """[writeback] file, created afresh (backing.open_backing_file: O_DIRECT,
    allocated, on a disk filesystem), or StartupError naming what is wrong."""
    from .backing import open_backing_file
    from .errors import BadRequest

    try:
        return open_backing_file(cfg.writeback.file, cfg.writeback.size)
    except BadRequest as e:
        raise StartupError(f"{cfg.path}: {e}") from None


# -- locking the state ------------------------------------------------------------


class LockedMapping:
    """A memfd mapped here, whose resident pages are mlocked (rule 3).
    mlock over a hole would allocate it, so only runs that mincore reports
    resident are locked."""

    PROT_READ, MAP_SHARED = 1, 1

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.npages = -(-self.size // mmap.PAGESIZE)
        self.vec = (ctypes.c_ubyte * max(1, self.npages))()  # allocated once
        self.addr = 0
        self.warned = False
        if self.size:
            libc = _libc()
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            addr = libc.mmap(None, self.size, self.PROT_READ, self.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of state memfd: {os.strerror(ctypes.get_errno())}")
            self.addr = int(addr)

    def lock_resident(self) -> int:
        """mlock every resident page; returns how many are resident."""
        if not self.addr:
            return 0
        libc = _libc()
        if libc.mincore(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.size), self.vec) != 0:
            if not self.warned:
                self.warned = True
                log.warning("mincore of the state refused (%s): its pages are locked only while a worker runs",
                            os.strerror(ctypes.get_errno()))  # fmt: skip
            return 0
        count = 0
        for m in _RUN.finditer(memoryview(self.vec).cast("B")):
            start, end = m.span()
            at = ctypes.c_void_p(self.addr + start * mmap.PAGESIZE)
            if libc.mlock(at, ctypes.c_size_t((end - start) * mmap.PAGESIZE)) != 0:
                log.warning("mlock of state pages failed: %s", os.strerror(ctypes.get_errno()))
                break
            count += end - start
        return count

    def close(self) -> None:
        if self.addr:
            _libc().munmap(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.size))
            self.addr = 0


# mincore sets bit 0 of a page's byte when it is resident and leaves the
# other bits 0 (reserved).  A regex over the vector finds the resident runs
# in C, without copying it: this process allocates nothing per page.
_RUN = re.compile(rb"[^\x00]+")


# -- the supervisor -----------------------------------------------------------------


@dataclass
class Child:
    """A worker process as the supervisor sees it."""

    pid: int
    pidfd: int
    channel: socket.socket
    started: float
    ready: bool = False  # "ready" (serving), or for a reload's new worker "standby"

    def close(self) -> None:
        os.close(self.pidfd)
        self.channel.close()


class Supervisor:
    def __init__(self, cfg: Config, config_arg: str | None, adopted: dict[str, int] | None = None) -> None:
        self.cfg = cfg
        self.adopted = adopted or {}
        self.config_arg = config_arg
        self.mountpoint = cfg.device.mountpoint
        self.file = os.path.join(self.mountpoint, FILE_NAME.decode())
        self.fuse_fd = -1
        # FUSE_DEV_IOC_CLONEs of the connection, one per serving thread.  The
        # supervisor keeps them: a request a dead worker had read on a clone
        # stays in flight on it until the next worker's RESEND, where a clone
        # closed with its maker ends those requests with EIO (docs/design.md).
        self.fuse_clones: list[int] = []
        self.control_sock: socket.socket | None = None
        # The instance lock's fds (InstanceLock), handed to every worker.
        self.lock_fds: list[int] = []
        self.state_fds: list[int] = []
        # [writeback] file, held like the state: its contents are pages.
        self.backing_fd = -1
        self.locked: list[LockedMapping] = []
        self.mounted = False
        self.loop: swap.Loop | None = None
        self.swap_on = False
        self.worker: Child | None = None
        self.spare: Child | None = None  # a reload's new worker, until it takes over
        self.worker_restarts = 0
        self.quick_deaths = 0
        self.ever_served = False
        self.stopping_worker = False
        self.replace_requested = False
        self.died_at_ns = 0
        self.pending: list[int] = []
        self.shutdown_requested = False
        self.connection_gone = False
        self.next_lock_scan = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals and the event loop ------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _children(self) -> list[Child]:
        return [c for c in (self.worker, self.spare) if c is not None]

    def _service(self, timeout: float) -> None:
        """One round of the event loop: wait for a signal, a worker's death,
        a channel message or the lock-scan timer, and handle it."""
        fds = [self._wake_r]
        for c in self._children():
            fds += [c.pidfd, c.channel.fileno()]
        timeout = max(0.0, min(timeout, self.next_lock_scan - time.monotonic()))
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        while self.pending:
            self._handle_signal(self.pending.pop(0))
        for c in self._children():
            if c.channel.fileno() in ready:
                self._read_channel(c)
        for c in self._children():
            self._reap(c)
        if time.monotonic() >= self.next_lock_scan:
            self._lock_state()

    def _wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._service(min(left, 1.0))
        return True

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaped in _service
        name = signal.Signals(signum).name
        if signum in SHUTDOWN_SIGNALS:
            log.info("%s: shutting down", name)
            self.shutdown_requested = True
        elif signum == signal.SIGHUP:
            if self.worker is not None:
                log.info("SIGHUP: asking worker %d to reload the configuration", self.worker.pid)
                os.kill(self.worker.pid, signal.SIGHUP)
        else:
            log.info("%s ignored (zswapd stops only on SIGTERM or SIGINT; SIGHUP reloads the config)", name)

    # -- workers ---------------------------------------------------------------

    def _worker_args(self, channel_fd: int, standby: bool) -> WorkerArgs:
        from .worker import WorkerArgs

        return WorkerArgs(
            config_arg=self.config_arg,
            fuse_fd=self.fuse_fd,
            control_fd=self.control_sock.fileno() if self.control_sock else -1,
            channel_fd=channel_fd,
            state_fds=list(self.state_fds),
            backing_fd=self.backing_fd,
            fuse_clones=list(self.fuse_clones),
            lock_fds=list(self.lock_fds),
            mountpoint=self.mountpoint,
            restarts=self.worker_restarts,
            died_at_ns=self.died_at_ns,
            supervisor_pid=os.getpid(),
            verbose=log.getEffectiveLevel() <= logging.DEBUG,
            standby=standby,
        )

    def _spawn(self, fresh: bool) -> Child:
        """Start a worker on the held fds.  A fork (the modules are already
        imported, so it serves within milliseconds), or with ``fresh`` a new
        interpreter, which runs the code installed now and waits in standby
        until told to go (reload)."""
        from . import worker

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        args = self._worker_args(theirs.fileno(), standby=fresh)
        held = (
            args.fuse_fd, args.control_fd, args.channel_fd, args.backing_fd,
            *args.state_fds, *args.fuse_clones, *args.lock_fds,
        )  # fmt: skip
        inherit = [fd for fd in held if fd >= 0]
        if fresh:
            env = dict(os.environ, ZSWAPD_WORKER=json.dumps(args.to_json()))
            proc = subprocess.Popen(worker_argv(), env=env, pass_fds=inherit, process_group=0, cwd="/")
            pid = proc.pid
            proc.returncode = 0  # reaped through the pidfd, not by Popen
        else:
            pid = os.fork()
            if pid == 0:  # the child: never returns into supervisor code
                rc = 1
                try:
                    signal.set_wakeup_fd(-1)
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    for c in self._children():
                        c.close()
                    ours.close()
                    if self.loop:
                        # The supervisor's alone: held here too, it would
                        # defer the detach at shutdown until this worker
                        # exits, which is after the detach is waited for.
                        os.close(self.loop.fd)
                    rc = worker.worker_main(args, self.cfg)
                finally:
                    os._exit(rc)
        theirs.close()
        child = Child(pid, os.pidfd_open(pid), ours, time.monotonic())
        log.info("worker %d started%s", pid, " (takeover)" if args.takeover else "")
        return child

    def _read_channel(self, c: Child) -> None:
        while True:
            try:
                msg, anc, _, _ = c.channel.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not msg:
                return
            fds: list[int] = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
                    fds.extend(arr)
            self._on_message(c, msg.decode(errors="replace"), fds)

    def _on_message(self, c: Child, msg: str, fds: list[int]) -> None:
        if msg == "state":
            if self.state_fds or c is not self.worker:
                log.error("worker %d sent state fds, but the state is already held; ignoring them", c.pid)
                for fd in fds:
                    os.close(fd)
                return
            self.state_fds = fds
            self.locked = [LockedMapping(fd) for fd in fds]
            self._lock_state()
            for name, fd in zip(("state-meta", "state-arena"), fds):
                fd_store(name, fd)
        elif msg == "ready":
            c.ready = True
            self.ever_served = True
        elif msg == "standby":
            c.ready = True
        elif msg == "replace":
            log.info("worker %d asks to be replaced by one running the installed code", c.pid)
            self.replace_requested = True
        else:
            log.warning("unknown message from worker %d: %r", c.pid, msg[:80])

    def _reap(self, c: Child) -> None:
        try:
            pid, status = os.waitpid(c.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = c.pid, 0
        if pid == 0:
            return
        if c is self.worker:
            self.died_at_ns = time.monotonic_ns()
            self._lock_state()  # before anything else: nothing of the state may be evicted now (rule 3)
        self._read_channel(c)  # a "state" sent just before dying
        c.close()
        code = os.waitstatus_to_exitcode(status)
        how = _how(code)
        if c is self.spare:
            self.spare = None
            log.error("new worker %d exited (%s) before taking over", pid, how)
            return
        self.worker = None
        lived = time.monotonic() - c.started
        if self.stopping_worker:
            log.info("worker %d stopped (%s)", pid, how)
            return
        if code == EXIT_CONNECTION_GONE:
            log.error("worker %d: the FUSE connection is gone; nothing left to serve", pid)
            self.connection_gone = True
            self.swap_on = False
            return
        if self.cfg.fuse.backend == "pyfuse3":
            log.critical("worker %d died (%s); the pyfuse3 backend cannot be taken over", pid, how)
            self.connection_gone = True
            return
        # A crash loop is a worker dying before it serves (a bug at start-up,
        # a state it cannot attach); one killed while serving restarts at once.
        self.quick_deaths = 0 if c.ready or lived > RESTART_RESET_AFTER else self.quick_deaths + 1
        if not self.ever_served and self.quick_deaths >= START_ATTEMPTS:
            # No worker has ever served: nothing is at stake yet, so give up
            # rather than loop (swap is not on; the unit's start fails).
            log.error("no worker could start in %d attempts; giving up", START_ATTEMPTS)
            self.connection_gone = True
            return
        # Without state fds the dead worker never served a request (it hands
        # them over first), so the next one starts a fresh state; it still
        # asks for a resend, since INIT may have been read and not answered.
        self.worker_restarts += 1
        log.error("worker %d died (%s) after %.1f s; taking over (restart %d)", pid, how, lived, self.worker_restarts)
        if self.quick_deaths > RESTART_FREE:
            time.sleep(min(RESTART_BACKOFF_MAX, 0.01 * 2 ** (self.quick_deaths - RESTART_FREE)))
        self.worker = self._spawn(fresh=False)

    def _stop_worker(self) -> None:
        c = self.worker
        if c is None:
            return
        self.stopping_worker = True
        try:
            os.kill(c.pid, signal.SIGTERM)
            if not self._wait(lambda: self.worker is None, WORKER_STOP_TIMEOUT):
                log.warning("worker %d did not stop within %.0f s; killing it", c.pid, WORKER_STOP_TIMEOUT)
                os.kill(c.pid, signal.SIGKILL)
                self._wait(lambda: self.worker is None)
        finally:
            self.stopping_worker = False

    def _replace_worker(self) -> None:
        """`zswapd reload`: a fresh interpreter, running the code installed
        now, gets ready in standby while the old worker serves; then the old
        one stops and the new one takes over (rule 2).  No swapoff."""
        self.replace_requested = False
        spare = self.spare = self._spawn(fresh=True)
        if not self._wait(lambda: spare.ready or self.spare is None, 120):
            log.error("reload: new worker %d not ready within 120 s; keeping the old one", spare.pid)
            os.kill(spare.pid, signal.SIGKILL)
            self._wait(lambda: self.spare is None)
            return
        if self.spare is None:
            log.error("reload: the new worker failed to start (see above); keeping the old one")
            return
        self._stop_worker()
        if self.spare is None:  # died while the old one stopped
            self.worker = self._spawn(fresh=False)
            return
        self.worker_restarts += 1
        self.died_at_ns = time.monotonic_ns()
        self.worker, self.spare = spare, None
        spare.ready = False
        go = {"died_at_ns": self.died_at_ns, "restarts": self.worker_restarts}
        try:
            spare.channel.send(b"go " + json.dumps(go).encode())
        except OSError as e:
            log.error("reload: cannot start the new worker: %s", e)

    def _lock_state(self) -> None:
        self.next_lock_scan = time.monotonic() + LOCK_SCAN_INTERVAL
        for m in self.locked:
            m.lock_resident()

    # -- commands that need the worker serving -----------------------------------

    def _run(self, *argv: str) -> None:
        """Run a util-linux tool while the event loop goes on (it may need
        FUSE requests served, by a worker we may have to restart)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)
        self._wait(lambda: proc.poll() is not None)
        out, err = proc.communicate()
        if proc.returncode != 0:
            msg = (err or out).decode(errors="replace").strip()
            raise swap.SwapError(f"{' '.join(argv)} failed ({proc.returncode}): {msg}")

    def _attach(self) -> swap.Loop:
        """LOOP_CONFIGURE opens the FUSE file, which the worker must answer;
        run it in a short-lived child so this loop keeps serving signals."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                loop = swap.attach_blocking(self.file)
                os.write(w, loop.path.encode())
            except BaseException as e:  # reported to the parent, which decides
                os.write(w, b"!" + str(e).encode(errors="replace"))
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        pidfd = os.pidfd_open(pid)
        done: list[int] = []

        def exited() -> bool:
            if not done and select.select([pidfd], [], [], 0)[0]:
                done.append(os.waitpid(pid, 0)[1])
            return bool(done)

        try:
            self._wait(exited)
        finally:
            os.close(pidfd)
        out = os.read(r, 4096).decode(errors="replace")
        os.close(r)
        if out.startswith("!") or not out:
            raise swap.SwapError(out[1:] or "attaching the loop device failed")
        # The child's fd closed; the device stays bound (no autoclear) until
        # we detach it.  Hold it open, for the fd store.
        return swap.Loop(out, os.open(out, os.O_RDWR | os.O_CLOEXEC))

    def _swap_up(self) -> None:
        cfg = self.cfg.swap
        if self.loop is None:
            sd_notify("STATUS=attaching loop device")
            self.loop = self._attach()
            fd_store("loop", self.loop.fd)
        if not swap.dio_enabled(self.loop):
            log.warning("%s is not using direct I/O: swap pages will be cached twice", self.loop.path)
        self._run(*swap.mkswap_argv(self.loop.path))
        self._run(*swap.swapon_argv(self.loop.path, cfg.priority, cfg.discard))
        self.swap_on = True
        log.info("swap on %s (priority %d, discard %s)", self.loop.path, cfg.priority, cfg.discard)

    def _teardown(self) -> bool:
        """swapoff, detach, unmount.  False if swapoff failed: we keep
        serving, because exiting now would take live swap pages with us."""
        if self.swap_on and self.loop:
            log.info("swapoff %s: bringing its pages back into memory", self.loop.path)
            try:
                self._run(*swap.swapoff_argv(self.loop.path))
            except swap.SwapError as e:
                if swap.swap_used_kib(self.loop.path) is not None:
                    log.error("%s; still serving. Free some memory and send SIGTERM again.", e)
                    return False
            self.swap_on = False
        if self.loop:
            fd_store_remove("loop")
            # Our own fd first: while any fd is open, LOOP_CLR_FD only defers
            # the detach to the last close, and detach_sync would wait it out.
            os.close(self.loop.fd)
            swap.detach_sync(self.loop.path)
            log.info("detached %s", self.loop.path)
            self.loop = None
        # Loop devices someone else attached to our file cannot work once we
        # are gone, and after a lazy unmount nobody could find them by path:
        # take them down with us (and keep serving if one is swap we cannot
        # swap off).
        for dev in swap.loops_backed_by(self.file):
            if swap.swap_used_kib(dev) is not None:
                try:
                    self._run(*swap.swapoff_argv(dev))
                except swap.SwapError as e:
                    log.error("%s is swap on our file and cannot be swapped off (%s); still serving", dev, e)
                    return False
            swap.detach_sync(dev)
            log.warning("detached %s, which another process had attached to %s", dev, self.file)
        for name in (*FD_NAMES, *(f"{CLONE_PREFIX}{i}" for i in range(len(self.fuse_clones)))):
            fd_store_remove(name)  # nothing left for a restart to take over
        if self.mounted:
            lazy = not fmount.unmount(self.mountpoint)
            self.mounted = False
            log.info("unmounted %s%s", self.mountpoint, " (lazily: still busy)" if lazy else "")
        return True

    # -- life ------------------------------------------------------------------------

    def _adopt(self) -> None:
        """A restart under systemd: the fds a dead supervisor kept in the fd
        store.  The mount, the state and (with swap) the loop device and the
        swap area are still live; the first worker takes over."""
        a = self.adopted
        log.warning("taking over from a supervisor that died: %s from systemd's fd store", ", ".join(sorted(a)))
        self.fuse_fd = a["fuse"]
        # Unmounted at the end only if it is ours: if the config now names
        # another mountpoint, that one may hold someone else's mount.
        self.mounted = fmount.mount_type(self.mountpoint) == "fuse.zswapd"
        if not self.mounted:
            log.error(
                "systemd handed back the FUSE connection, but %s holds no zswapd mount (was [device] mountpoint "
                "changed?); serving the connection anyway, since swap may be on it",
                self.mountpoint,
            )
        # Every clone comes back, even beyond what [fuse] threads now asks
        # for: each may hold requests a dead worker had read.
        self.fuse_clones = [a[n] for n in sorted(a, key=_clone_index) if n.startswith(CLONE_PREFIX)]
        if "control" in a:
            self.control_sock = socket.socket(fileno=a["control"])
        if "state-meta" in a and "state-arena" in a:
            self.state_fds = [a["state-meta"], a["state-arena"]]
            self.locked = [LockedMapping(fd) for fd in self.state_fds]
            self._lock_state()
        if "backing" in a:
            self.backing_fd = a["backing"]
        if "loop" in a:
            path = os.readlink(f"/proc/self/fd/{a['loop']}")
            self.loop = swap.Loop(path, a["loop"])
            self.swap_on = swap.swap_used_kib(path) is not None
        # A worker killed together with the old supervisor had its state, or
        # none was made yet (nothing was written: a fresh store is right).
        self.worker_restarts = read_restarts(self.state_fds[0]) + 1 if self.state_fds else 0
        self.ever_served = bool(self.state_fds)
        self.died_at_ns = time.monotonic_ns()

    def _kill_old_workers(self) -> None:
        """Rule 2 across a supervisor restart: no process of the old
        instance may still serve when our first worker sends RESEND.  Under
        systemd with KillMode=mixed they are gone already; a drop-in with
        KillMode=process would leave them, so any other process in our own
        cgroup is killed and waited for.  They hold the instance lock (rule
        5): main_run calls this before it takes the lock."""
        others = [pid for pid in _cgroup_peers() if pid != os.getpid() and _is_zswapd(pid)]
        if not others:
            return
        log.warning("processes %s of the previous instance are still running; killing them before taking over", others)
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in others) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _clone_fuse(self) -> None:
        """One clone per serving thread, made once, here, and kept: a worker
        never makes its own (see fuse_clones)."""
        while len(self.fuse_clones) < self.cfg.fuse.serving_threads():
            try:
                fd = fmount.clone_fuse(self.fuse_fd)
            except OSError as e:
                log.warning("cannot clone the FUSE connection (%s): serving threads share one fd", e)
                return
            fd_store(f"{CLONE_PREFIX}{len(self.fuse_clones)}", fd)
            self.fuse_clones.append(fd)

    def _serving(self) -> bool:
        return self.worker is not None and self.worker.ready

    def status(self) -> str:
        return f"serving {self.file}" + (f" as swap on {self.loop.path}" if self.loop else "")

    def run(self) -> int:
        from .control import bind_control_socket, resolve_group

        cfg = self.cfg
        rc = 0
        try:
            if self.adopted:
                self._adopt()
            elif cfg.fuse.backend == "builtin":
                self.fuse_fd = fmount.open_fuse()
                fmount.mount(self.fuse_fd, self.mountpoint)
                self.mounted = True
                fd_store("fuse", self.fuse_fd)
            if self.fuse_fd >= 0:
                self._clone_fuse()
            if self.control_sock is None:
                self.control_sock = bind_control_socket(cfg.control.socket, resolve_group(cfg.control.group))
                fd_store("control", self.control_sock.fileno())
            if cfg.writeback.enable and self.backing_fd < 0 and not self.state_fds:
                self.backing_fd = open_backing(cfg)
                fd_store("backing", self.backing_fd)
                log.info("backing file %s: %d MiB", cfg.writeback.file, cfg.writeback.size >> 20)
            self.worker = self._spawn(fresh=False)
            if not self._wait(lambda: self._serving() or self.shutdown_requested or self.connection_gone):
                return 1
            if cfg.fuse.backend == "pyfuse3":
                self.mounted = fmount.is_mountpoint(self.mountpoint)
            if cfg.swap.enable and not self.swap_on and not self.shutdown_requested and not self.connection_gone:
                try:
                    self._swap_up()
                except (swap.SwapError, OSError) as e:
                    log.error("%s", e)
                    rc = 1
                    self.shutdown_requested = True
            if not rc:
                sd_notify(f"READY=1\nSTATUS={self.status()}\nMAINPID={os.getpid()}")
                log.info("ready: %s", self.status())
            while True:
                self._wait(lambda: self.shutdown_requested or self.replace_requested or self.connection_gone)
                if self.connection_gone:
                    self._teardown()
                    return 1
                if self.replace_requested:
                    self._replace_worker()
                    continue
                sd_notify("STOPPING=1\nSTATUS=shutting down")
                if self._teardown():
                    break
                self.shutdown_requested = False
                sd_notify("STATUS=swapoff failed; still serving, send SIGTERM to retry")
            return rc
        finally:
            self._close()
            log.info("stopped")

    def _close(self) -> None:
        if self.swap_on:
            # Unreachable by the rules above; say so loudly if it ever is.
            log.critical("exiting with swap still on %s: its pages are lost", self.loop.path if self.loop else "?")
        self._stop_worker()
        if self.control_sock is not None:
            self.control_sock.close()
            try:
                os.unlink(self.cfg.control.socket)
            except OSError:
                pass
        if self.mounted:
            fmount.unmount(self.mountpoint)
            self.mounted = False
        for m in self.locked:
            m.close()
        for fd in self.state_fds:
            os.close(fd)
        self.state_fds = []
        for fd in self.fuse_clones:
            os.close(fd)
        self.fuse_clones = []
        if self.backing_fd >= 0:
            # Swap lives one boot: what the file held is discarded with it.
            os.close(self.backing_fd)
            self.backing_fd = -1
            if not self.swap_on and self.cfg.writeback.file:
                try:
                    os.unlink(self.cfg.writeback.file)
                except OSError as e:
                    log.warning("cannot remove the backing file %s: %s", self.cfg.writeback.file, e)
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)
            self.fuse_fd = -1


def _clone_index(name: str) -> int:
    return int(name[len(CLONE_PREFIX) :]) if name.startswith(CLONE_PREFIX) else -1


def _cgroup_peers() -> list[int]:
    """Pids in this process's own cgroup (v2, or v1's systemd hierarchy);
    [] if that cannot be read."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and not controllers:
            procs = f"/sys/fs/cgroup{path}/cgroup.procs"
        elif controllers == "name=systemd":
            procs = f"/sys/fs/cgroup/systemd{path}/cgroup.procs"
        else:
            continue
        if path in ("", "/"):
            return []  # the root cgroup is everybody's: never kill there
        try:
            with open(procs) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []
    return []


def _is_zswapd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"zswapd" in f.read()
    except OSError:
        return False


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def main_run(cfg: Config, config_arg: str | None = None) -> int:
    """``cfg`` comes from config.load(strict=True): its paths are real and
    absolute.  So is ``config_arg`` (the CLI made it so), which every fresh
    worker reads after this process has left its starting directory."""
    adopted = listen_fds()
    closed = settle(set(adopted.values()))
    if adopted and "fuse" not in adopted:
        # Only a held /dev/fuse fd keeps a connection, and the swap on it,
        # alive: without one there is nothing to take over.  With one, it is
        # taken over whatever the mount table says (Supervisor._adopt).
        log.warning("systemd handed back fds, but no FUSE connection: starting afresh")
        for name, fd in adopted.items():
            os.close(fd)
            fd_store_remove(name)
        adopted = {}
    sup = Supervisor(cfg, config_arg, adopted)
    sup.install_signals()
    if closed:
        log.info("closed fds %s inherited from the caller: a worker holds only what it is given", closed)
    no_core_dumps()
    try:
        preflight(cfg)
        if adopted:
            # Before the lock, which a worker of the dead supervisor holds.
            sup._kill_old_workers()
        lock = InstanceLock([cfg.device.mountpoint.rstrip("/") + ".lock", cfg.control.socket + ".lock"])
        lock.acquire()
        sup.lock_fds = lock.fds
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    try:
        try:
            if not adopted:
                recover_stale(cfg.device.mountpoint)
                check_mountpoint(cfg.device.mountpoint)
            paths.safe_parent(cfg.control.socket)
            harden(cfg.swap.enable)
            # Imported now, so that a worker forked after a crash starts
            # serving without importing anything.
            from . import worker  # noqa: F401
        except paths.UnsafePath as e:
            raise StartupError(f"control socket: {e}") from None
        except OSError as e:
            raise StartupError(f"cannot start: {e}") from None
        return sup.run()
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except paths.UnsafePath as e:
        log.error("control socket: %s", e)
        return 2
    except OSError as e:
        log.error("%s", e)
        return 1
    except Exception:
        log.exception("internal error; please report it")
        return 1
    finally:
        lock.release()
