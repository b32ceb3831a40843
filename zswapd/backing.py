"""Writeback: cold objects moved, compressed and packed, to a backing file.

Glossary (shared with engine/backing.c, store.py and docs/design.md):

backing file
    A regular file on a disk filesystem, opened with O_DIRECT by the
    supervisor and held like the state's memfds (a worker that dies loses
    nothing of it).  Created at start, discarded at stop: swap lives one
    boot, so nothing here is ever fsynced or read back after a reboot.
segment
    SEG_SIZE bytes of the file, written as a log: objects are appended to
    the *open* segment until the next one does not fit; it is then *full*.
    256 KiB: a segment is written in at most 64 block writes and cleaned in
    one 256 KiB read, so both bounded steps stay short (a few ms on a disk)
    and the two per-engine buffers (the open segment, the one being
    cleaned) cost 512 KiB; the table of 32 GiB / 256 KiB = 131072 segments
    is 1 MiB and sparse (its untouched pages are holes).  Larger segments
    would clean less often but hold more dead bytes each, smaller ones
    would make the table and the scans for a free segment longer.
object
    What the pool held for a page, as it held it (kind, algorithm and
    length stay in the page entry), behind an 8-byte header naming the
    page (page << 16 | length), padded to OBJ_ALIGN bytes.  The header is
    how cleaning finds a segment's owners without scanning the page table,
    and how a read checks it got the object it asked for.  A zero header
    ends a segment's objects (a segment buffer starts zeroed).
location
    A backed page entry's bits 32-62 (entry.py): the object's byte offset
    in the file / OBJ_ALIGN.
segment table
    One 64-bit word per segment in the state ("segment", state.TABLES):
    live bytes (bits 0-19, recomputed by the rebuild), fill (bits 20-39:
    bytes written, always whole objects) and state (bits 40-41: free, open,
    full, cleaning).  Every change is one 8-byte store or atomic add.
dead bytes
    Fill minus live: objects whose page was discarded, rewritten or moved.
cleaning
    The backing file's compaction: a full segment whose live share is
    below a threshold is read whole, its live objects are appended to the
    open segment, and once none is left it is punched (FALLOC_FL_PUNCH_HOLE)
    and free again.

Crash order (the pool's rule 1 one level down):
  writeback: the object is appended to the open segment's buffer, the
    buffer's new blocks are written (O_DIRECT), the segment's fill is
    stored, then the page entry is switched to the location (only if it
    still names the same object with the same bytes), then the pool object
    is freed.
  cleaning: the same, the old location's live bytes falling as each entry
    switches; the victim is punched and marked free only when no entry
    names it.
  A crash at any step leaves every page reading its old or new copy: an
  object not yet named is dead bytes, found by the rebuild (which
  recomputes live bytes and turns open and cleaning segments full) and
  reclaimed by cleaning.  Reads of a backed page never take the backing
  lock; they re-check the entry after the read (engine/backing.c).

This module is the reference the C engine (engine/backing.c) follows step
for step: the Python engine runs it, and tests/test_backing.py compares
the page tables, segment tables and file bytes both leave.  BackingFile is
the one place that does file I/O for it; the setup checks (what a backing
file may live on) are ``check_backing_path``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import config, entry, libc
from .codec import KIND_COMPRESSED, KIND_HUGE, PAGE_SIZE
from .errors import BadRequest, CorruptObject
from .state import MAX_SEGMENTS as MAX_SEGMENTS
from .state import CrashHook, StateError

if TYPE_CHECKING:
    from .engine import PythonEngine

SEG_SIZE = 256 * 1024
SEG_SHIFT = 18
BLOCK = 4096  # the O_DIRECT unit: logical block size of every disk this runs on (checked at open)
OBJ_ALIGN = 16  # location unit: 31 bits of 16 bytes address 32 GiB
OBJ_HEADER = 8
# 32 GiB: the most the 31-bit location can address; the state's segment
# table (state.MAX_SEGMENTS entries) covers exactly that.
MAX_FILE_BYTES = (1 << 31) * OBJ_ALIGN
assert MAX_SEGMENTS * SEG_SIZE == MAX_FILE_BYTES == config.WRITEBACK_MAX_SIZE
assert config.WRITEBACK_SEGMENT == SEG_SIZE and config.WRITEBACK_MIN_SIZE == 2 * SEG_SIZE
# The segment table word.
SEG_LIVE_MASK = (1 << 20) - 1
SEG_FILL_SHIFT = 20
SEG_FILL_MASK = (1 << 20) - 1
SEG_STATE_SHIFT = 40
SEG_FREE, SEG_OPEN, SEG_FULL, SEG_CLEANING = 0, 1, 2, 3
NO_SEGMENT = -1
# Objects one step may hold between its copy and its switch (the C engine's
# fixed pending array); a step's max_objects is clamped to it.
MAX_PENDING = 1024
# Default cleaning threshold: a full segment under this live share is cleaned.
CLEAN_PERCENT = 50
# The most one object spans (header + a raw page, aligned) and the blocks it
# may touch: from a 16-byte-aligned start it never crosses more than two.
MAX_SPAN = -(-(OBJ_HEADER + PAGE_SIZE) // OBJ_ALIGN) * OBJ_ALIGN
READ_BUFFER = 2 * BLOCK
# Reads of backed pages by latency, log2 microseconds: bucket i counts those
# of 2^(i-1) < us <= 2^i (up to 8 s).
LAT_BUCKETS = 24

_HDR = struct.Struct("<Q")


def span(length: int) -> int:
    """Bytes an object of ``length`` payload bytes takes in a segment."""
    return -(-(OBJ_HEADER + length) // OBJ_ALIGN) * OBJ_ALIGN


def obj_header(page: int, length: int) -> int:
    return page << 16 | length


def seg_word(live: int, fill: int, state: int) -> int:
    return state << SEG_STATE_SHIFT | fill << SEG_FILL_SHIFT | live


def seg_live(word: int) -> int:
    return word & SEG_LIVE_MASK


def seg_fill(word: int) -> int:
    return word >> SEG_FILL_SHIFT & SEG_FILL_MASK


def seg_state(word: int) -> int:
    return word >> SEG_STATE_SHIFT & 3


# -- where a backing file may live ---------------------------------------------

# statfs f_type of filesystems whose pages live in memory (and could be
# swapped out to us, or need memory to take our writes): never a backing file.
_MEMORY_FS = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x65735546: "FUSE (zswapd's own mount is one)",
    0x62656572: "sysfs",
    0x9FA0: "procfs",
    0x1373: "devfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x794C7630: "overlayfs (its upper layer may be tmpfs)",
}


def fs_type(fd: int) -> int:
    return libc.fs_type(fd)


def _block_device_name(dev: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        return ""


def _where(st_dev: int, f_type: int, path: str, depth: int = 0) -> str | None:
    """Why a file on device ``st_dev`` (filesystem ``f_type``) may not back
    swap, or None: a memory filesystem, or a zram, nbd or loop device whose
    storage is (a loop device's file is followed, a few levels deep)."""
    kind = _MEMORY_FS.get(f_type)
    if kind is not None:
        return f"{path} is on {kind}, whose pages live in memory or could be swapped back to zswapd"
    dev = _block_device_name(st_dev)
    if dev.startswith(("zram", "nbd")):
        return f"{path} is on /dev/{dev}, whose storage is memory or the network"
    if dev.startswith("loop"):
        try:
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                under = f.read().strip()
            under_type = libc.fs_type(under)
            st = os.stat(under)
        except OSError:
            return f"{path} is on /dev/{dev}, whose backing file cannot be checked"
        if depth >= 3:
            return f"{path} is on loop devices nested too deep to check"
        why = _where(st.st_dev, under_type, under, depth + 1)
        return f"{path} is on /dev/{dev}, and {why}" if why else None
    return None


def check_backing_fd(fd: int, path: str) -> None:
    """BadRequest unless ``fd`` is a regular file on a disk filesystem: not
    in memory (tmpfs, ramfs), not on a FUSE mount (ours included), not on a
    zram or nbd device, nor on a loop device whose file is any of those."""
    import stat

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"[writeback] file {path}: not a regular file")
    why = _where(st.st_dev, fs_type(fd), path)
    if why:
        raise BadRequest(f"[writeback] file {why}; put it on a disk filesystem (ext4, xfs, btrfs)")


def check_backing_size(size: int) -> None:
    """A multiple of the block size, of at least two segments (the open one
    and one kept for cleaning); a tail shorter than a segment is not used."""
    if size < 2 * SEG_SIZE or size % BLOCK:
        raise BadRequest(
            f"[writeback] size must be a multiple of the block size ({BLOCK} bytes) of at least two segments "
            f"({2 * SEG_SIZE} bytes), got {size}"
        )
    if size > MAX_FILE_BYTES:
        raise BadRequest(f"[writeback] size {size} is beyond the {MAX_FILE_BYTES} bytes (32 GiB) a location addresses")


def _lock(fd: int, path: str) -> None:
    """Take the backing file for this instance: an exclusive flock on its
    open file, which goes wherever the fd goes (workers, a handover,
    systemd's fd store) and is released only by the last close.  So a
    second instance configured with the same file is refused before it
    truncates the pages of the first."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BadRequest(
            f"[writeback] file {path} is in use by another zswapd instance (or another process holds a lock on "
            "it); give each instance a file of its own"
        ) from None


def open_backing_file(path: str, size: int) -> int:
    """Create (or truncate) the backing file at ``path``, O_DIRECT, with
    ``size`` bytes allocated on disk (a full disk fails here, at start, not
    under pressure).  Returns the fd; BadRequest names what is wrong.
    Never for a file a state names (reopen_backing_file)."""
    check_backing_size(size)
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise BadRequest(f"[writeback] file {path}: cannot open it O_DIRECT for writing: {e.strerror}") from None
    try:
        _lock(fd, path)
        check_backing_fd(fd, path)
        os.ftruncate(fd, 0)  # whatever it held belongs to no boot of ours
        os.ftruncate(fd, size)
        try:
            libc.fallocate(fd, 0, 0, size)
        except OSError as e:
            raise BadRequest(
                f"[writeback] file {path}: cannot allocate {size} bytes on its filesystem: {os.strerror(e.errno or 0)}"
            ) from None
    except BaseException:
        os.close(fd)
        if not existed:  # refused: leave nothing behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return fd


def identity(fd: int) -> tuple[int, int, int]:
    """(device, inode, size) of the backing file ``fd``: what the state
    header keeps (state.State.save_backing), so that a takeover can tell the
    file its pages were written to from any other."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size


def reopen_backing_file(path: str, want: tuple[int, int, int]) -> int:
    """The backing file a state's pages were written to, opened again by its
    path when its fd was lost (not among the fds systemd or a worker handed
    back): never created, truncated or allocated, and only if it is that
    very file (``want``: identity() when it was first used) and no other
    process holds it.  BadRequest says why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise BadRequest(f"[writeback] file {path}: cannot open it again: {e.strerror}") from None
    try:
        got = identity(fd)
        if got != want:
            raise BadRequest(
                f"[writeback] file {path} is not the file the pages were written to: device {got[0]} inode "
                f"{got[1]} of {got[2]} bytes, expected device {want[0]} inode {want[1]} of {want[2]} bytes "
                "(it was removed, replaced or resized)"
            )
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- the file's I/O ------------------------------------------------------------------


class BackingFile:
    """The backing file's I/O for the Python engine: aligned buffers (page
    aligned anonymous mappings, so O_DIRECT takes them), each write a crash
    point under a test hook."""

    def __init__(self, fd: int, size: int, hook: CrashHook | None = None) -> None:
        check_backing_size(size)
        self.fd = fd
        self.size = size
        self.nseg = size // SEG_SIZE
        self.hook = hook
        self.written = 0  # bytes written, ever (the daily limit's meter)

    def write(self, buf: mmap.mmap, start: int, end: int, offset: int) -> None:
        if self.hook is not None:
            self.hook.step()
        n = os.pwritev(self.fd, [memoryview(buf)[start:end]], offset)
        if n != end - start:
            raise OSError(f"short write to the backing file: {n} of {end - start} bytes")
        self.written += n

    def read(self, buf: mmap.mmap, n: int, offset: int) -> None:
        got = os.preadv(self.fd, [memoryview(buf)[:n]], offset)
        if got != n:
            raise OSError(f"short read from the backing file: {got} of {n} bytes at {offset}")

    def punch(self, offset: int, n: int) -> None:
        if self.hook is not None:
            self.hook.step()
        try:
            libc.fallocate(self.fd, libc.PUNCH_HOLE, offset, n)
        except OSError as e:
            raise OSError(e.errno, f"punching the backing file at {offset}+{n}: {os.strerror(e.errno or 0)}") from None


@dataclass
class _Pending:
    page: int
    old: int  # the entry the object was copied under
    new: int  # the backed entry to switch to
    at: int  # offset in the open segment
    nbytes: int  # its span
    from_seg: int  # cleaning: the segment it leaves; writeback: NO_SEGMENT


class Backing:
    """The reference mechanics over one engine's page table and the state's
    segment table (see the top).  Single threaded, as the Python engine."""

    def __init__(self, engine: PythonEngine, file: BackingFile) -> None:
        self.engine = engine
        self.file = file
        self.nseg = file.nseg
        self.table = engine.table
        self.segs = engine.state.view("segment")
        self.npages = engine.state.geometry.npages
        self.buf = mmap.mmap(-1, SEG_SIZE)  # the open segment as written so far
        self.cbuf = mmap.mmap(-1, SEG_SIZE)  # the segment being cleaned
        self.rbuf = mmap.mmap(-1, READ_BUFFER)
        self.open = NO_SEGMENT
        self.pos = 0  # bytes used in the open segment
        self.flushed = 0  # bytes of it on disk
        self.cursor = 0  # the candidate clock hand
        self.scan_left = 0  # entries a step may still look at
        self.victim = NO_SEGMENT
        self.cpos = 0
        self.cfill = 0
        self.pending: list[_Pending] = []
        self.latency = [0] * LAT_BUCKETS
        self.used = 0
        for s in range(self.nseg):
            if seg_state(self.segs[s]) != SEG_FREE:
                self.used += 1
        for first, end in engine.state.extents("segment"):
            for s in range(max(first, self.nseg), end):
                if self.segs[s]:
                    raise StateError(
                        f"segment {s} is in use but the backing file has only {self.nseg} segments: "
                        "the file given is smaller than the one the state was written to"
                    )

    # -- candidates -------------------------------------------------------------

    def next_candidate(self, idle_ticks: int) -> int:
        """The next page to write back, or -1 once this step has looked at
        every page (``scan_left``).  The one place that chooses: a clock
        hand over the pool pages idle at least ``idle_ticks``; the store
        asks for the oldest first, age band by age band (store.IDLE_LADDER)."""
        table, n = self.table, self.npages
        now = self.engine.now_tick & entry.IDLE_MASK
        while self.scan_left > 0:
            idx = self.cursor
            self.cursor = idx + 1 if idx + 1 < n else 0
            self.scan_left -= 1
            e = table[idx]
            if (
                not e & entry.BACKED
                and entry.kind(e) in (KIND_COMPRESSED, KIND_HUGE)
                and entry.age(e, now) >= idle_ticks
            ):
                return idx
        return -1

    # -- the open segment ---------------------------------------------------------

    def _free_segments(self) -> int:
        return self.nseg - self.used

    def _room(self, nbytes: int, reserve: int) -> bool:
        """Make the open segment have ``nbytes`` free, sealing it and opening
        the lowest free one if needed, leaving ``reserve`` free segments
        (writeback keeps one for cleaning, which cannot free one without)."""
        if self.open != NO_SEGMENT and self.pos + nbytes <= SEG_SIZE:
            return True
        if self.open != NO_SEGMENT:
            self.commit()
            self.segs[self.open] += (SEG_FULL - SEG_OPEN) << SEG_STATE_SHIFT
            self.open = NO_SEGMENT
        if self._free_segments() <= reserve:
            return False
        for s in range(self.nseg):
            if seg_state(self.segs[s]) == SEG_FREE:
                break
        else:
            return False
        self.segs[s] = seg_word(0, 0, SEG_OPEN)
        self.used += 1
        self.open, self.pos, self.flushed = s, 0, 0
        self.buf[:] = bytes(SEG_SIZE)
        return True

    def _append(self, page: int, old: int, payload: bytes, from_seg: int) -> None:
        n = len(payload)
        at = self.pos
        loc = (self.open * SEG_SIZE + at) // OBJ_ALIGN
        _HDR.pack_into(self.buf, at, obj_header(page, n))
        self.buf[at + OBJ_HEADER : at + OBJ_HEADER + n] = payload
        sp = span(n)
        self.pos += sp
        # The object as ``old`` names it (kind, algorithm, length, tier,
        # stamp) at its place in the file.
        new = entry.BACKED | loc << entry.HANDLE_SHIFT | old & ~(entry.BACKED | entry.HANDLE_MASK << entry.HANDLE_SHIFT)
        self.pending.append(_Pending(page, old, new, at, sp, from_seg))

    def commit(self) -> None:
        """Write the open segment's new blocks, store its fill, then switch
        the pending entries and free what they left (see the top)."""
        if not self.pending:
            return
        seg = self.open
        first = self.flushed // BLOCK * BLOCK
        end = -(-self.pos // BLOCK) * BLOCK
        pending, self.pending = self.pending, []
        try:
            self.file.write(self.buf, first, end, seg * SEG_SIZE + first)
        except OSError:
            # Nothing switched: the pages stay where they were, and the
            # buffer forgets what it could not write.
            self.buf[self.flushed : self.pos] = bytes(self.pos - self.flushed)
            self.pos = self.flushed
            raise
        self.segs[seg] += (self.pos - seg_fill(self.segs[seg])) << SEG_FILL_SHIFT
        self.flushed = self.pos
        eng, table = self.engine, self.table
        c = eng.c
        for p in pending:
            n = entry.length(p.new)
            cur = table[p.page]
            if (cur ^ p.old) & entry.CONTENT_MASK:
                continue  # rewritten or discarded meanwhile: the copy is dead
            # The entry as it is now (a read may have stamped it) at the new place.
            new = p.new & entry.CONTENT_MASK | cur & ~entry.CONTENT_MASK
            if p.from_seg == NO_SEGMENT:
                h = entry.handle(p.old)
                if bytes(eng.load(h, n)) != self.buf[p.at + OBJ_HEADER : p.at + OBJ_HEADER + n]:
                    continue  # the same handle holds other bytes now (an ABA rewrite)
                table[p.page] = new
                self.segs[seg] += p.nbytes
                c.bd_count += 1
                c.bd_writes += 1
                if entry.kind(p.old) == KIND_HUGE:
                    c.huge_pages -= 1
                eng.free(h, n)
            else:
                table[p.page] = new
                self.segs[seg] += p.nbytes
                self.segs[p.from_seg] -= p.nbytes

    # -- the steps ------------------------------------------------------------------

    def writeback_step(self, max_objects: int, max_bytes: int, idle_ticks: int = 0) -> tuple[int, int]:
        """Move up to ``max_objects`` pool objects, at most ``max_bytes`` of
        segment (the daily limit's rest), to the file.  Returns (objects
        moved, bytes appended)."""
        max_objects = min(max_objects, MAX_PENDING)
        done = nbytes = 0
        eng = self.engine
        self.scan_left = self.npages
        try:
            while done < max_objects and nbytes < max_bytes:
                idx = self.next_candidate(idle_ticks)
                if idx < 0:
                    break
                e = self.table[idx]
                n = entry.length(e)
                if nbytes + span(n) > max_bytes or not self._room(span(n), 1):
                    self.cursor = idx  # try it first next time
                    break
                self._append(idx, e, bytes(eng.load(entry.handle(e), n)), NO_SEGMENT)
                done += 1
                nbytes += span(n)
            self.commit()
        finally:
            eng.trim()
        return done, nbytes

    def _pick_victim(self, percent: int) -> int:
        best, best_live = NO_SEGMENT, SEG_SIZE * percent // 100
        for s in range(self.nseg):
            w = self.segs[s]
            if seg_state(w) == SEG_FULL and seg_live(w) < best_live:
                best, best_live = s, seg_live(w)
        return best

    def clean_step(self, max_objects: int, max_bytes: int, percent: int = CLEAN_PERCENT) -> tuple[int, int]:
        """One bounded step of cleaning: pick the emptiest full segment under
        ``percent`` live (if none is being cleaned), move up to
        ``max_objects`` of its live objects, and punch it once it holds none.
        Returns (objects moved, segments freed)."""
        if self.victim == NO_SEGMENT:
            s = self._pick_victim(percent)
            if s == NO_SEGMENT:
                return 0, 0
            self.segs[s] += (SEG_CLEANING - SEG_FULL) << SEG_STATE_SHIFT
            self.victim, self.cpos, self.cfill = s, 0, seg_fill(self.segs[s])
            if self.cfill:
                self.file.read(self.cbuf, -(-self.cfill // BLOCK) * BLOCK, s * SEG_SIZE)
        max_objects = min(max_objects, MAX_PENDING)
        moved = nbytes = 0
        victim = self.victim
        table = self.table
        while self.cpos < self.cfill and moved < max_objects and nbytes < max_bytes:
            at = self.cpos
            hdr = _HDR.unpack_from(self.cbuf, at)[0]
            page, n = hdr >> 16, hdr & 0xFFFF
            if not hdr or not 0 < n <= PAGE_SIZE or at + span(n) > self.cfill:
                self.cpos = self.cfill  # the end of its objects (or garbage: nothing named past it)
                break
            loc = (victim * SEG_SIZE + at) // OBJ_ALIGN
            e = table[page] if page < self.npages else 0
            if e & entry.BACKED and entry.location(e) == loc and entry.length(e) == n:
                if not self._room(span(n), 0):
                    break
                self._append(page, e, self.cbuf[at + OBJ_HEADER : at + OBJ_HEADER + n], victim)
                moved += 1
                nbytes += span(n)
            self.cpos = at + span(n)
        self.commit()
        freed = 0
        if self.cpos >= self.cfill:
            if seg_live(self.segs[victim]) == 0:
                self.file.punch(victim * SEG_SIZE, SEG_SIZE)
                self.segs[victim] = 0
                self.used -= 1
                self.engine.c.segments_cleaned += 1
                freed = 1
            else:
                self.segs[victim] += (SEG_FULL - SEG_CLEANING) << SEG_STATE_SHIFT
            self.victim = NO_SEGMENT
        return moved, freed

    # -- reads ------------------------------------------------------------------------

    def load(self, page: int, e: int) -> bytes:
        """The payload of backed page ``page`` (entry ``e``), from the file."""
        off = entry.location(e) * OBJ_ALIGN
        n = entry.length(e)
        first = off // BLOCK * BLOCK
        end = -(-(off + OBJ_HEADER + n) // BLOCK) * BLOCK
        at = off - first
        t0 = time.perf_counter_ns()
        self.file.read(self.rbuf, end - first, first)
        us = -(-(time.perf_counter_ns() - t0) // 1000)
        self.latency[min(LAT_BUCKETS - 1, max(0, us - 1).bit_length())] += 1
        if _HDR.unpack_from(self.rbuf, at)[0] != obj_header(page, n):
            self.engine.c.failed_reads += 1
            raise CorruptObject(f"page {page}: the backing file at {off} does not hold its object")
        self.engine.c.bd_reads += 1
        return self.rbuf[at + OBJ_HEADER : at + OBJ_HEADER + n]

    # -- figures ----------------------------------------------------------------------

    def figures(self) -> dict[str, int]:
        live = fill = 0
        for s in range(self.nseg):
            w = self.segs[s]
            live += seg_live(w)
            fill += seg_fill(w)
        return {
            "size": self.file.size,
            "live_bytes": live,
            "dead_bytes": fill - live,
            "segments_used": self.used,
            "bytes_written": self.file.written,
        }
