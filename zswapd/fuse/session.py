"""The trio loop that moves requests between /dev/fuse and a FuseFS."""

from __future__ import annotations

import errno
import logging
import os
import time

import trio

from .protocol import READ_BUFFER, FuseFS

log = logging.getLogger("zswapd.fuse")

# Longest stretch of serving before other tasks (control, compaction) get a
# turn; a checkpoint costs microseconds, a 1 MiB write about a millisecond.
_SLICE = 0.002
# After a reply, poll /dev/fuse this long before sleeping in epoll.  The next
# request of a synchronous caller arrives tens of microseconds later, and the
# wake-up through epoll and trio's scheduler costs more than that.  Measured
# with dd through the loop device (median of 7): 128 KiB reads 443 -> 581 MB/s
# at 200 us; with sched_yield() in the loop it was slower.  The cost is at
# most 200 us of CPU per request, only while requests are flowing.
_SPIN = 200e-6


async def serve(fd: int, fs: FuseFS) -> None:
    """Serve until the connection goes away (ENODEV) or DESTROY arrives."""
    buf = bytearray(READ_BUFFER)  # one buffer for the life of the session
    view = memoryview(buf)
    last = time.perf_counter()
    spin_until = 0.0
    while not fs.destroyed:
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            if time.perf_counter() < spin_until:
                continue
            await trio.lowlevel.wait_readable(fd)
            continue
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted and the last user gone
                log.info("FUSE connection closed")
                return
            if e.errno == errno.ENOENT:  # the request was interrupted away
                continue
            raise
        out = fs.handle(view[:n])
        if out is not None:
            try:
                os.write(fd, out)
            except OSError as e:
                # ENOENT: the kernel dropped an interrupted request; fine.
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    log.error("reply failed: %s", e)
        now = time.perf_counter()
        spin_until = now + _SPIN
        if now - last > _SLICE:
            await trio.sleep(0)
            last = time.perf_counter()
