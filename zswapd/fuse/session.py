"""The trio loop that moves requests between /dev/fuse and a FuseFS.

This loop is what keeps swap alive: if it returns, the daemon closes
/dev/fuse and every process with pages in the swap area dies of SIGBUS.  So
it returns only when the connection is gone (ENODEV) or DESTROY arrives.  A
bug in the codec (an exception out of ``FuseFS.handle``) is logged with its
traceback, counted, and answered EIO for that one request; the next request
is served as usual.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

import trio

from ..ratelog import RateLimitedLog
from .protocol import IN_HEADER, READ_BUFFER, FuseFS, error_reply

log = logging.getLogger("zswapd.fuse")

# After an unexpected read error, before trying again: the error may pass
# (ENOMEM), and while it lasts this keeps the loop from spinning.
_READ_RETRY = 0.01


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


async def serve(fd: int, fs: FuseFS, on_first_reply: Callable[[], None] | None = None) -> None:
    """Serve until the connection goes away (ENODEV) or DESTROY arrives.
    ``on_first_reply`` is called once, after the first reply is written (a
    takeover's recovery time ends there)."""
    buf = bytearray(READ_BUFFER)  # one buffer for the life of the session
    view = memoryview(buf)
    last = time.perf_counter()
    spin_until = 0.0
    # A bug or an error hit by every request would log a line per request.
    read_errors, bugs, write_errors = RateLimitedLog(log), RateLimitedLog(log), RateLimitedLog(log)
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
            # Anything else: ending here would take the swap area down.
            read_errors(logging.ERROR, "reading /dev/fuse failed: %s; retrying", e)
            await trio.sleep(_READ_RETRY)
            continue
        try:
            out = fs.handle(view[:n])
        except Exception:
            fs.errors += 1
            fs.internal_errors += 1
            op = IN_HEADER.unpack_from(view, 0)[1] if n >= IN_HEADER.size else -1
            bugs(
                logging.ERROR,
                "bug handling FUSE opcode %d (%d bugs so far); answered EIO, serving on",
                op,
                fs.internal_errors,
                exc_info=True,
            )
            out = error_reply(view[:n])
        if out is not None:
            try:
                os.write(fd, out)
                if on_first_reply is not None:
                    on_first_reply()
                    on_first_reply = None
            except OSError as e:
                # ENOENT: the kernel dropped an interrupted request; fine.
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    write_errors(logging.ERROR, "reply failed: %s", e)
        now = time.perf_counter()
        spin_until = now + _SPIN
        if now - last > _SLICE:
            await trio.sleep(0)
            last = time.perf_counter()
