"""The state memfds mapped in the supervisor, their resident pages mlocked,
so that no page of state is reclaimable between two workers: it would be
swapped out to the very swap whose server is restarting.  A worker locks
what it touches (mlockall); the supervisor locks what exists (a mincore
scan at each worker death and every supervisor.LOCK_SCAN_INTERVAL)."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re

from .libc import LIBC

log = logging.getLogger("zswapd")


class LockedMapping:
    """A memfd mapped here, whose resident pages are mlocked (supervisor.py, rule 3).
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
            libc = LIBC
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
        libc = LIBC
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
            LIBC.munmap(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.size))
            self.addr = 0


# mincore sets bit 0 of a page's byte when it is resident and leaves the
# other bits 0 (reserved).  A regex over the vector finds the resident runs
# in C, without copying it: this process allocates nothing per page.
_RUN = re.compile(rb"[^\x00]+")
