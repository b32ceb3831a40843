"""`zswapd run`: mount, serve, set up swap, and undo it all in order.

Every process with pages in our swap dies of SIGBUS the moment this daemon
dies, so the rules below come before anything else in this file.

The rules
---------
1. /dev/fuse is never closed while swap is on, except after a successful
   swapoff.  Only two things end ``Daemon.run``: a completed teardown
   (swapoff, detach, unmount), or the FUSE connection itself going away
   (ENODEV: somebody aborted it or unmounted it with no loop device left), in
   which case there is nothing left to serve.
2. Every task runs under ``_guarded``: an exception is logged with its
   traceback and counted (stats ``task_failures``), and the task starts again
   after a back-off that doubles from 0.1 s to 30 s.  That covers the FUSE
   session, the control server, the metrics listener, housekeeping and
   compaction, signal handling and reload.  A client waiting on a failed
   command gets an error reply from the control layer; the daemon goes on.
3. Signals, as daemons do:
   - SIGTERM, SIGINT: clean shutdown (swapoff while serving, detach,
     unmount); if swapoff fails the daemon keeps serving, and the next
     SIGTERM retries.
   - SIGHUP: reload the config file and apply what can change at runtime;
     log what needs a restart.  A bad file changes nothing.
   - SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGQUIT, SIGPIPE and the
     job-control stops SIGTSTP, SIGTTIN, SIGTTOU: logged and ignored.  A
     stopped daemon would stall every swap-in on the machine.
   Handlers that do nothing but record the signal are installed before
   anything else (``install_early_signal_handlers``), so there is no window
   in which a default action can end or stop the process.  They are Python
   handlers, not SIG_IGN, so that mkswap, swapon and swapoff, which we exec,
   start with default dispositions.
4. Nothing here allocates without bound while a write is being served: the
   frame reserve is refilled by housekeeping, off the write path.

Start-up checks everything it can before changing anything (preflight,
config, paths, mlockall); what a dead earlier instance left behind is
cleaned up before mounting (``recover_stale``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import trio

from . import config as config_mod
from . import paths, swap
from .codec import Codec
from .config import Config, ConfigError
from .control import Controller, ControlServer, prometheus, resolve_group, serve_metrics
from .fuse import mount as fmount
from .fuse.protocol import FILE_NAME, FuseFS
from .fuse.session import serve
from .store import Store

log = logging.getLogger("zswapd")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_DUMPABLE = 4
PR_SET_IO_FLUSHER = 57
# Objects moved per background compaction step: keeps each pause well under 1 ms.
COMPACT_STEP_MOVES = 16
# A failed task restarts after this back-off, doubled per failure up to the
# cap: quick recovery from a one-off bug, no log flood from a persistent one.
RESTART_BACKOFF = 0.1
RESTART_BACKOFF_MAX = 30.0
# A task that ran this long before failing starts again from the shortest
# back-off: its failure is a new one, not a loop.
RESTART_RESET_AFTER = 60.0

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)
IGNORED_SIGNALS = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
HANDLED_SIGNALS = SHUTDOWN_SIGNALS + RELOAD_SIGNALS + IGNORED_SIGNALS


class StartupError(Exception):
    """A problem found before anything was changed; exit status 2."""


# Signals that arrived before trio's receiver was open, replayed by run().
_early_signals: list[int] = []


def _record_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def install_early_signal_handlers() -> None:
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _record_signal)


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


def no_core_dumps() -> None:
    """The pool holds other processes' memory: it must never reach a core
    file, and a non-dumpable process cannot be ptrace-attached by non-root."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("PR_SET_DUMPABLE refused: %s", os.strerror(ctypes.get_errno()))


def harden(swap_enabled: bool) -> None:
    """Keep the daemon able to run while the kernel is swapping to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    # MCL_ONFAULT: lock pages as they are touched, so the big lazily used
    # tables and arenas cost only what is used.
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        why = os.strerror(ctypes.get_errno())
        if swap_enabled:
            # Unlocked, the daemon's own pages could be swapped out to the
            # swap only it can serve: the first fault on one deadlocks.
            raise StartupError(
                f"mlockall failed ({why}): refusing to enable swap, because the daemon could be swapped out to "
                "itself; give it CAP_IPC_LOCK or LimitMEMLOCK=infinity, or set [swap] enable = false"
            )
        log.warning("mlockall failed (%s): the daemon itself may be swapped out", why)
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
    the owner's pid, so a second instance can name the first.  Created in
    root-only directories and never through a symlink (paths.py)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.fds: list[int] = []

    def acquire(self) -> None:
        for path in self.paths:
            try:
                fd = paths.open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644)
            except paths.UnsafePath as e:
                self.release()
                raise StartupError(f"lock file: {e}") from None
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
    log.warning("found a zswapd mount at %s left by an instance that is no longer running; cleaning up", mountpoint)
    backing = os.path.join(mountpoint, FILE_NAME.decode())
    for loop in swap.loops_backed_by(backing):
        used = swap.swap_used_kib(loop)
        if used is not None:
            if used:
                log.error(
                    "%s: %d KiB of swapped pages were lost with the dead instance (their owners got SIGBUS or "
                    "will on access)",
                    loop,
                    used,
                )
            else:
                log.warning("%s: swap was still on, holding no pages", loop)
            r = subprocess.run(["swapoff", loop], capture_output=True, text=True)
            if r.returncode != 0:
                raise StartupError(f"cannot swapoff {loop} left by the dead instance: {r.stderr.strip()}")
        swap.detach_sync(loop)
        log.warning("detached %s", loop)
    fmount.abort_connection(mountpoint)
    fmount.unmount(mountpoint)
    log.warning("unmounted the dead mount at %s", mountpoint)


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


def _changes(old: Config, new: Config) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """(runtime changes, names of changed keys that need a restart)."""
    runtime, restart = [], []
    for section in ("device", "pool", "compaction", "swap", "control", "fuse"):
        a, b = getattr(old, section), getattr(new, section)
        for key, value in vars(b).items():
            if getattr(a, key) == value:
                continue
            if (section, key) in RELOADABLE:
                runtime.append((section, key, value))
            else:
                restart.append(f"[{section}] {key}")
    return runtime, restart


RELOADABLE = (
    {("pool", k) for k in ("memory_limit", "accept_percent", "algorithm", "zstd_level")}
    | {("compaction", k) for k in ("background", "waste_threshold", "watermark", "interval")}
    | {("control", "group")}
)


class Daemon:
    def __init__(self, cfg: Config, config_arg: str | None = None) -> None:
        self.cfg = cfg
        self.config_arg = config_arg  # what `run --config` named; None: default path or built-ins
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
        self.task_failures: Counter[str] = Counter()
        self.reloads = 0
        self.signals_ignored = 0
        self.stopping = False
        self.nursery: trio.Nursery  # set by run(), before any task that uses it starts
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
            "task_failures": dict(self.task_failures),
            "reloads": self.reloads,
            "signals_ignored": self.signals_ignored,
        }

    # -- the task tree --------------------------------------------------------

    async def _guarded(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` until it returns; if it raises, log, count and run it
        again after a back-off (rule 2).  Cancellation passes through."""
        delay = RESTART_BACKOFF
        while True:
            started = trio.current_time()
            try:
                await fn()
                return
            except Exception:
                self.task_failures[name] += 1
                if trio.current_time() - started > RESTART_RESET_AFTER:
                    delay = RESTART_BACKOFF
                log.exception(
                    "task %s failed (failure %d); restarting in %.1f s", name, self.task_failures[name], delay
                )
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

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
        rc = 0
        try:
            with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._guarded, "fuse", self._serve_fuse)
                    nursery.start_soon(self._guarded, "control", lambda: server.serve(sock))
                    nursery.start_soon(self._guarded, "housekeeping", self._housekeeping)
                    if cfg.control.metrics_listen:
                        listen = cfg.control.metrics_listen
                        nursery.start_soon(
                            self._guarded, "metrics", lambda: serve_metrics(self.controller, listen, prometheus)
                        )
                    nursery.start_soon(self._guarded, "signals", lambda: self._signals(signals))
                    for signum in _early_signals:
                        self._on_signal(signum)
                    _early_signals.clear()
                    if cfg.swap.enable:
                        try:
                            await self._swap_up()
                        except (swap.SwapError, OSError) as e:
                            log.error("%s", e)
                            rc = 1
                            self._start_shutdown()
                    if not rc:
                        status = f"serving {self.file}" + (f" as swap on {self.loop.path}" if self.loop else "")
                        sd_notify(f"READY=1\nSTATUS={status}")
                        log.info("ready: %s", status)
        finally:
            sock.close()
            try:
                os.unlink(cfg.control.socket)
            except OSError:
                pass
            if self.swap_on:
                # Unreachable by the rules above; if it ever happens, say so
                # loudly rather than silently taking swap down with us.
                log.critical("exiting with swap still on %s: its pages are lost", self.loop.path if self.loop else "?")
            if self.mounted:
                fmount.unmount(self.mountpoint)
            if self.p3:
                self.p3.close()
            elif self.fd >= 0:
                os.close(self.fd)
        log.info("stopped")
        return rc

    async def _serve_fuse(self) -> None:
        if self.p3:
            await self.p3.serve()
        else:
            await serve(self.fd, self.fs)
        # The connection is gone (aborted, or unmounted with no user left):
        # nothing can be served any more, so there is nothing to protect.
        log.info("FUSE session ended")
        self.swap_on = False
        self.mounted = self.mounted and fmount.is_mountpoint(self.mountpoint)
        self.nursery.cancel_scope.cancel()

    # -- signals ----------------------------------------------------------------

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in SHUTDOWN_SIGNALS:
            log.info("%s: shutting down", name)
            self._start_shutdown()
        elif signum in RELOAD_SIGNALS:
            log.info("%s: reloading %s", name, self.cfg.path)
            self.nursery.start_soon(self._guarded, "reload", self.reload)
        else:
            self.signals_ignored += 1
            log.info("%s ignored (zswapd stops only on SIGTERM or SIGINT; SIGHUP reloads the config)", name)

    def _start_shutdown(self) -> None:
        if self.stopping:
            log.info("shutdown already in progress")
            return
        self.stopping = True
        self.nursery.start_soon(self._guarded, "shutdown", self._shutdown)

    async def _shutdown(self) -> None:
        sd_notify("STOPPING=1\nSTATUS=shutting down")
        try:
            if await self._teardown():
                self.nursery.cancel_scope.cancel()
                return
            sd_notify("STATUS=swapoff failed; still serving, send SIGTERM to retry")
        finally:
            self.stopping = False

    # -- reload -----------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change at runtime."""
        sd_notify("RELOADING=1\nSTATUS=reloading configuration")
        try:
            self._reload()
        finally:
            sd_notify("READY=1\nSTATUS=" + self._status())

    def _status(self) -> str:
        return f"serving {self.file}" + (f" as swap on {self.loop.path}" if self.loop else "")

    def _reload(self) -> None:
        try:
            new = config_mod.load(self.config_arg)
            gid = resolve_group(new.control.group)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        runtime, restart = _changes(self.cfg, new)
        applied: list[str] = []
        for section, key, value in runtime:
            if (section, key) == ("pool", "memory_limit"):
                result = self.store.set_limit(value)
                if not result["met"]:
                    log.warning(
                        "memory_limit %d is below the %d bytes in use; nothing was dropped, new stores fail until it "
                        "fits",
                        value,
                        self.store.mem_used_total,
                    )
            elif (section, key) == ("pool", "accept_percent"):
                self.store.set_accept_percent(value)
            elif (section, key) == ("pool", "algorithm"):
                self.store.set_algorithm(algorithm=value)
            elif (section, key) == ("pool", "zstd_level"):
                self.store.set_algorithm(zstd_level=value)
            elif section == "control":
                self._set_group(gid)
            applied.append(f"[{section}] {key} = {value!r}")
        # Only what was applied becomes the running configuration.
        self.cfg = replace(
            self.cfg,
            path=new.path,
            pool=replace(
                self.cfg.pool,
                memory_limit=new.pool.memory_limit,
                accept_percent=new.pool.accept_percent,
                algorithm=new.pool.algorithm,
                zstd_level=new.pool.zstd_level,
            ),
            compaction=new.compaction,
            control=replace(self.cfg.control, group=new.control.group),
        )
        self.controller.config_path = new.path
        self.reloads += 1
        log.info("reloaded %s: %s", new.path, "; ".join(applied) if applied else "no runtime change")
        if restart:
            log.warning("changed but not applied until a restart: %s", ", ".join(restart))

    def _set_group(self, gid: int | None) -> None:
        self.controller.group_gid = gid
        path = self.cfg.control.socket
        os.chown(path, 0, gid if gid is not None else 0)
        os.chmod(path, 0o660 if gid is not None else 0o600)

    # -- swap -------------------------------------------------------------------

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

    # -- housekeeping -------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Every interval: refill the frame reserve (off the write path) and,
        with background compaction on, compact in bounded steps when the
        store's policy asks for it.  Reads the settings each round, so a
        reload applies at the next one."""
        store = self.store
        while True:
            await trio.sleep(self.cfg.compaction.interval)
            cc = self.cfg.compaction
            store.refill_reserve()
            if not cc.background or not store.compaction_wanted(cc.waste_threshold, cc.watermark):
                continue
            steps = store.compact_steps(COMPACT_STEP_MOVES)
            try:
                while True:
                    t = time.perf_counter()
                    moved = next(steps, 0)
                    self.compact_pauses.append(time.perf_counter() - t)
                    if len(self.compact_pauses) > 4096:
                        del self.compact_pauses[:2048]
                    if not moved:
                        break
                    await trio.sleep(0)
            finally:
                steps.close()


def main_run(cfg: Config, config_arg: str | None = None) -> int:
    install_early_signal_handlers()
    no_core_dumps()
    try:
        preflight(cfg)
        lock = InstanceLock([cfg.device.mountpoint.rstrip("/") + ".lock", cfg.control.socket + ".lock"])
        lock.acquire()
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    try:
        try:
            recover_stale(cfg.device.mountpoint)
            check_mountpoint(cfg.device.mountpoint)
            paths.safe_parent(cfg.control.socket)
            harden(cfg.swap.enable)
        except paths.UnsafePath as e:
            raise StartupError(f"control socket: {e}") from None
        except OSError as e:
            raise StartupError(f"cannot start: {e}") from None
        daemon = Daemon(cfg, config_arg)
        rc: int = trio.run(daemon.run)
        return rc
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("%s", e)
        return 1
    except Exception:
        log.exception("internal error; please report it")
        return 1
    finally:
        lock.release()
