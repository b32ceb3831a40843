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

from . import libc

log = logging.getLogger("zswapd")


class LockedMapping:
    """A memfd mapped here, whose resident pages are mlocked (supervisor.py, rule 3).
    mlock over a hole would allocate it, so only runs that mincore reports
    resident are locked.  The calls are libc.py's, whose prototypes are
    declared there once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.npages = -(-self.size // mmap.PAGESIZE)
        self.vec = (ctypes.c_ubyte * max(1, self.npages))()  # allocated once
        self.addr = 0
        self.warned = False
        if self.size:
            try:
                self.addr = libc.mmap(self.size, libc.PROT_READ, libc.MAP_SHARED, fd)
            except OSError as e:
                raise OSError(e.errno, f"mmap of state memfd: {os.strerror(e.errno or 0)}") from None

    def lock_resident(self) -> int:
        """mlock every resident page; returns how many are resident."""
        if not self.addr:
            return 0
        try:
            libc.mincore(self.addr, self.size, self.vec)
        except OSError as e:
            if not self.warned:
                self.warned = True
                log.warning("mincore of the state refused (%s): its pages are locked only while a worker runs",
                            os.strerror(e.errno or 0))  # fmt: skip
            return 0
        count = 0
        for m in _RUN.finditer(memoryview(self.vec).cast("B")):
            start, end = m.span()
            try:
                libc.mlock(self.addr + start * mmap.PAGESIZE, (end - start) * mmap.PAGESIZE)
            except OSError as e:
                log.warning("mlock of state pages failed: %s", os.strerror(e.errno or 0))
                break
            count += end - start
        return count

    def close(self) -> None:
        if self.addr:
            try:
                libc.munmap(self.addr, self.size)
            except OSError as e:  # a bug if ever; not one to end the supervisor over
                log.warning("munmap of state memfd: %s", e)
            self.addr = 0


# mincore sets bit 0 of a page's byte when it is resident and leaves the
# other bits 0 (reserved).  A regex over the vector finds the resident runs
# in C, without copying it: this process allocates nothing per page.
_RUN = re.compile(rb"[^\x00]+")
