"""The worker's side of mutual supervision: its channel to the supervisor,
a watch on the supervisor's life, the handover of every fd to a new
supervisor when it dies outside systemd, and the clean stop a worker runs
itself when no supervisor lives (supervisor.py, "who restarts whom").

States
------
supervised     a supervisor lives (watched by a pidfd) and the channel to
               it works.  SIGTERM from outside is passed on as "stop": the
               supervisor decides (one clean stop for `pkill zswapd`).
               SIGINT is ignored (a terminal's Ctrl-C reaches the supervisor).
handing-over   the supervisor died; a new one is starting with our fds.  A
               SIGTERM or SIGINT now is kept and passed on once it adopts.
alone          no supervisor, and none coming: under systemd (which restarts
               it and kills us first), with the pyfuse3 backend (nothing to
               take over), or while a new one cannot be started (retried
               with a back-off).  SIGTERM or SIGINT runs the whole clean
               stop here: swapoff while still serving, detach, unmount.  A
               swapoff that fails leaves us serving, and says so.

The rule this file keeps: a worker never exits with swap on unless a
supervisor lives to take over (worker.py, rule 1).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import handover, swap
from .fuse import mount as fmount
from .held import LOOP, HeldFds
from .process import adopt_argv

if TYPE_CHECKING:
    from .worker import WorkerArgs

log = logging.getLogger("zswapd")

# A new supervisor answers "adopted" once it watches us: an interpreter
# start and an import, well under a second on a busy machine.
ADOPT_TIMEOUT = 30.0
# Between failed starts of a new supervisor (a config it refuses, no
# memory for a process): doubling up to the cap, for as long as it fails.
HANDOVER_BACKOFF = 0.1
HANDOVER_BACKOFF_MAX = 5.0
# Polling the new supervisor for its answer or its death.
ADOPT_POLL = 0.005
# Variables a new supervisor must not inherit: it is no service's main
# process (NOTIFY_SOCKET would make it send READY as one), and a worker's
# own environment is not its.
_NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "ZSWAPD_WORKER", "WATCHDOG_PID")


def watch_pid(pid: int, parent: bool) -> int:
    """A pidfd on ``pid``, or -1 if it is gone.  With ``parent``, only while
    it is still our parent: a pid reused after its death is not it."""
    if pid <= 0:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    if parent and os.getppid() != pid:
        os.close(fd)
        return -1
    return fd


class SupervisorLink:
    def __init__(
        self,
        args: WorkerArgs,
        held: HeldFds,
        pidfd: int,
        mountpoint: str,
        file: str,
        control_path: Callable[[], str],
        on_stop: Callable[[int], None],
        backing_path: Callable[[], str],
        info: Callable[[], dict[str, object]],
    ) -> None:
        self.args = args
        self.held = held
        self.pid = args.supervisor_pid
        self.pidfd = pidfd
        self.restarts = args.supervisor_restarts
        self.start = args.supervisor_start
        self.loop_path = args.loop
        self.mountpoint = mountpoint
        self.file = file
        self.control_path = control_path
        self.backing_path = backing_path  # [writeback] file, removed at a stop alone if it is the one held
        self.on_stop = on_stop  # ends the worker with this exit status
        self.info = info  # what a new supervisor gets besides the fds
        self.channel: socket.socket | None = None
        if args.channel_fd >= 0:
            self.channel = socket.socket(fileno=args.channel_fd)
            self.channel.setblocking(False)
        self.channel_open = self.channel is not None
        self._channel_changed = trio.Event()
        # Supervised until we see it gone; one that died before we could
        # watch it (pidfd -1) is seen gone at the start of run().
        self.state = "supervised" if args.supervisor_pid > 0 else "alone"
        self.stop_asked = False  # a SIGTERM passed on, that the supervisor has not acted on yet
        self.stop_wanted = False
        self.starting = False  # a new supervisor is starting: a SIGTERM waits for it
        self.stopping_alone = False
        self.stopped_alone = False  # swap off, detached, unmounted by us: the session's end is ours
        self.child: subprocess.Popen[bytes] | None = None  # a supervisor we started
        self.nursery: trio.Nursery | None = None

    # -- the channel --------------------------------------------------------------

    def tell(self, message: str, fds: list[int] | None = None) -> None:
        """A message to the supervisor, if one is there to hear it."""
        if self.channel is None or not self.channel_open:
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self.channel.sendmsg([message.encode()], anc)
        except OSError as e:
            log.error("cannot reach the supervisor (%s): %s", message.split(" ")[0], e)

    async def _read_channel(self) -> None:
        while True:
            chan = self.channel
            if chan is None or not self.channel_open:
                await self._channel_changed.wait()
                continue
            try:
                await trio.lowlevel.wait_readable(chan)
            except trio.ClosedResourceError:
                continue
            if chan is not self.channel:
                continue
            try:
                msg = chan.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                msg = b""
            if not msg:
                self.channel_open = False  # the supervisor is gone: _watch will see to it
                continue
            self._on_message(msg.decode(errors="replace"))

    def _on_message(self, msg: str) -> None:
        word, _, rest = msg.partition(" ")
        if word == "stop":
            log.info("worker stopping (asked by the supervisor)")
            self.on_stop(0)
        elif word == "loop":
            self.loop_path = rest.strip()
        else:
            log.warning("unknown message from the supervisor: %r", msg[:80])

    def _set_channel(self, chan: socket.socket) -> None:
        old = self.channel
        if old is not None:
            trio.lowlevel.notify_closing(old)
            old.close()
        self.channel, self.channel_open = chan, True
        self._channel_changed.set()
        self._channel_changed = trio.Event()

    # -- the supervisor's life --------------------------------------------------------

    async def run(self) -> None:
        """The task: read the channel, watch the supervisor, and when it
        dies start the next one (or stand alone)."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._read_channel)
            while True:
                if self.pidfd >= 0:
                    await trio.lowlevel.wait_readable(self.pidfd)
                if self.state == "supervised":
                    self._supervisor_gone()
                if self.state == "alone":
                    await trio.sleep_forever()
                await self._hand_over()

    def _supervisor_gone(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd = -1
        if self.child is not None and self.child.pid == self.pid:
            self.child.poll()  # ours: reap it
        self.channel_open = False
        if self.args.service:
            log.warning("supervisor %d died; the service manager restarts it", self.pid)
            self.state = "alone"
        elif self.held.fuse < 0:
            log.error("supervisor %d died; with no FUSE connection held there is nothing to hand over", self.pid)
            self.state = "alone"
        else:
            log.error("supervisor %d died; starting a new one and handing it our fds", self.pid)
            self.state = "handing-over"
        self.pid = 0
        if self.stop_asked and not self.args.service:
            # It died before acting on our SIGTERM: the next one (or we) will.
            self.stop_wanted = True
        if self.state == "alone" and self.stop_wanted:
            self._stop_alone_soon()

    async def _hand_over(self) -> None:
        """Start a new supervisor until one adopts us; a SIGTERM meanwhile
        is passed on to it, or if none can be started, stops us alone."""
        delay = HANDOVER_BACKOFF
        while not self.stop_wanted:
            try:
                self.starting = True
                child, ours = self._start_supervisor()
            except (OSError, handover.HandoverError) as e:
                log.error("cannot start a new supervisor: %s", e)
            else:
                if await self._adopted(child, ours):
                    return
            finally:
                self.starting = False
            if not self.stop_wanted:
                log.error("still without a supervisor; trying again in %.1f s", delay)
                await trio.sleep(delay)
                delay = min(delay * 2, HANDOVER_BACKOFF_MAX)
        self.state = "alone"
        self._stop_alone_soon()

    def _start_supervisor(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Hand every fd over on a new socket, then start the supervisor
        that will read them (handover.py: sent first, so that the socket
        holds them from the start)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        extra: list[int] = []
        try:
            named = self.held.for_worker()
            if self.loop_path:
                with contextlib.suppress(OSError):
                    extra.append(os.open(self.loop_path, os.O_RDWR | os.O_CLOEXEC))
                    named[LOOP] = extra[-1]
            extra.append(os.pidfd_open(os.getpid()))
            handover.send(ours, named, extra[-1], self.info())
        except BaseException:
            ours.close()
            theirs.close()
            raise
        finally:
            for fd in extra:
                os.close(fd)
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        argv = adopt_argv(theirs.fileno(), self.args.config_arg, self.args.verbose)
        try:
            child = subprocess.Popen(argv, pass_fds=[theirs.fileno()], start_new_session=True, cwd="/", env=env,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        log.info("supervisor %d started with our fds", child.pid)
        return child, ours

    async def _adopted(self, child: subprocess.Popen[bytes], ours: socket.socket) -> bool:
        """Wait for ``child``'s "adopted"; True once it watches us."""
        pidfd = os.pidfd_open(child.pid)
        answer = b""
        with trio.move_on_after(ADOPT_TIMEOUT):
            while not answer:
                ready = select.select([ours.fileno(), pidfd], [], [], 0)[0]
                if ours.fileno() in ready:
                    try:
                        answer = ours.recv(4096) or b"!"
                    except OSError:
                        answer = b"!"
                elif pidfd in ready:
                    answer = b"!"
                else:
                    await trio.sleep(ADOPT_POLL)
        if answer.startswith(b"adopted"):
            info = json.loads(answer[len(b"adopted") :] or b"{}")
            ours.setblocking(False)
            self._set_channel(ours)
            self.child, self.pid, self.pidfd = child, child.pid, pidfd
            self.restarts = int(info.get("supervisor_restarts", self.restarts + 1))
            self.start = str(info.get("supervisor_start", "adopted"))
            self.state = "supervised"
            log.info("supervisor %d adopted us (supervisor restart %d)", child.pid, self.restarts)
            if self.stop_wanted:
                self.tell("stop")
            return True
        log.error("new supervisor %d did not adopt us (%s)", child.pid, "it exited" if answer else "no answer")
        with contextlib.suppress(OSError):
            child.kill()
        child.wait()
        os.close(pidfd)
        ours.close()
        return False

    # -- stopping ---------------------------------------------------------------

    def stop_signal(self, signum: int) -> None:
        """SIGTERM or SIGINT from outside (the supervisor stops us with
        "stop"): see the states above."""
        name = signal.Signals(signum).name
        if self.state == "supervised":
            if signum == signal.SIGINT:
                log.info("SIGINT ignored (the supervisor decides when to stop)")
                return
            log.info("%s from outside: asking supervisor %d to stop zswapd", name, self.pid)
            self.stop_asked = True
            self.tell("stop")
        elif self.state == "handing-over" and self.starting:
            log.info("%s while a new supervisor starts: asking it to stop zswapd once it has our fds", name)
            self.stop_wanted = True
        else:  # alone, or between two failed starts of a supervisor
            self.state = "alone"
            log.info("%s with no supervisor: stopping alone (swapoff, detach, unmount)", name)
            self.stop_wanted = True
            self._stop_alone_soon()

    def _stop_alone_soon(self) -> None:
        if not self.stopping_alone and self.nursery is not None:
            self.nursery.start_soon(self._stop_alone)

    async def _stop_alone(self) -> None:
        """The supervisor's clean stop, run here: swapoff while serving,
        detach, unmount.  A swapoff that fails keeps us serving."""
        self.stopping_alone = True
        try:
            for dev in swap.loops_backed_by(self.file):
                if swap.swap_used_kib(dev) is not None:
                    log.info("swapoff %s: bringing its pages back into memory", dev)
                    r = await trio.run_process(swap.swapoff_argv(dev), capture_stdout=True, capture_stderr=True,
                                               check=False)  # fmt: skip
                    if r.returncode != 0 and swap.swap_used_kib(dev) is not None:
                        why = (r.stderr or r.stdout).decode(errors="replace").strip()
                        log.error("swapoff %s failed (%s); still serving. Free some memory and send SIGTERM again.",
                                  dev, why)  # fmt: skip
                        self.stop_wanted = False
                        return
                await trio.to_thread.run_sync(swap.detach_sync, dev)
                log.info("detached %s", dev)
            self.stopped_alone = True
            if fmount.mount_type(self.mountpoint) == "fuse.zswapd":
                at_once = await trio.to_thread.run_sync(fmount.unmount, self.mountpoint)
                log.info("unmounted %s%s", self.mountpoint, "" if at_once else " (lazily: still busy)")
            with contextlib.suppress(OSError):
                os.unlink(self.control_path())
            try:
                if self.held.remove_backing_file(self.backing_path()):
                    log.info("removed the backing file %s", self.backing_path())
            except OSError as e:
                log.warning("cannot remove the backing file %s: %s", self.backing_path(), e)
            log.info("stopped alone, cleanly")
            self.on_stop(0)
        finally:
            self.stopping_alone = False

    def stats(self) -> dict[str, object]:
        return {"supervisor_pid": self.pid, "supervisor_restarts": self.restarts, "supervisor_start": self.start}
