"""`zswapd run`: mount, serve, set up swap, and undo it all in order.

One trio nursery holds every task: the FUSE session, the control server, the
background compactor, the swap setup and the signal watcher.  Shutdown runs
swapoff while the session still serves (it pulls every page back through
FUSE), then detaches the loop device, unmounts, and cancels the nursery.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import trio

from . import swap
from .codec import Codec
from .config import Config, ConfigError
from .control import Controller, ControlServer, prometheus, resolve_group, serve_metrics
from .fuse import mount as fmount
from .fuse.protocol import FILE_NAME, FuseFS
from .fuse.session import serve
from .store import Store

log = logging.getLogger("zswapd")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57
# Objects moved per background compaction step: keeps each pause well under 1 ms.
COMPACT_STEP_MOVES = 16


class StartupError(Exception):
    """A problem found before anything was changed; exit status 2."""


def setup_logging(verbose: bool = False) -> None:
    # Under systemd, stderr goes to journald, which reads <N> priority prefixes.
    journal = "JOURNAL_STREAM" in os.environ
    prio = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    class Fmt(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + self.formatException(record.exc_info)
            if journal:
                return f"<{prio.get(record.levelno, 6)}>{msg}"
            return f"zswapd[{os.getpid()}]: {record.levelname.lower()}: {msg}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Fmt())
    root = logging.getLogger("zswapd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def sd_notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), path)
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


def harden() -> None:
    """Keep the daemon able to run while the kernel is swapping to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    # MCL_ONFAULT: lock pages as they are touched, so the big lazily used
    # tables and arenas cost only what is used.
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        log.warning("mlockall failed (%s): the daemon itself may be swapped out", os.strerror(ctypes.get_errno()))
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning(
            "PR_SET_IO_FLUSHER refused (%s; needs CAP_SYS_RESOURCE): reclaim inside the daemon may recurse into swap",
            os.strerror(ctypes.get_errno()),
        )
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        log.warning("cannot set oom_score_adj: %s", e)


class InstanceLock:
    """flock'ed files next to the mountpoint and the control socket, holding
    the owner's pid, so a second instance can name the first."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.fds: list[int] = []

    def acquire(self) -> None:
        for path in self.paths:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                self.release()
                raise StartupError(f"another zswapd (pid {owner}) already holds {path}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fds.append(fd)

    def release(self) -> None:
        for fd, path in zip(self.fds, self.paths):
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
        self.fds.clear()


def check_mountpoint(path: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StartupError(f"mountpoint {path} exists and is not a directory")
    if not os.path.exists(path):
        os.makedirs(path, mode=0o700)
        return
    if fmount.is_mountpoint(path):
        raise StartupError(f"mountpoint {path} is already mounted")
    if os.listdir(path):
        raise StartupError(f"mountpoint {path} is not empty")


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


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.mountpoint = cfg.device.mountpoint
        self.file = os.path.join(self.mountpoint, FILE_NAME.decode())
        self.store = Store(
            cfg.device.size,
            Codec(cfg.pool.algorithm, cfg.pool.zstd_level),
            memory_limit=cfg.pool.memory_limit,
            accept_percent=cfg.pool.accept_percent,
            reserve_frames=cfg.pool.reserve // 4096,
        )
        self.fs = FuseFS(self.store)
        self.p3: Any = None  # the pyfuse3 server, with [fuse] backend = "pyfuse3"
        self.loop: swap.Loop | None = None
        self.swap_on = False
        self.mounted = False
        self.fd = -1
        self.compact_pauses: list[float] = []
        self.controller = Controller(self.store, self.device_info, cfg.path, resolve_group(cfg.control.group))
        self.controller.extra_stats = self.extra_stats

    def device_info(self) -> dict[str, Any]:
        return {
            "path": self.file,
            "size": self.store.size,
            "loop": self.loop.path if self.loop else None,
            "mountpoint": self.mountpoint,
            "swap": self.swap_on,
        }

    def extra_stats(self) -> dict[str, Any]:
        pauses = sorted(self.compact_pauses)
        p99 = pauses[int(len(pauses) * 0.99)] if pauses else 0.0
        return {
            "fuse_backend": self.cfg.fuse.backend,
            "discard_supported": self.p3 is None,
            "fuse_requests": self.p3.ops.requests if self.p3 else self.fs.requests,
            "fuse_errors": self.p3.ops.errors if self.p3 else self.fs.errors,
            "compaction_step_p99_us": round(p99 * 1e6, 1),
        }

    async def run(self) -> int:
        cfg = self.cfg
        if cfg.fuse.backend == "pyfuse3":
            from .fuse.pyfuse3_backend import Pyfuse3Server

            self.p3 = Pyfuse3Server(self.store, self.mountpoint)
            self.p3.mount()
            if cfg.swap.enable:
                log.warning(
                    "the pyfuse3 backend cannot receive discards (no fallocate): swap slots the kernel frees stay "
                    "in the pool until overwritten, and the memory limit is reached sooner; use backend 'native'"
                )
        else:
            self.fd = fmount.open_fuse()
            fmount.mount(self.fd, self.mountpoint)
        self.mounted = True
        log.info(
            "mounted %s (%d MiB, %s, limit %s)",
            self.file,
            cfg.device.size >> 20,
            cfg.pool.algorithm,
            f"{cfg.pool.memory_limit >> 20} MiB" if cfg.pool.memory_limit else "none",
        )
        server = ControlServer(self.controller, cfg.control.socket)
        sock = server.bind()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_fuse, nursery)
                await nursery.start(server.serve, sock)
                nursery.start_soon(self._housekeeping)
                if cfg.control.metrics_listen:
                    nursery.start_soon(serve_metrics, self.controller, cfg.control.metrics_listen, prometheus)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    if cfg.swap.enable:
                        try:
                            await self._swap_up()
                        except swap.SwapError as e:
                            log.error("%s", e)
                            await self._teardown()
                            nursery.cancel_scope.cancel()
                            return 1
                    status = f"serving {self.file}" + (f" as swap on {self.loop.path}" if self.loop else "")
                    sd_notify(f"READY=1\nSTATUS={status}")
                    log.info("ready: %s", status)
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        sd_notify("STOPPING=1\nSTATUS=shutting down")
                        if await self._teardown():
                            break
                        sd_notify("STATUS=swapoff failed; still serving, send SIGTERM to retry")
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            try:
                os.unlink(cfg.control.socket)
            except OSError:
                pass
            if self.mounted:
                fmount.unmount(self.mountpoint)
            if self.p3:
                self.p3.close()
            else:
                os.close(self.fd)
        log.info("stopped")
        return 0

    async def _serve_fuse(self, nursery: trio.Nursery) -> None:
        if self.p3:
            await self.p3.serve()
        else:
            await serve(self.fd, self.fs)
        log.info("FUSE session ended")
        # Nothing can be served any more: end the daemon.
        nursery.cancel_scope.cancel()

    async def _swap_up(self) -> None:
        cfg = self.cfg.swap
        sd_notify("STATUS=attaching loop device")
        self.loop = await swap.attach(self.file)
        if not swap.dio_enabled(self.loop):
            log.warning("%s is not using direct I/O: swap pages will be cached twice", self.loop.path)
        await swap.mkswap(self.loop.path)
        await swap.swapon(self.loop.path, cfg.priority, cfg.discard)
        self.swap_on = True
        log.info("swap on %s (priority %d, discard %s)", self.loop.path, cfg.priority, cfg.discard)

    async def _teardown(self) -> bool:
        """swapoff, detach, unmount.  False if swapoff failed: we keep
        serving, because exiting now would take live swap pages with us."""
        if self.swap_on and self.loop:
            log.info("swapoff %s: bringing %d pages back into memory", self.loop.path, self.store.c.pages_stored)
            try:
                await swap.swapoff(self.loop.path)
            except swap.SwapError as e:
                if swap.swap_active(self.loop.path):
                    log.error("%s; still serving. Free some memory and send SIGTERM again.", e)
                    return False
            self.swap_on = False
        if self.loop:
            await swap.detach(self.loop)
            log.info("detached %s", self.loop.path)
            self.loop = None
        if self.mounted:
            lazy = not fmount.unmount(self.mountpoint)
            self.mounted = False
            log.info("unmounted %s%s", self.mountpoint, " (lazily: still busy)" if lazy else "")
        return True

    async def _housekeeping(self) -> None:
        """Every interval: refill the frame reserve (off the write path) and,
        with background compaction on, compact in bounded steps when waste or
        usage passes its threshold."""
        cc = self.cfg.compaction
        store = self.store
        while True:
            await trio.sleep(cc.interval)
            store.refill_reserve()
            if not cc.background or not store.compaction_wanted(cc.waste_threshold, cc.watermark):
                continue
            steps = store.compact_steps(COMPACT_STEP_MOVES)
            while True:
                t = time.perf_counter()
                moved = next(steps, 0)
                self.compact_pauses.append(time.perf_counter() - t)
                if len(self.compact_pauses) > 4096:
                    del self.compact_pauses[:2048]
                if not moved:
                    break
                await trio.sleep(0)


def main_run(cfg: Config) -> int:
    try:
        preflight(cfg)
        lock = InstanceLock([cfg.device.mountpoint.rstrip("/") + ".lock", cfg.control.socket + ".lock"])
        lock.acquire()
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    try:
        check_mountpoint(cfg.device.mountpoint)
    except StartupError as e:
        log.error("%s", e)
        lock.release()
        return 2
    try:
        daemon = Daemon(cfg)
        harden()
        rc: int = trio.run(daemon.run)
        return rc
    except OSError as e:
        log.error("%s", e)
        return 1
    finally:
        lock.release()
