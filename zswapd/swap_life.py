"""The swap on the device, as the supervisor sets it up and takes it down:
attach a loop device with direct I/O (in a short-lived child), mkswap and
swapon; at stop swapoff, detach, and the loop devices others attached to our
file.  Every step opens or reads the FUSE file, which a worker must answer,
so each runs beside the supervisor's event loop (``wait``), which serves
signals and restarts a worker that dies meanwhile.  swap.py builds the
commands and does the ioctls; this file decides their order."""

from __future__ import annotations

import logging
import os
import select
import subprocess
from collections.abc import Callable

from . import swap
from .config import SwapConfig
from .held import HeldFds
from .systemd import fd_store, fd_store_remove, sd_notify

log = logging.getLogger("zswapd")


class SwapLife:
    def __init__(self, held: HeldFds, file: str, wait: Callable[[Callable[[], bool]], bool]) -> None:
        self.held = held  # the supervisor's: the loop device is held there
        self.file = file
        self.wait = wait
        self.on = False

    def _run(self, *argv: str) -> None:
        """Run a util-linux tool while the event loop goes on (it may need
        FUSE requests served, by a worker we may have to restart)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)
        self.wait(lambda: proc.poll() is not None)
        out, err = proc.communicate()
        if proc.returncode != 0:
            msg = (err or out).decode(errors="replace").strip()
            raise swap.SwapError(f"{' '.join(argv)} failed ({proc.returncode}): {msg}")

    def _attach(self) -> swap.Loop:
        """LOOP_CONFIGURE opens the FUSE file, which the worker must answer;
        run it in a short-lived child so the event loop goes on."""
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
            self.wait(exited)
        finally:
            os.close(pidfd)
        out = os.read(r, 4096).decode(errors="replace")
        os.close(r)
        if out.startswith("!") or not out:
            raise swap.SwapError(out[1:] or "attaching the loop device failed")
        # The child's fd closed; the device stays bound (no autoclear) until
        # we detach it.  Hold it open, for the fd store.
        return swap.Loop(out, os.open(out, os.O_RDWR | os.O_CLOEXEC))

    def up(self, cfg: SwapConfig, attached: Callable[[str], None]) -> None:
        """Attach (unless a loop device is held already: adopted), mkswap,
        swapon.  ``attached`` hears a new loop device's path."""
        if self.held.loop is None:
            sd_notify("STATUS=attaching loop device")
            self.held.loop = self._attach()
            fd_store("loop", self.held.loop.fd)
            attached(self.held.loop.path)
        loop = self.held.loop
        if not swap.dio_enabled(loop):
            log.warning("%s is not using direct I/O: swap pages will be cached twice", loop.path)
        self._run(*swap.mkswap_argv(loop.path))
        self._run(*swap.swapon_argv(loop.path, cfg.priority, cfg.discard))
        self.on = True
        log.info("swap on %s (priority %d, discard %s)", loop.path, cfg.priority, cfg.discard)

    def down(self) -> bool:
        """swapoff and detach ours, then any loop device others attached to
        our file.  False if a swapoff failed: the caller keeps serving,
        because exiting now would take live swap pages with it."""
        loop = self.held.loop
        if self.on and loop:
            log.info("swapoff %s: bringing its pages back into memory", loop.path)
            try:
                self._run(*swap.swapoff_argv(loop.path))
            except swap.SwapError as e:
                if swap.swap_used_kib(loop.path) is not None:
                    log.error("%s; still serving. Free some memory and send SIGTERM again.", e)
                    return False
            self.on = False
        if loop:
            fd_store_remove("loop")
            # Our own fd first: while any fd is open, LOOP_CLR_FD only defers
            # the detach to the last close, and detach_sync would wait it out.
            self.held.close_loop()
            swap.detach_sync(loop.path)
            log.info("detached %s", loop.path)
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
        return True
