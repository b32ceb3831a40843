"""The supervisor: the main process of `zswapd run`.

It holds what must outlive any worker (held.HeldFds), and does nothing that
could fail on a page's contents.  A bug in the pool, the codec or a client
handler kills a worker; the supervisor starts the next one on the same fds
within milliseconds, and every process with pages in our swap goes on as if
nothing happened.

Glossary
--------
worker      the process that serves: FUSE session, control socket, metrics,
            compaction (worker.py).  Forked from the supervisor after a
            crash (fast: the modules are already imported); started as a
            fresh interpreter by `zswapd reload`, so an upgrade runs the code
            installed now.
held fds    /dev/fuse and its clones, the state memfds, the control socket,
            the loop device, the instance lock (held.py names them all).
            The supervisor holds them for its whole life and hands every
            one but the loop device to each worker.
takeover    a new worker attaching to the held fds: it rebuilds the volatile
            indexes from the state, restores the negotiated FUSE INIT and
            only then sends FUSE_NOTIFY_RESEND, so that every request the
            dead worker had read but not answered is delivered again.
channel     a SOCK_SEQPACKET socket between worker and supervisor.  Worker
            to supervisor: "state" with the memfds (the first worker makes
            them, so that geometry and pool code stay out of this process),
            "ready", "standby", "replace", "stop" (it got SIGTERM from
            outside), "exiting N".  Supervisor to worker: "stop", "loop
            PATH", "adopted {...}", and a reload's "go {...}".
start       how this supervisor started (stats process.supervisor_start):
            "shell" (`zswapd run` from anywhere but a service manager),
            "service" (under systemd, first start or a restart with the fd
            store), "adopted" (started by a worker whose supervisor died).

Who restarts whom
-----------------
- A worker dies: its supervisor forks the next one (a takeover), with or
  without systemd.  An adopted supervisor watches the worker that started
  it by pidfd (it is not that worker's parent), and takes over the same way.
- The supervisor dies under systemd (NOTIFY_SOCKET; the fd store holds the
  fds): systemd kills the worker, then starts a new supervisor with the fds
  (LISTEN_FDS), which takes over with a new worker.  The worker never starts
  a supervisor there.
- The supervisor dies outside systemd: the worker sees it at once (a pidfd
  on it, polled in the worker's event loop), starts `zswapd run --adopt`
  in its own session and hands it every fd by name (handover.py).  The new
  supervisor adopts them through the path systemd's fds take, and the
  worker serves on without a pause.
- So any one process of the pair may be killed at any moment, then the
  other once the first is replaced, and no page is lost.  What no one can
  cover: both at once (systemctl kill, or a kill in the milliseconds before
  the survivor has passed the fds on); then the next `zswapd run` cleans up.

The rules
---------
1. /dev/fuse and the state memfds are never closed while swap is on, except
   after a successful swapoff: not by the supervisor (it holds them for its
   whole life), not by a worker (it exits only when a supervisor lives to
   take over, or after its own swapoff: worker.py, rule 1).
2. A new worker is started only once the old one has fully exited (reaped,
   or its pidfd readable when it is not our child): a RESEND while the old
   worker still runs could serve a request twice.
3. The state memfds are mapped here and every page they hold is mlocked
   here (state_mlock.py), so that no page of state is reclaimable between
   two workers.
4. The supervisor runs one thread.  It forks workers, and a fork from a
   multi-threaded process can inherit a lock held by another thread.
5. Every process that serves holds the instance lock: a worker gets the
   lock fds with the others (forked or started afresh), so while any
   process of an instance lives, no other instance starts, and none takes
   its mount for a dead one.  The lock is released only by the last close.
6. Only installed code runs: the supervisor leaves the directory it was
   started from first thing (process.settle); a fresh worker is `python -I
   -m zswapd worker`, an adopted supervisor `python -I -m zswapd run`.
7. Signals: SIGTERM and SIGINT shut down (swapoff while the worker serves,
   detach, unmount; a failed swapoff keeps serving until the next SIGTERM).
   A worker that gets SIGTERM from outside asks us ("stop"): we shut down
   once (`pkill zswapd` is one clean stop, no takeover), or under systemd
   say to use systemctl, which would restart us.  We stop a worker with
   "stop" on the channel, never a signal.  SIGHUP is forwarded to the
   worker, which reloads the config.  The rest of process.py's ignored
   signals are logged and ignored here too.  Workers run in their own
   process group, so a terminal's Ctrl-C or hang-up reaches only the
   supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import handover as handover_mod
from . import swap
from .config import Config
from .fuse import mount as fmount
from .fuse.protocol import FILE_NAME
from .held import BACKING, CLONE_PREFIX, FUSE, STATE_NAMES, HeldFds
from .process import EXIT_CONNECTION_GONE, IGNORED_SIGNALS, StartupError, worker_argv
from .startup import open_backing, reopen_backing, write_owner
from .state import read_backing, read_restarts, read_supervisor_restarts, write_supervisor_restarts
from .state_mlock import LockedMapping
from .swap_life import SwapLife
from .systemd import fd_store, fd_store_remove, sd_notify, under_service_manager

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
# A worker that does not exit within this after "stop" is killed.
WORKER_STOP_TIMEOUT = 10.0

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*SHUTDOWN_SIGNALS, signal.SIGHUP, *IGNORED_SIGNALS, signal.SIGCHLD)


@dataclass
class Child:
    """A worker process as the supervisor sees it."""

    pid: int
    pidfd: int
    channel: socket.socket
    started: float
    ready: bool = False  # "ready" (serving), or for a reload's new worker "standby"
    # Not our child (the worker that started an adopted supervisor): watched
    # by its pidfd, its exit status only what it said ("exiting N").
    foreign: bool = False
    said_exit: int | None = None

    def close(self) -> None:
        os.close(self.pidfd)
        self.channel.close()

    def tell(self, message: str) -> None:
        try:
            self.channel.send(message.encode())
        except OSError as e:
            log.error("cannot tell worker %d %r: %s", self.pid, message.split(" ")[0], e)


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        config_arg: str | None,
        start: str = "shell",
        adopted: dict[str, int] | None = None,
        handover: tuple[handover_mod.Handover, socket.socket] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_arg = config_arg
        self.start = start
        self.adopted = adopted or {}
        self.handover = handover
        self.mountpoint = cfg.device.mountpoint
        self.file = os.path.join(self.mountpoint, FILE_NAME.decode())
        self.held = HeldFds()
        self.torn_down = False  # swap off and unmounted: nothing of the device is left to serve
        self.locked: list[LockedMapping] = []
        self.mounted = False
        self.swap = SwapLife(self.held, self.file, self._wait)
        self.worker: Child | None = None
        self.spare: Child | None = None  # a reload's new worker, until it takes over
        self.worker_restarts = 0
        self.supervisor_restarts = 0
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
            fds=self.held.for_worker(),
            channel_fd=channel_fd,
            mountpoint=self.mountpoint,
            loop=self.held.loop.path if self.held.loop else "",
            restarts=self.worker_restarts,
            died_at_ns=self.died_at_ns,
            supervisor_pid=os.getpid(),
            supervisor_restarts=self.supervisor_restarts,
            supervisor_start=self.start,
            service=under_service_manager(),
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
        inherit = [*args.fds.values(), args.channel_fd]
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
                    if self.held.loop:
                        os.close(self.held.loop.fd)  # the supervisor's alone (held.py)
                    rc = worker.worker_main(args, self.cfg)
                finally:
                    os._exit(rc)
        theirs.close()
        child = Child(pid, os.pidfd_open(pid), ours, time.monotonic())
        log.info("worker %d started%s", pid, " (takeover)" if args.takeover else "")
        return child

    def _watch_handed_over(self) -> Child:
        """An adopted supervisor's first worker: the live one that handed
        the fds over.  Not our child; watched by the pidfd it sent."""
        assert self.handover is not None
        h, sock = self.handover
        sock.setblocking(False)
        pid = int(h.info.get("worker_pid", 0))
        c = Child(pid, h.worker_pidfd, sock, time.monotonic(), ready=True, foreign=True)
        self.handover = None
        info = {
            "supervisor_pid": os.getpid(),
            "supervisor_restarts": self.supervisor_restarts,
            "supervisor_start": self.start,
        }
        c.tell("adopted " + json.dumps(info))
        log.info("watching worker %d, which handed its fds over", pid)
        return c

    def _read_channel(self, c: Child) -> None:
        while True:
            try:
                msg, anc, _, _ = c.channel.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except OSError:  # nothing more now, or the worker is gone
                return
            if not msg:
                return
            self._on_message(c, msg.decode(errors="replace"), handover_mod.received_fds(anc))

    def _on_message(self, c: Child, msg: str, fds: list[int]) -> None:
        word, _, rest = msg.partition(" ")
        if word == "state":
            if self.held.state or c is not self.worker:
                log.error("worker %d sent state fds, but the state is already held; ignoring them", c.pid)
                for fd in fds:
                    os.close(fd)
                return
            self.held.state = fds
            self.locked = [LockedMapping(fd) for fd in fds]
            self._lock_state()
            write_supervisor_restarts(fds[0], self.supervisor_restarts)
            for name, fd in zip(STATE_NAMES, fds):
                fd_store(name, fd)
        elif word == "ready":
            c.ready = True
            self.ever_served = True
        elif word == "standby":
            c.ready = True
        elif word == "replace":
            log.info("worker %d asks to be replaced by one running the installed code", c.pid)
            self.replace_requested = True
        elif word == "stop":
            if under_service_manager():
                log.warning("worker %d got SIGTERM from outside; not stopping: stop the service instead "
                            "(systemctl stop zswapd), which would restart us", c.pid)  # fmt: skip
            elif not self.shutdown_requested:
                log.info("worker %d got SIGTERM from outside: shutting down", c.pid)
                self.shutdown_requested = True
        elif word == "exiting" and rest.lstrip("-").isdigit():
            c.said_exit = int(rest)
        else:
            log.warning("unknown message from worker %d: %r", c.pid, msg[:80])

    def _exited(self, c: Child) -> int | None:
        """``c``'s exit status once it has exited (rule 2), else None.  For
        a worker not ours, what it said; SIGKILL if it said nothing."""
        if c.foreign:
            if not select.select([c.pidfd], [], [], 0)[0]:
                return None
            self._read_channel(c)
            return c.said_exit if c.said_exit is not None else -signal.SIGKILL
        try:
            pid, status = os.waitpid(c.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def _reap(self, c: Child) -> None:
        code = self._exited(c)
        if code is None:
            return
        pid = c.pid
        if c is self.worker:
            self.died_at_ns = time.monotonic_ns()
            self._lock_state()  # before anything else: nothing of the state may be evicted now (rule 3)
        self._read_channel(c)  # a "state" sent just before dying
        c.close()
        how = _how(code) + (" (as it said; not our child)" if c.foreign and c.said_exit is not None else "")
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
            self.swap.on = False
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
            c.tell("stop")
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
        spare.tell("go " + json.dumps({"died_at_ns": self.died_at_ns, "restarts": self.worker_restarts}))

    def _lock_state(self) -> None:
        self.next_lock_scan = time.monotonic() + LOCK_SCAN_INTERVAL
        for m in self.locked:
            m.lock_resident()

    def _teardown(self) -> bool:
        """swapoff, detach, unmount.  False if swapoff failed: we keep
        serving, because exiting now would take live swap pages with us."""
        if not self.swap.down():
            return False
        self._tell_loop("")  # gone: a handover must not pass on a loop device now someone else's
        for name in self.held.stored():
            fd_store_remove(name)  # nothing left for a restart to take over
        self.torn_down = True  # the backing file goes with the rest (_close)
        if self.mounted:
            lazy = not fmount.unmount(self.mountpoint)
            self.mounted = False
            log.info("unmounted %s%s", self.mountpoint, " (lazily: still busy)" if lazy else "")
        return True

    # -- life ------------------------------------------------------------------------

    def _adopt(self) -> None:
        """A supervisor that died left its fds: in systemd's fd store
        (LISTEN_FDS), or with the worker that handed them to us.  The mount,
        the state and (with swap) the loop device and the swap area are still
        live: the worker that handed them over serves on, or under systemd
        the first worker takes over."""
        a = self.adopted
        held = HeldFds.adopt(a)
        held.lock = held.lock or self.held.lock
        self.held = self.swap.held = held
        source = f"worker {self.handover[0].info.get('worker_pid')}" if self.handover else "systemd's fd store"
        log.warning("taking over from a supervisor that died: %s from %s", ", ".join(sorted(a)), source)
        # Unmounted at the end only if it is ours: if the config now names
        # another mountpoint, that one may hold someone else's mount.
        self.mounted = fmount.mount_type(self.mountpoint) == "fuse.zswapd"
        if not self.mounted:
            log.error(
                "%s handed back the FUSE connection, but %s holds no zswapd mount (was [device] mountpoint "
                "changed?); serving the connection anyway, since swap may be on it",
                source,
                self.mountpoint,
            )
        if self.held.state:
            self.locked = [LockedMapping(fd) for fd in self.held.state]
            self._lock_state()
            if self.held.backing < 0:
                self._reopen_backing(source)
        if self.held.loop:
            self.swap.on = swap.swap_used_kib(self.held.loop.path) is not None
        meta = self.held.state[0] if self.held.state else -1
        self.supervisor_restarts = read_supervisor_restarts(meta) + 1 if meta >= 0 else 0
        if meta >= 0:
            write_supervisor_restarts(meta, self.supervisor_restarts)
        if self.handover:
            self.worker_restarts = int(self.handover[0].info.get("worker_restarts", 0))
            write_owner(self.held.lock)
        else:
            # A worker killed together with the old supervisor had its state,
            # or none was made yet (nothing was written: a fresh store is right).
            self.worker_restarts = read_restarts(meta) + 1 if meta >= 0 else 0
            self.died_at_ns = time.monotonic_ns()
        self.ever_served = meta >= 0

    def _reopen_backing(self, source: str) -> None:
        """The state names a backing file its pages were written back to,
        but ``source`` did not hand its fd back: open that very file again
        by its path (never created, truncated or allocated: run() does that
        only for a new state), or say loudly why not.  Its pages are then
        unreadable (EIO, worker.py) and every other page is served."""
        want = read_backing(self.held.state[0])
        if want is None:
            return  # no page was ever written back
        try:
            self.held.backing = reopen_backing(self.cfg, want)
        except StartupError as e:
            log.critical("%s handed back no backing file, and pages were written back to one: %s", source, e)
            return
        fd_store(BACKING, self.held.backing)
        log.warning(
            "%s handed back no backing file: reopened %s, the very file the pages were written back to",
            source,
            self.cfg.writeback.file,
        )

    def _tell_loop(self, path: str) -> None:
        if self.worker is not None:
            self.worker.tell("loop " + path)

    def _clone_fuse(self) -> None:
        """One clone per serving thread, made once, here, and kept: a worker
        never makes its own (see held.py)."""
        while len(self.held.clones) < self.cfg.fuse.serving_threads():
            try:
                fd = fmount.clone_fuse(self.held.fuse)
            except OSError as e:
                log.warning("cannot clone the FUSE connection (%s): serving threads share one fd", e)
                return
            fd_store(f"{CLONE_PREFIX}{len(self.held.clones)}", fd)
            self.held.clones.append(fd)

    def _serving(self) -> bool:
        return self.worker is not None and self.worker.ready

    def status(self) -> str:
        loop = self.held.loop
        return f"serving {self.file}" + (f" as swap on {loop.path}" if loop else "")

    def run(self) -> int:
        from .control import bind_control_socket, resolve_group

        cfg = self.cfg
        rc = 0
        try:
            if self.adopted:
                self._adopt()
            elif cfg.fuse.backend == "builtin":
                self.held.fuse = fmount.open_fuse()
                fmount.mount(self.held.fuse, self.mountpoint)
                self.mounted = True
                fd_store(FUSE, self.held.fuse)
            if self.held.fuse >= 0:
                self._clone_fuse()
            if self.held.control < 0:
                sock = bind_control_socket(cfg.control.socket, resolve_group(cfg.control.group))
                self.held.control = sock.detach()
                fd_store("control", self.held.control)
            if cfg.writeback.enable and self.held.backing < 0 and not self.held.state:
                self.held.backing = open_backing(cfg)
                fd_store(BACKING, self.held.backing)
                log.info("backing file %s: %d MiB", cfg.writeback.file, cfg.writeback.size >> 20)
            self.worker = self._watch_handed_over() if self.handover else self._spawn(fresh=False)
            if not self._wait(lambda: self._serving() or self.shutdown_requested or self.connection_gone):
                return 1
            if cfg.fuse.backend == "pyfuse3":
                self.mounted = fmount.is_mountpoint(self.mountpoint)
            if cfg.swap.enable and not self.swap.on and not self.shutdown_requested and not self.connection_gone:
                try:
                    self.swap.up(cfg.swap, self._tell_loop)
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
        if self.swap.on:
            # Unreachable by the rules above; say so loudly if it ever is.
            loop = self.held.loop
            log.critical("exiting with swap still on %s: its pages are lost", loop.path if loop else "?")
        self._stop_worker()
        if self.held.control >= 0:
            try:
                os.unlink(_bound_path(self.held.control) or self.cfg.control.socket)
            except OSError:
                pass
        if self.mounted:
            fmount.unmount(self.mountpoint)
            self.mounted = False
        for m in self.locked:
            m.close()
        self.locked = []
        if self.torn_down and self.held.backing >= 0:
            path = self.cfg.writeback.file
            try:
                if not self.held.remove_backing_file(path):
                    log.warning("the backing file held is no longer at %s (removed, replaced, or the config names "
                                "another path now): nothing removed", path or "[writeback] file")  # fmt: skip
            except OSError as e:
                log.warning("cannot remove the backing file %s: %s", path, e)
        self.held.close()


def _bound_path(fd: int) -> str:
    """The path the socket ``fd`` is bound to, or ""."""
    with socket.socket(fileno=os.dup(fd)) as s:
        name = s.getsockname()
    return name if isinstance(name, str) else ""


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
