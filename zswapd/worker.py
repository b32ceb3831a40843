"""The worker: one trio nursery that serves the FUSE session, the control
socket, the metrics listener and housekeeping, on fds the supervisor holds.

Every process with pages in our swap would die of SIGBUS if the FUSE
connection died, so the rules below come before anything else in this file.

The rules
---------
1. The worker never closes /dev/fuse while swap is on, except after a
   successful swapoff: it exits with swap on only while a supervisor lives
   to take over (which holds /dev/fuse and the state memfds for its whole
   life).  A worker that dies then loses only its volatile indexes; the
   next one rebuilds them from the state.  When its supervisor dies outside
   systemd, the worker starts a new one and hands it every fd
   (worker_link.py); who restarts whom, with and without systemd, is in
   supervisor.py.
2. Which failures end a worker, and so trigger a takeover: only those that
   escape every guard (a crash in native code, a kill, an OOM kill, a bug in
   start-up before the state is attached).  Every task runs under
   ``_guarded``: an exception is logged with its traceback and counted
   (stats ``task_failures``), and the task starts again after a back-off
   that doubles from 0.1 s to 30 s.  That covers the FUSE session, the
   control server, the metrics listener, housekeeping and compaction, signal
   handling and reload.  A client waiting on a failed command gets an error
   reply; the worker goes on.
3. Takeover order: attach the state, rebuild and check it, restore the
   negotiated FUSE INIT, and only then send FUSE_NOTIFY_RESEND and serve.
   The supervisor starts us only after the previous worker was reaped, so no
   request can be served twice.
4. Signals (the worker runs in its own process group, so a terminal's
   signals reach only the supervisor): the supervisor stops a worker with
   "stop" on the channel, and the worker ends after the request in hand.
   SIGTERM from outside is passed to the supervisor, which decides; with
   no supervisor alive, SIGTERM or SIGINT runs the clean stop here
   (worker_link.py).  SIGHUP reloads the config and applies what can change
   at runtime; everything else of the supervisor's ignored list is logged
   and ignored.  A reload
   that fails (a config refused, a chown refused) is reported once and
   changes nothing; it is not retried until the next SIGHUP.
5. Nothing here allocates without bound while a write is being served: the
   frame reserve is refilled by housekeeping, off the write path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import trio

from . import backing, entry, swap
from . import config as config_mod
from .codec import ALGORITHMS, PAGE_SIZE, Codec
from .config import Config, ConfigError, check_value
from .control import Controller, ControlServer, prometheus, resolve_group, serve_metrics, set_socket_access
from .engine import native_error
from .fuse import protocol
from .fuse.protocol import FILE_NAME, MAX_PAGES_COUNT, MAX_WRITE, FuseFS
from .fuse.session import serve
from .held import BACKING, STATE_NAMES, HeldFds
from .paths import UnsafePath
from .process import EXIT_CONNECTION_GONE, IGNORED_SIGNALS, harden, no_core_dumps, setup_logging
from .recompress import Recompressor
from .state import InitParams, State, StateError
from .store import Store
from .worker_link import SupervisorLink, watch_pid

log = logging.getLogger("zswapd")

# Objects moved per background compaction step: keeps each pause well under 1 ms.
COMPACT_STEP_MOVES = 16
# Pause before a compaction step that follows one that moved nothing
# (store.COMPACT_RETRIES): long enough for the writer that took the slots to
# finish its request, short against the housekeeping interval.
COMPACT_RETRY_PAUSE = 0.01
# Background writeback and cleaning (_writeback_round): objects per step
# (a step holds the backing lock for one segment write at most), bytes of
# segment writes per housekeeping round (a disk's few ms; the daily limit
# bounds writeback over the day), usage points below the watermark that
# pressure writeback aims for, and the dead share of the file's used bytes
# beyond which cleaning runs.
WRITEBACK_STEP_OBJECTS = 256
WRITEBACK_ROUND_BYTES = 8 << 20
WRITEBACK_HYSTERESIS = 5
CLEAN_DEAD_SHARE = 25
# Cleaning steps per round: each reads a segment once and moves at most
# WRITEBACK_STEP_OBJECTS objects, so a round moves at most ~8 segments.
CLEAN_ROUND_STEPS = 8
# A failed task restarts after this back-off, doubled per failure up to the
# cap: quick recovery from a one-off bug, no log flood from a persistent one.
RESTART_BACKOFF = 0.1
RESTART_BACKOFF_MAX = 30.0
# A task that ran this long before failing starts again from the shortest
# back-off: its failure is a new one, not a loop.
RESTART_RESET_AFTER = 60.0

# SIGINT too: the worker has its own process group, so it comes only from a
# deliberate kill, and stopping is the supervisor's decision while one lives.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)
HANDLED_SIGNALS = STOP_SIGNALS + RELOAD_SIGNALS + IGNORED_SIGNALS
# WorkerArgs keys of supervisors before held.HeldFds: a reload may start
# this code under one of them.
_LEGACY_FDS = {"fuse_fd": "fuse", "control_fd": "control"}
_LEGACY_LISTS = {"state_fds": "state-", "fuse_clones": "fuse-clone-", "lock_fds": "lock-"}


@dataclass
class WorkerArgs:
    """What the supervisor hands a worker."""

    config_arg: str | None
    # Every fd the supervisor holds but the loop device, by held.py's names.
    # The lock's are held, never used, so that the lock lives as long as any
    # process of the instance (supervisor.py, rule 5).
    fds: dict[str, int] = field(default_factory=dict)
    channel_fd: int = -1
    # The running device's mountpoint as the supervisor resolved it: a
    # fresh worker reads the config anew, and a path changed there since
    # takes a restart.  Empty from a supervisor older than this field.  (The
    # control socket's path is the one its fd is bound to.)
    mountpoint: str = ""
    loop: str = ""  # the loop device the supervisor attached, once it has
    restarts: int = 0  # workers before this one on the connection
    died_at_ns: int = 0  # CLOCK_MONOTONIC of the previous worker's death
    supervisor_pid: int = 0
    supervisor_restarts: int = 0  # supervisors before the one that started us
    supervisor_start: str = "shell"  # how it started: shell, service, adopted
    service: bool = False  # a service manager (systemd) restarts the supervisor, not us
    verbose: bool = False
    standby: bool = False  # wait for "go" on the channel before touching anything

    @property
    def takeover(self) -> bool:
        """An earlier worker held this connection (or made the state): this
        one must restore INIT and ask for a resend."""
        return STATE_NAMES[0] in self.fds or self.restarts > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerArgs:
        # A reload runs newer code than the supervisor that wrote this:
        # keys this version does not know are dropped, not fatal.
        known = {f.name for f in fields(cls)}
        fds = dict(data.get("fds") or {})
        for key, name in _LEGACY_FDS.items():
            if isinstance(data.get(key), int) and data[key] >= 0:
                fds[name] = data[key]
        for key, prefix in _LEGACY_LISTS.items():
            names = STATE_NAMES if key == "state_fds" else [f"{prefix}{i}" for i in range(len(data.get(key) or []))]
            fds.update(zip(names, data.get(key) or []))
        return cls(**{k: v for k, v in data.items() if k in known and k != "fds"}, fds=fds)


class Worker:
    def __init__(self, cfg: Config, args: WorkerArgs, supervisor_pidfd: int = -1) -> None:
        cfg = _running_paths(cfg, args)
        self.cfg = cfg
        self.args = args
        self.mountpoint = cfg.device.mountpoint
        self.file = os.path.join(self.mountpoint, FILE_NAME.decode())
        self.held = HeldFds.adopt(args.fds)
        state = None
        size = cfg.device.size
        if self.held.state:
            # A takeover (rule 3): the device is what the state holds, even
            # if the config now says otherwise.
            state = State.attach(self.held.state)
            size = state.geometry.npages * PAGE_SIZE
            if size != cfg.device.size:
                log.warning(
                    "[device] size = %d in %s, but the running device is %d bytes; a new size needs a restart",
                    cfg.device.size,
                    cfg.path,
                    size,
                )
        algorithm, zstd_level = cfg.pool.algorithm, cfg.pool.zstd_level
        memory_limit, accept_percent = cfg.pool.memory_limit, cfg.pool.accept_percent
        if state is not None and not args.standby:
            # A takeover after a crash goes on with the settings in force,
            # `zswapd set` included; a reload (standby) applies the file.
            algorithm, zstd_level, memory_limit, accept_percent = _settings_in_force(
                state, algorithm, zstd_level, memory_limit, accept_percent
            )
        t = time.perf_counter()
        self.store = Store(
            size,
            Codec(algorithm, zstd_level),
            memory_limit=memory_limit,
            accept_percent=accept_percent,
            reserve_frames=cfg.pool.reserve // 4096,
            state=state,
            engine=cfg.pool.engine,
        )
        self._attach_backing(args.fds.get(BACKING, -1))
        self.store.tick(time.monotonic())  # idle stamps from the first request on
        if state is not None:
            log.info(
                "state attached, rebuilt and checked: %d pages in %.1f ms",
                self.store.c.pages_stored,
                (time.perf_counter() - t) * 1e3,
            )
        self.fs = FuseFS(self.store)
        self.fs.on_init = self._save_init
        self.p3: Any = None  # the pyfuse3 server, with [fuse] backend = "pyfuse3"
        self.threads: Any = None  # fuse.threads.FuseThreads, with the native engine
        self.compact_pauses: list[float] = []
        self.task_failures: Counter[str] = Counter()
        self.reloads = 0
        self.signals_ignored = 0
        self.last_recovery_ms: float | None = None
        self.nursery: trio.Nursery  # set by run(), before any task that uses it starts
        self.exit_code = 0
        self.link = SupervisorLink(
            args,
            self.held,
            supervisor_pidfd,
            self.mountpoint,
            self.file,
            lambda: cfg.control.socket,
            self._stop,
            lambda: self.cfg.writeback.file,
            self._handover_info,
        )
        self.controller = Controller(self.store, self.device_info, cfg.path, resolve_group(cfg.control.group))
        self.controller.metrics_access = cfg.control.metrics_access
        self.controller.extra_stats = self.extra_stats
        self.controller.replace_worker = self._ask_replace
        self.recompressor = Recompressor(
            self.store,
            lambda: self.cfg.recompress,
            lambda: self.cfg.compaction.watermark,
            threaded=self.store.engine.name == "native",
        )
        self.controller.recompressor = self.recompressor
        self.controller.set_recompress = self._set_recompress
        self.controller.writeback_pass = self.writeback_pass

    def device_info(self) -> dict[str, Any]:
        loops = swap.loops_backed_by(self.file)
        loop = loops[0] if loops else None
        return {
            "path": self.file,
            "size": self.store.size,
            "loop": loop,
            "mountpoint": self.mountpoint,
            "swap": loop is not None and swap.swap_used_kib(loop) is not None,
        }

    def extra_stats(self) -> dict[str, Any]:
        pauses = sorted(self.compact_pauses)
        p99 = pauses[int(len(pauses) * 0.99)] if pauses else 0.0
        return {
            "fuse_backend": self.cfg.fuse.backend,
            "discard_supported": self.p3 is None,
            "fuse_requests": self.p3.ops.requests if self.p3 else self.fs.requests,
            # FuseFS's error replies, and the ones the C threads wrote themselves.
            "fuse_errors": self.p3.ops.errors if self.p3 else self.fs.errors + self._thread_stat("errors"),
            "fuse_internal_errors": 0 if self.p3 else self.fs.internal_errors,
            "fuse_threads": self.threads.stats() if self.threads is not None else None,
            "control_internal_errors": self.controller.internal_errors,
            "compaction_step_p99_us": round(p99 * 1e6, 1),
            "task_failures": dict(self.task_failures),
            # Why [pool] engine = "auto" serves with Python ("" when it does
            # not): `zswapd status` calls that degraded.
            "engine_fallback": native_error()
            if self.cfg.pool.engine == "auto" and self.store.engine.name == "python"
            else "",
            "reloads": self.reloads,
            "signals_ignored": self.signals_ignored,
            "process": {
                **self.link.stats(),
                "worker_pid": os.getpid(),
                "worker_restarts": self.args.restarts,
                "last_recovery_ms": self.last_recovery_ms,
            },
        }

    def _tell(self, message: str, fds: list[int] | None = None) -> None:
        """A message to the supervisor over the channel."""
        self.link.tell(message, fds)

    def _ask_replace(self) -> None:
        """`zswapd reload`: the supervisor starts the new worker."""
        if self.link.state != "supervised":
            log.error("reload: no supervisor lives to start a new worker (%s); try again once one has adopted us",
                      self.link.state)  # fmt: skip
        self._tell("replace")

    def _stop(self, code: int) -> None:
        """End the worker after the request in hand, with exit status ``code``."""
        self.exit_code = code
        self.nursery.cancel_scope.cancel()

    def _handover_info(self) -> dict[str, object]:
        """What a new supervisor gets with our fds (handover.py)."""
        return {
            "worker_pid": os.getpid(),
            "worker_restarts": self.args.restarts,
            "supervisor_restarts": self.link.restarts,
            "mountpoint": self.mountpoint,
        }

    def _attach_backing(self, fd: int) -> None:
        """Serve and write back with the backing file ``fd`` the supervisor
        holds, if it is the one the state's pages were written to.  A file
        lost, another file, or one cut shorter is said loudly, never read
        as if it held our pages; the worker serves everything else either
        way (a worker dying here would only be started again, for ever,
        while every request waits)."""
        store, wb = self.store, self.cfg.writeback
        backed = store.c.bd_count
        was = store.state.load_backing()
        if fd < 0:
            if backed:
                log.critical(
                    "%d pages live in the backing file %s, but this worker was not given it (the supervisor's log "
                    "says why): reads of them fail with EIO; every other page is served",
                    backed,
                    _described(was),
                )
            return
        ident = backing.identity(fd)
        if backed and was is not None and ident != was:
            log.critical(
                "the backing file given is %s, not %s, which %d pages were written back to: not using it; reads "
                "of those pages fail with EIO, every other page is served",
                _described(ident),
                _described(was),
                backed,
            )
            return
        try:
            store.attach_backing(fd, ident[2], wb.file, wb.daily_limit)
        except (StateError, OSError, ValueError) as e:  # ValueError: a size no backing file has
            log.critical(
                "cannot use the backing file %s: %s; reads of the %d pages written back to it fail with EIO, "
                "every other page is served",
                wb.file or _described(ident),
                e,
                backed,
            )
            return
        store.state.save_backing(ident)

    # -- the task tree --------------------------------------------------------

    async def _guarded(self, name: str, fn: Callable[[], Awaitable[None]], retry: bool = True) -> None:
        """Run ``fn`` until it returns; if it raises, log, count and run it
        again after a back-off (rule 2), or with ``retry`` false not at all
        (a reload: the next SIGHUP asks again).  Cancellation passes through."""
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
                if not retry:
                    log.exception("task %s failed (failure %d)", name, self.task_failures[name])
                    return
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
                    "in the pool until overwritten, and the memory limit is reached sooner; use backend 'builtin'"
                )
        else:
            if not self.held.state:
                # This worker made the state: the supervisor holds it from
                # now on, before a single page is written.
                self.held.state = list(self.store.state.fds())
                self._tell("state", self.held.state)
            self.store.state.save_restarts(self.args.restarts)
            if self.args.takeover:
                self._take_over()
        log.info(
            "serving %s (%d MiB, %s, limit %s)",
            self.file,
            cfg.device.size >> 20,
            cfg.pool.algorithm,
            f"{cfg.pool.memory_limit >> 20} MiB" if cfg.pool.memory_limit else "none",
        )
        server = ControlServer(self.controller, cfg.control.socket)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(self.held.control)))
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._guarded, "fuse", self._serve_fuse)
                nursery.start_soon(self._guarded, "control", lambda: server.serve(sock))
                nursery.start_soon(self._guarded, "housekeeping", self._housekeeping)
                nursery.start_soon(self._guarded, "recompress", self.recompressor.run)
                if cfg.control.metrics_listen:
                    listen = cfg.control.metrics_listen
                    nursery.start_soon(
                        self._guarded, "metrics", lambda: serve_metrics(self.controller, listen, prometheus)
                    )
                nursery.start_soon(self._guarded, "signals", lambda: self._signals(signals))
                nursery.start_soon(self._guarded, "supervisor", self.link.run)
                self._tell("ready")
                while _EARLY_STOPS:
                    self._on_signal(_EARLY_STOPS.pop(0))
        sock.close()
        # For a supervisor that is not our parent: it sees no exit status.
        self._tell(f"exiting {self.exit_code}")
        return self.exit_code

    def _save_init(self, minor: int, max_readahead: int, flags: int) -> None:
        self.store.state.save_init(InitParams(minor, MAX_WRITE, max_readahead, flags, MAX_PAGES_COUNT, 1))

    def _take_over(self) -> None:
        """Rule 3: the state is attached and checked (in __init__); now the
        INIT an earlier worker answered, then RESEND."""
        init = self.store.state.load_init()
        if init is not None:
            self.fs.restore_init(init.minor)
        else:
            log.warning("the state holds no FUSE INIT: the kernel has not sent it yet, or it was lost")
        try:
            os.write(self.held.fuse, protocol.notify_resend())
        except OSError as e:
            # Before 6.9 (FUSE 7.40) there is no RESEND: a request the dead
            # worker had read stays unanswered.  Say so; serve the rest.
            log.error("FUSE_NOTIFY_RESEND refused (%s): requests in flight at the takeover may hang", e)
            return
        log.info("took over (restart %d): asked the kernel to resend unanswered requests", self.args.restarts)

    def _first_reply(self) -> None:
        if self.args.died_at_ns:
            self.last_recovery_ms = round((time.monotonic_ns() - self.args.died_at_ns) / 1e6, 3)
            log.info("first request served %.1f ms after the previous worker died", self.last_recovery_ms)

    async def _serve_fuse(self) -> None:
        if self.p3:
            await self.p3.serve()
        elif self.store.engine.name == "native":
            await self._serve_threads()
        else:
            await serve(self.held.fuse, self.fs, on_first_reply=self._first_reply)
        # The connection is gone (aborted, or unmounted with no user left):
        # nothing can be served any more.
        log.info("FUSE session ended")
        if not self.link.stopped_alone:  # unmounted by our own clean stop: exit 0
            self._stop(EXIT_CONNECTION_GONE)

    async def _serve_threads(self) -> None:
        """C threads serve READ, WRITE and discards without the GIL; every
        other request comes up to FuseFS.handle through a callback.  This
        task only watches them: it returns when the connection is gone, and
        stops them (each finishes its request) when cancelled."""
        from .fuse.threads import FuseThreads

        threads = self.cfg.fuse.serving_threads()
        self.threads = FuseThreads(self.held.fuse, self.fs, self.store.engine, threads, self.held.clones)
        log.info("serving FUSE with %d C threads on %d cloned fds", threads, self.threads.stats()["clones"])
        try:
            if self.args.died_at_ns:
                # Recovery ends at the first request served; the threads do
                # not call back for hot ones, so watch their counters.
                with trio.move_on_after(30):
                    while not self._thread_requests():
                        await trio.sleep(0.0005)
                    self._first_reply()
            while self.threads.stats()["alive"]:
                await trio.sleep(0.1)
        finally:
            # Shielded: the threads must be joined before the store closes.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.threads.stop)

    def _thread_requests(self) -> int:
        return self._thread_stat("served_in_c") + self._thread_stat("handed_up")

    def _thread_stat(self, name: str) -> int:
        return int(self.threads.stats()[name]) if self.threads is not None else 0

    # -- signals ----------------------------------------------------------------

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS:
            self.link.stop_signal(signum)
        elif signum in RELOAD_SIGNALS:
            log.info("%s: reloading %s", name, self.cfg.path)
            self.nursery.start_soon(self._guarded, "reload", self.reload, False)
        else:
            self.signals_ignored += 1
            log.info("%s ignored (zswapd stops only on SIGTERM or SIGINT; SIGHUP reloads the config)", name)

    # -- reload -----------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change at runtime."""
        try:
            new = config_mod.load(self.args.config_arg, strict=True)
            gid = resolve_group(new.control.group)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        runtime, restart = config_mod.diff(self.cfg, new)
        applied: list[str] = []
        group = new.control.group
        for section, key, value in runtime:
            if section == "pool" and (section, key) in config_mod.RUNTIME_KEYS.values():
                assert isinstance(value, int | str)
                warning = self.store.apply_setting(key, value).get("warning")
                if warning:
                    log.warning("%s", warning)
            elif (section, key) == ("control", "group"):
                if not self._set_group(gid):
                    group = self.cfg.control.group
                    continue
            elif (section, key) == ("control", "metrics_access"):
                self.controller.metrics_access = str(value)
            elif section == "log" and not self.args.verbose:
                logging.getLogger("zswapd").setLevel(config_mod.LOG_LEVELS[str(value)])
            applied.append(f"[{section}] {key} = {value!r}")
        # Only what was applied becomes the running configuration.
        self.cfg = replace(
            self.cfg,
            path=new.path,
            pool=replace(
                self.cfg.pool,
                **{k: getattr(new.pool, k) for s, k in config_mod.RUNTIME_KEYS.values() if s == "pool"},
            ),
            compaction=new.compaction,
            recompress=new.recompress,
            control=replace(self.cfg.control, group=group, metrics_access=new.control.metrics_access),
            log=new.log,
        )
        self.controller.config_path = new.path
        self.reloads += 1
        log.info("reloaded %s: %s", new.path, "; ".join(applied) if applied else "no runtime change")
        if restart:
            log.warning("changed but not applied until a restart: %s", ", ".join(restart))

    def _set_recompress(self, name: str, value: Any) -> None:
        """`zswapd set` of a [recompress] key: the policy reads it at its
        next round.  Kept until the next reload or restart (the file's
        value then applies)."""
        self.cfg = replace(self.cfg, recompress=replace(self.cfg.recompress, **{name: value}))

    def _set_group(self, gid: int | None) -> bool:
        """[control] group: the socket's group and mode, then who may read
        stats.  On the socket this worker serves (the path it is bound to,
        with the checks of set_socket_access), never on what the file now
        names.  False, and nothing changed, if that fails: the error is
        logged once; the next SIGHUP tries again."""
        try:
            set_socket_access(self.cfg.control.socket, gid)
        except (OSError, UnsafePath) as e:
            log.error("[control] group not applied: the control socket %s: %s", self.cfg.control.socket, e)
            return False
        self.controller.group_gid = gid
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
            store.tick(time.monotonic())
            store.refill_reserve()
            store.save_counters()
            if store.backed:
                await self._writeback_round()
            if not cc.background or not store.compaction_wanted(cc.waste_threshold, cc.watermark):
                continue
            steps = store.compact_steps(COMPACT_STEP_MOVES)
            try:
                while True:
                    t = time.perf_counter()
                    moved = next(steps, None)
                    self.compact_pauses.append(time.perf_counter() - t)
                    if len(self.compact_pauses) > 4096:
                        del self.compact_pauses[:2048]
                    if moved is None:
                        break
                    # An empty step means a writer took the slots: let it finish.
                    await trio.sleep(0 if moved else COMPACT_RETRY_PAUSE)
            finally:
                steps.close()

    async def _step(self, fn: Callable[[], Any]) -> Any:
        """A writeback or cleaning step: on a thread with the native engine
        (its disk I/O runs without the GIL, the FUSE threads go on), inline
        with the Python one (whose serving is this thread's)."""
        if self.store.engine.name == "native":
            return await trio.to_thread.run_sync(fn)
        result = fn()
        await trio.sleep(0)
        return result

    async def writeback_pass(self, max_pages: int, idle_age: int | None) -> tuple[int, int, str]:
        """`zswapd writeback`: steps until ``max_pages`` (0: every page the
        pass finds) idle at least ``idle_age`` seconds (None or 0: any) are
        written back or nothing more can be; compaction then gives back the
        frames they left.  Returns (pages, bytes, why it stopped early or "")."""
        store = self.store
        ticks = -(-(idle_age or 0) // entry.IDLE_TICK)
        pages = nbytes = 0
        stopped = ""
        while not max_pages or pages < max_pages:
            want = min(WRITEBACK_STEP_OBJECTS, max_pages - pages) if max_pages else WRITEBACK_STEP_OBJECTS
            moved, n = await self._step(functools.partial(store.writeback, want, 1 << 62, ticks))
            pages += moved
            nbytes += n
            if not moved:
                if store.daily_limit and store.written_today + backing.MAX_SPAN > store.daily_limit:
                    stopped = "the daily limit is spent"
                elif store.backing_full():
                    stopped = "the backing file is full"
                break
        for _moved in store.compact_steps(COMPACT_STEP_MOVES * 16):
            await trio.sleep(0)
        return pages, nbytes, stopped

    async def _writeback_round(self) -> None:
        """Background writeback and cleaning, each bounded per round
        (WRITEBACK_ROUND_BYTES of segment writes, CLEAN_ROUND_STEPS of
        cleaning): under pressure (usage
        over [compaction] watermark of the limit), write back until usage
        is WRITEBACK_HYSTERESIS points below it, within the daily limit;
        then clean when dead bytes pass CLEAN_DEAD_SHARE of what the file
        holds, or when free segments run short."""
        store, cc, wb = self.store, self.cfg.compaction, self.cfg.writeback
        left = WRITEBACK_ROUND_BYTES
        if wb.idle_age:
            # Pages idle that long go to the file whatever the pressure:
            # the pool keeps its room for what is hot (zram's idle writeback).
            ticks = -(-wb.idle_age // entry.IDLE_TICK)
            while left > 0:
                moved, nbytes = await self._step(
                    functools.partial(store.writeback, WRITEBACK_STEP_OBJECTS, left, ticks)
                )
                if not moved:
                    break
                left -= nbytes
        if store.memory_limit and store.mem_used_total * 100 >= store.memory_limit * cc.watermark:
            target = store.memory_limit * max(1, cc.watermark - WRITEBACK_HYSTERESIS) // 100
            while left > 0 and store.mem_used_total > target:
                moved, nbytes = await self._step(functools.partial(store.writeback, WRITEBACK_STEP_OBJECTS, left))
                if not moved:
                    break
                left -= nbytes
                await self._step(lambda: store.compact(COMPACT_STEP_MOVES * 16))
        for _ in range(CLEAN_ROUND_STEPS):
            if not store.cleaning_wanted(CLEAN_DEAD_SHARE):
                break
            moved, freed = await self._step(lambda: store.clean(WRITEBACK_STEP_OBJECTS))
            if not moved and not freed:
                break


def _settings_in_force(
    state: State, algorithm: str, zstd_level: int, memory_limit: int, accept_percent: int
) -> tuple[str, int, int, int]:
    """The runtime settings a dead worker left in the state header, where it
    has them and they are valid; the configured ones otherwise.  Logs what
    differs from the configuration, so the operator sees why.  A value the
    config schema refuses (a damaged header) is ignored with a warning: a
    takeover must not fail on it."""
    configured = {"algorithm": algorithm, "zstd_level": zstd_level,
                  "memory_limit": memory_limit, "accept_percent": accept_percent}  # fmt: skip
    saved: dict[str, object] = {}
    algo_id, level = state.codec()
    if 0 <= algo_id < len(ALGORITHMS):
        saved.update(algorithm=ALGORITHMS[algo_id], zstd_level=level)
    settings = state.load_settings()
    if settings is not None:
        saved.update(memory_limit=settings[0], accept_percent=settings[1])
    out: dict[str, Any] = dict(configured)
    kept = []
    for key, value in saved.items():
        try:
            check_value("the state header", "pool", key, value)
        except ConfigError as e:
            log.warning("ignoring %s; the config's %s stays", e, key)
            continue
        if value != configured[key]:
            kept.append(f"{key} {value} where the config says {configured[key]}")
            out[key] = value
    if kept:
        log.info("kept the settings in force before the takeover: %s (zswapd reload applies the file)", "; ".join(kept))
    return out["algorithm"], out["zstd_level"], out["memory_limit"], out["accept_percent"]


def worker_main(args: WorkerArgs, cfg: Config | None = None) -> int:
    """Entry point in a worker process, forked or freshly started."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _early)
    if cfg is None:
        setup_logging(args.verbose)
        no_core_dumps()
    try:
        if cfg is None:
            cfg = config_mod.load(args.config_arg, strict=True)
        harden(cfg.swap.enable)
        if args.standby and not _wait_for_go(args):
            return 0
        # Before anything slow: a supervisor that dies from here on is seen.
        supervisor = watch_pid(args.supervisor_pid, parent=True)
        worker = Worker(cfg, args, supervisor)
    except Exception as e:
        log.error("worker cannot start: %s", e)
        return 2
    try:
        return trio.run(worker.run)
    except Exception:
        log.exception("worker failed")
        return 1


def _wait_for_go(args: WorkerArgs) -> bool:
    """Standby (a reload's new worker): everything is imported and the
    config read; now wait until the old worker has exited.  Touching the
    state or /dev/fuse before that could serve a request twice."""
    chan = socket.socket(fileno=os.dup(args.channel_fd))
    try:
        chan.setblocking(True)
        chan.send(b"standby")
        msg = chan.recv(4096)
    except OSError:
        return False
    finally:
        chan.close()
    if not msg.startswith(b"go"):
        return False
    go = json.loads(msg[2:] or b"{}")
    args.died_at_ns = int(go.get("died_at_ns", args.died_at_ns))
    args.restarts = int(go.get("restarts", args.restarts))
    return True


def _described(ident: tuple[int, int, int] | None) -> str:
    """A backing file by its identity (backing.identity), for the log."""
    if ident is None:
        return "(unknown: the state does not name it)"
    dev, ino, size = ident
    return f"device {os.major(dev)}:{os.minor(dev)} inode {ino} ({size} bytes)"


def _running_paths(cfg: Config, args: WorkerArgs) -> Config:
    """``cfg`` with the paths of the device this worker serves: the
    mountpoint the supervisor resolved, and the path its control socket is
    bound to.  A fresh worker's file may name others; they take a restart,
    and the reload's diff reports them."""
    socket_path = cfg.control.socket
    if "control" in args.fds:
        with socket.socket(fileno=os.dup(args.fds["control"])) as bound:
            name = bound.getsockname()
        if isinstance(name, str) and name:
            socket_path = name
    mountpoint = args.mountpoint or cfg.device.mountpoint
    for key, running, named in (("[device] mountpoint", mountpoint, cfg.device.mountpoint),
                                ("[control] socket", socket_path, cfg.control.socket)):  # fmt: skip
        if running != named:
            log.warning("%s: %s = %r takes a restart; serving %s until then", cfg.path, key, named, running)
    return replace(
        cfg,
        device=replace(cfg.device, mountpoint=mountpoint),
        control=replace(cfg.control, socket=socket_path),
    )


# Stop signals that came before trio's receiver was open, handled once it is.
_EARLY_STOPS: list[int] = []


def _early(signum: int, frame: object) -> None:
    """Before trio's receiver is open: note a stop, ignore the rest."""
    if signum in STOP_SIGNALS:
        _EARLY_STOPS.append(signum)


def main_exec() -> int:
    """`python -m zswapd worker`, started by the supervisor's reload."""
    try:
        args = WorkerArgs.from_json(json.loads(os.environ.pop("ZSWAPD_WORKER")))
    except (KeyError, ValueError, TypeError):
        print(
            "zswapd worker: internal command, started by `zswapd run` with its fds; use `zswapd run`",
            file=sys.stderr,
        )
        return 2
    return worker_main(args)
