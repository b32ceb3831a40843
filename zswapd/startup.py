"""Start-up of `zswapd run`, before the supervisor serves: the instance lock,
the clean-up of what a killed instance left (its swap, loop device and dead
mount), the checks that refuse to start with a clear reason (preflight,
the mountpoint), and, for a supervisor systemd restarted, the end of any
process of the old instance still in our cgroup.

Every refusal here is a StartupError (exit status 2), raised before
anything was changed."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import time

from . import paths, swap
from .config import Config
from .fuse import mount as fmount
from .fuse.protocol import FILE_NAME
from .process import StartupError

log = logging.getLogger("zswapd")

# How long a statfs of a zswapd mount found at start may take before we call
# the connection held (a server that does not answer is still a holder).
HELD_PROBE_TIMEOUT = 5.0
# Retries of the instance lock when the locked file turns out to be gone
# from its path (an older zswapd unlinked it at exit).
LOCK_ATTEMPTS = 10
# How long the processes of a dead instance may take to die once SIGKILLed.
KILL_WAIT = 10.0


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


def reopen_backing(cfg: Config, want: tuple[int, int, int]) -> int:
    """[writeback] file opened again, untouched, if it is the file ``want``
    names (backing.reopen_backing_file), or StartupError naming why not."""
    from .backing import reopen_backing_file
    from .errors import BadRequest

    if not cfg.writeback.file:
        raise StartupError(f"{cfg.path}: [writeback] file is not set, so the backing file cannot be found again")
    try:
        return reopen_backing_file(cfg.writeback.file, want)
    except BadRequest as e:
        raise StartupError(f"{cfg.path}: {e}") from None


def write_owner(lock_fds: list[int]) -> None:
    """Name this process as the lock's owner in the files held by
    ``lock_fds`` (a supervisor that adopted the lock: a refused second
    start names the supervisor that lives)."""
    for fd in lock_fds:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def kill_old_instance() -> None:
    """Rule 2 across a supervisor restart under systemd: no process of the
    old instance may still serve when our first worker sends RESEND.  With
    KillMode=mixed they are gone already; a drop-in with KillMode=process
    would leave them, so any other zswapd process in our own cgroup is
    killed and waited for.  They hold the instance lock: call this before
    taking it."""
    others = [pid for pid in _cgroup_peers() if pid != os.getpid() and _is_zswapd(pid)]
    if not others:
        return
    log.warning("processes %s of the previous instance are still running; killing them before taking over", others)
    for pid in others:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_WAIT
    while any(os.path.exists(f"/proc/{pid}") for pid in others) and time.monotonic() < deadline:
        time.sleep(0.01)


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
