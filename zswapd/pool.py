"""zsmalloc-style pool: compressed objects packed into frames, reached by handles.

Glossary (the same words are used everywhere in zswapd):

frame
    4 KiB of memory carved from a large anonymous ``mmap`` arena.  Frames are
    numbered; frame ``f`` lives in arena ``f >> ARENA_SHIFT``.
zspage
    A chain of 1 to 8 frames that holds objects of one size class.  The frames
    need not be contiguous: ``frame_next`` links them, and an object may
    straddle two frames.
size class
    Objects are rounded up to a class size, a multiple of 16 bytes between 32
    and 4096.  Each class picks the zspage length that wastes the least;
    classes with the same frames-per-zspage and objects-per-zspage are merged
    into the larger one, as zsmalloc does.
object
    One stored payload (a compressed page) in a slot of a zspage.  Each slot
    starts with a 4-byte header: the owning handle when allocated, or a
    free-list link when free.  The header is what lets compaction find the
    owner of an object it moves.  A *huge* object is a raw 4096-byte page that
    owns a whole frame and has no header.
handle
    A small integer naming an object.  The handle table maps it to the
    object's current location, so compaction can move objects and rewrite only
    that table.  Callers see handles, never locations.  A handle may also hold
    a plain 64-bit word (a same-filled page's fill) and then owns no memory.
fullness group
    Non-full zspages of a class sit on one of ten lists by how full they are
    (0-10%, ..., 90-100%).  Allocation takes the fullest; compaction drains the
    emptiest into the fullest.  Full zspages sit on no list.

Metadata lives in ``mmap``-backed ``memoryview`` tables sized up front, never in
a Python object per stored object or frame.  Bytes per stored object:
handle table 8, plus per zspage 19 (first frame 4, class 2, inuse 2, free head
2, list links 8, group 1) and per frame 4 (chain link), shared by the objects
of that zspage.  The page table of the store adds 8 per page.

The pool does no I/O beyond ``madvise`` on its own arenas; it is single
threaded and deterministic, so it can be tested byte for byte.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

FRAME_SIZE = 4096
FRAME_SHIFT = 12
ARENA_SHIFT = 11  # 2048 frames = 8 MiB per arena mapping
ARENA_FRAMES = 1 << ARENA_SHIFT
MIN_CLASS = 32
CLASS_DELTA = 16
MAX_FRAMES_PER_ZSPAGE = 8
HEADER = 4
GROUPS = 10  # fullness groups 1..10; 0 is empty, 11 is full
GROUP_FULL = GROUPS + 1

_FREE_TAG = 0x80000000
_END = 0xFFFF
_HUGE_LOC = 1 << 63
_MAX_HANDLE = 0x7FFFFFFF

MADV_DONTNEED = 4
MADV_DONTNEED_LOCKED = 24  # Linux 5.18; the mmap module has no constant for it
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class PoolError(Exception):
    """Misuse of the pool API: bad sizes or unknown handles."""


class PoolFull(Exception):
    """No frame is available under the frame limit or the pool's capacity."""


def _anon(nbytes: int) -> mmap.mmap:
    nbytes = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    return mmap.mmap(-1, nbytes, flags=flags)


def table(count: int, fmt: str) -> tuple[mmap.mmap, memoryview]:
    """A zero-filled table of ``count`` items, backed by lazily faulted memory."""
    m = _anon(count * struct.calcsize(fmt))
    return m, memoryview(m).cast(fmt)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SizeClass:
    index: int
    size: int
    frames_per_zspage: int
    objs_per_zspage: int


def _chain_length(size: int) -> int:
    if size & (size - 1) == 0:
        return 1
    best, best_waste = 1, FRAME_SIZE
    for n in range(1, MAX_FRAMES_PER_ZSPAGE + 1):
        waste = (n * FRAME_SIZE) % size
        if waste < best_waste:
            best, best_waste = n, waste
    return best


def build_classes() -> tuple[list[SizeClass], list[int], int]:
    """Return (merged classes, size -> class index table, huge threshold).

    The huge threshold is the smallest class size holding one object per
    single-frame zspage; an object that large gains nothing from packing.
    """
    sizes = list(range(MIN_CLASS, FRAME_SIZE + 1, CLASS_DELTA))
    by_size: dict[int, SizeClass] = {}
    merged: list[SizeClass] = []
    prev: SizeClass | None = None
    huge = FRAME_SIZE
    for size in reversed(sizes):
        frames = _chain_length(size)
        objs = frames * FRAME_SIZE // size
        if frames == 1 and objs == 1:
            huge = size
        if prev is not None and prev.frames_per_zspage == frames and prev.objs_per_zspage == objs:
            by_size[size] = prev
            continue
        prev = SizeClass(0, size, frames, objs)
        merged.append(prev)
        by_size[size] = prev
    merged.reverse()
    index = {c.size: i for i, c in enumerate(merged)}
    classes = [SizeClass(i, c.size, c.frames_per_zspage, c.objs_per_zspage) for i, c in enumerate(merged)]
    lookup = [0] * (FRAME_SIZE + 1)
    for n in range(FRAME_SIZE + 1):
        rounded = max(MIN_CLASS, -(-n // CLASS_DELTA) * CLASS_DELTA)
        lookup[n] = index[by_size[rounded].size]
    return classes, lookup, huge


CLASSES, _CLASS_OF, HUGE_CLASS_SIZE = build_classes()
# A payload this long or longer is stored as a raw page (a huge object).
HUGE_THRESHOLD = HUGE_CLASS_SIZE - HEADER


class Pool:
    """The allocator.  ``max_frames`` bounds its virtual size; ``frame_limit``
    (0 = none) is the memory limit in frames and may change at any time."""

    def __init__(self, max_frames: int, max_handles: int, frame_limit: int = 0, reserve_frames: int = 64) -> None:
        if max_frames < MAX_FRAMES_PER_ZSPAGE or max_handles < 1:
            raise PoolError("pool needs at least 8 frames and 1 handle")
        if max_handles > _MAX_HANDLE:
            raise PoolError(f"at most {_MAX_HANDLE} handles")
        self.max_frames = max_frames
        self.max_handles = max_handles
        self.frame_limit = frame_limit
        self.reserve_frames = reserve_frames
        self.classes = CLASSES
        self.huge_threshold = HUGE_THRESHOLD
        ncls = len(CLASSES)

        self._arenas: list[mmap.mmap] = []
        self._bytes: list[memoryview] = []
        self._words: list[memoryview] = []
        self._frames_made = 0
        self._m_fnext, self.frame_next = table(max_frames, "L")
        # Freed frames: "hot" ones stay resident as a reserve for the write
        # path; the rest are returned to the kernel and kept on the cold stack.
        self._m_hot, self._hot = table(max_frames, "L")
        self._hot_top = 0
        self._m_cold, self._cold = table(max_frames, "L")
        self._cold_top = 0
        self.frames_used = 0

        max_zspages = max_frames + 1
        self._m_zf, self.zs_first = table(max_zspages, "L")
        self._m_zc, self.zs_class = table(max_zspages, "H")
        self._m_zi, self.zs_inuse = table(max_zspages, "H")
        self._m_zh, self.zs_free = table(max_zspages, "H")
        self._m_zn, self.zs_next = table(max_zspages, "L")
        self._m_zp, self.zs_prev = table(max_zspages, "L")
        self._m_zg, self.zs_group = table(max_zspages, "B")
        self._m_zfree, self._zs_freelist = table(max_zspages, "L")
        self._zs_free_top = 0
        self._zs_made = 0  # zspage ids start at 1; 0 means "none"

        self._m_ht, self.handles = table(max_handles + 1, "Q")
        self._m_hf, self._handle_free = table(max_handles + 1, "L")
        self._handle_free_top = 0
        self._handles_made = 0
        self.handles_used = 0

        # Hot-path lookups: class size, and fullness group by objects in use.
        self._csize = [c.size for c in CLASSES]
        self._gtab = [
            bytes(self._group_of(i, c.objs_per_zspage) for i in range(c.objs_per_zspage + 1)) for c in CLASSES
        ]
        self._heads = [0] * (ncls * (GROUPS + 1))
        self._nonempty = [0] * ncls  # bitmask of groups with a zspage
        self.cls_zspages = [0] * ncls
        self.cls_used = [0] * ncls
        self.huge_objects = 0
        self.obj_bytes = 0  # payload bytes stored, headers excluded
        self.pages_compacted = 0  # frames freed by compaction
        # Classes that may have freeable zspages.  Only a free can make a
        # class freeable, so compaction looks at these alone.
        self._fragmented: set[int] = set()
        self._madvise = MADV_DONTNEED_LOCKED

    # -- frames -------------------------------------------------------------

    def _frame_view(self, frame: int) -> tuple[memoryview, int]:
        return self._bytes[frame >> ARENA_SHIFT], (frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT

    def frame_room(self) -> int:
        """Frames that may still be taken, under both limit and capacity."""
        room = self.max_frames - self.frames_used
        if self.frame_limit:
            room = min(room, self.frame_limit - self.frames_used)
        return room

    def _take_frame(self) -> int:
        if self._hot_top:
            self._hot_top -= 1
            frame = self._hot[self._hot_top]
        elif self._cold_top:
            self._cold_top -= 1
            frame = self._cold[self._cold_top]
        else:
            frame = self._frames_made
            if frame >> ARENA_SHIFT == len(self._arenas):
                arena = _anon(ARENA_FRAMES * FRAME_SIZE)
                self._arenas.append(arena)
                view = memoryview(arena)
                self._bytes.append(view)
                self._words.append(view.cast("I"))
            self._frames_made += 1
        self.frames_used += 1
        return frame

    def _give_frame(self, frame: int) -> None:
        # Freed frames stay resident until trim(): a page rewritten in place
        # frees one frame and takes another, and re-faulting a frame that was
        # just returned to the kernel costs more than the whole store.
        self.frames_used -= 1
        self._hot[self._hot_top] = frame
        self._hot_top += 1

    def trim(self) -> int:
        """Return free frames beyond the reserve to the kernel; the store
        calls this at the end of every request that frees memory."""
        dropped = 0
        while self._hot_top > self.reserve_frames:
            self._hot_top -= 1
            frame = self._hot[self._hot_top]
            self._drop(frame)
            self._cold[self._cold_top] = frame
            self._cold_top += 1
            dropped += 1
        return dropped

    def _drop(self, frame: int) -> None:
        arena = self._arenas[frame >> ARENA_SHIFT]
        start = (frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT
        try:
            arena.madvise(self._madvise, start, FRAME_SIZE)
        except OSError:
            # Kernels before 5.18 lack MADV_DONTNEED_LOCKED; without mlockall
            # plain MADV_DONTNEED does the same job.
            if self._madvise == MADV_DONTNEED:
                raise
            self._madvise = MADV_DONTNEED
            arena.madvise(self._madvise, start, FRAME_SIZE)

    def refill_reserve(self) -> int:
        """Fault in free frames until the hot reserve is full (not on the write path)."""
        added = 0
        while self._hot_top < self.reserve_frames and (self._cold_top or self._frames_made < self.max_frames):
            hot, self._hot_top = self._hot_top, 0  # make _take_frame skip the hot stack
            frame = self._take_frame()
            self._hot_top = hot
            self.frames_used -= 1
            view, base = self._frame_view(frame)
            view[base] = 0  # fault it in now
            self._hot[self._hot_top] = frame
            self._hot_top += 1
            added += 1
        return added

    @property
    def reserve_bytes(self) -> int:
        return self._hot_top * FRAME_SIZE

    # -- handles ------------------------------------------------------------

    def _new_handle(self, value: int) -> int:
        if self._handle_free_top:
            self._handle_free_top -= 1
            h = self._handle_free[self._handle_free_top]
        elif self._handles_made < self.max_handles:
            self._handles_made += 1
            h = self._handles_made
        else:
            raise PoolFull("handle table is full")
        self.handles[h] = value
        self.handles_used += 1
        return h

    def _drop_handle(self, h: int) -> None:
        self.handles[h] = 0
        self._handle_free[self._handle_free_top] = h
        self._handle_free_top += 1
        self.handles_used -= 1

    def _check_handle(self, h: int) -> None:
        if not 0 < h <= self._handles_made:
            raise PoolError(f"unknown handle {h}")

    def store_word(self, word: int) -> int:
        """A handle that holds ``word`` itself and owns no pool memory."""
        return self._new_handle(word)

    def word(self, h: int) -> int:
        return self.handles[h]

    def free_word(self, h: int) -> None:
        self._check_handle(h)
        self._drop_handle(h)

    # -- zspages and fullness ----------------------------------------------

    def _group_of(self, inuse: int, objs: int) -> int:
        if inuse >= objs:
            return GROUP_FULL
        return -(-inuse * GROUPS // objs)

    def _link(self, z: int, cls: int, group: int) -> None:
        self.zs_group[z] = group
        if group == GROUP_FULL or group == 0:
            return
        slot = cls * (GROUPS + 1) + group
        head = self._heads[slot]
        self.zs_prev[z] = 0
        self.zs_next[z] = head
        if head:
            self.zs_prev[head] = z
        self._heads[slot] = z
        self._nonempty[cls] |= 1 << group

    def _unlink(self, z: int, cls: int) -> None:
        group = self.zs_group[z]
        if group == GROUP_FULL or group == 0:
            return
        slot = cls * (GROUPS + 1) + group
        nxt, prv = self.zs_next[z], self.zs_prev[z]
        if prv:
            self.zs_next[prv] = nxt
        else:
            self._heads[slot] = nxt
            if not nxt:
                self._nonempty[cls] &= ~(1 << group)
        if nxt:
            self.zs_prev[nxt] = prv

    def _slot_addr(self, z: int, size: int, slot: int) -> tuple[int, int]:
        """(frame, offset in frame) of a slot's first byte."""
        offset = slot * size
        frame = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        return frame, offset & (FRAME_SIZE - 1)

    def _new_zspage(self, cls: int) -> int:
        c = self.classes[cls]
        if self.frame_room() < c.frames_per_zspage:
            raise PoolFull(f"no room for a {c.frames_per_zspage}-frame zspage")
        if self._zs_free_top:
            self._zs_free_top -= 1
            z = self._zs_freelist[self._zs_free_top]
        else:
            self._zs_made += 1
            z = self._zs_made
        frames = [self._take_frame() for _ in range(c.frames_per_zspage)]
        for a, b in zip(frames, frames[1:]):
            self.frame_next[a] = b
        self.zs_first[z] = frames[0]
        self.zs_class[z] = cls
        self.zs_inuse[z] = 0
        self.zs_free[z] = 0
        # Thread the free list through the slot headers.
        last = c.objs_per_zspage - 1
        for slot in range(c.objs_per_zspage):
            offset = slot * c.size
            frame = frames[offset >> FRAME_SHIFT]
            words = self._words[frame >> ARENA_SHIFT]
            base = (frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT
            words[(base + (offset & (FRAME_SIZE - 1))) >> 2] = _FREE_TAG | (slot + 1 if slot < last else _END)
        self.cls_zspages[cls] += 1
        self._link(z, cls, 0)
        return z

    def _free_zspage(self, z: int, cls: int) -> None:
        self._unlink(z, cls)
        self.zs_group[z] = 0
        frame = self.zs_first[z]
        for _ in range(self.classes[cls].frames_per_zspage):
            nxt = self.frame_next[frame]
            self._give_frame(frame)
            frame = nxt
        self.cls_zspages[cls] -= 1
        self._zs_freelist[self._zs_free_top] = z
        self._zs_free_top += 1

    def _pop_slot(self, z: int, cls: int, h: int) -> tuple[int, int, int]:
        """Take zspage ``z``'s first free slot for handle ``h``.
        Returns (slot, frame, offset of the slot in that frame)."""
        slot = self.zs_free[z]
        offset = slot * self._csize[cls]  # _slot_addr, inlined: once per stored page
        frame = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        off = offset & (FRAME_SIZE - 1)
        words = self._words[frame >> ARENA_SHIFT]
        at = (((frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT) + off) >> 2
        self.zs_free[z] = words[at] & 0xFFFF
        words[at] = h
        inuse = self.zs_inuse[z] + 1
        self.zs_inuse[z] = inuse
        self.cls_used[cls] += 1
        group = self._gtab[cls][inuse]
        if group != self.zs_group[z]:
            self._unlink(z, cls)
            self._link(z, cls, group)
        return slot, frame, off

    def _push_slot(self, z: int, cls: int, slot: int) -> None:
        """Put a slot back on its zspage's free list; free an emptied zspage."""
        offset = slot * self._csize[cls]  # _slot_addr, inlined: once per freed page
        frame = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        off = offset & (FRAME_SIZE - 1)
        at = (((frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT) + off) >> 2
        self._words[frame >> ARENA_SHIFT][at] = _FREE_TAG | self.zs_free[z]
        self.zs_free[z] = slot
        inuse = self.zs_inuse[z] - 1
        self.zs_inuse[z] = inuse
        self.cls_used[cls] -= 1
        if inuse == 0:
            self._free_zspage(z, cls)
            return
        group = self._gtab[cls][inuse]
        if group != self.zs_group[z]:
            self._unlink(z, cls)
            self._link(z, cls, group)
        self._fragmented.add(cls)

    # -- object bytes ---------------------------------------------------------

    def _put(self, frame: int, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` starting at (frame, off), spilling into the next frame."""
        view, base = self._frame_view(frame)
        first = min(len(data), FRAME_SIZE - off)
        view[base + off : base + off + first] = data[:first]
        if first < len(data):
            view2, base2 = self._frame_view(self.frame_next[frame])
            view2[base2 : base2 + len(data) - first] = data[first:]

    def _get(self, frame: int, off: int, n: int) -> memoryview | bytes:
        view, base = self._frame_view(frame)
        if off + n <= FRAME_SIZE:
            return view[base + off : base + off + n]
        view2, base2 = self._frame_view(self.frame_next[frame])
        return bytes(view[base + off : base + FRAME_SIZE]) + view2[base2 : base2 + off + n - FRAME_SIZE]

    # -- public object API ----------------------------------------------------

    def store(self, data: bytes | bytearray | memoryview) -> int:
        """Store a payload and return its handle.  A payload of exactly 4096
        bytes is a huge object; anything from ``huge_threshold`` up should be
        passed as the raw page instead, because packing it gains nothing."""
        n = len(data)
        if n > FRAME_SIZE:
            raise PoolError(f"object of {n} bytes is larger than a frame ({FRAME_SIZE})")
        if n == 0:
            raise PoolError("empty object")
        if n == FRAME_SIZE:
            if self.frame_room() < 1:
                raise PoolFull("no room for a huge object")
            h = self._new_handle(0)
            frame = self._take_frame()
            view, base = self._frame_view(frame)
            view[base : base + FRAME_SIZE] = data
            self.handles[h] = _HUGE_LOC | frame
            self.huge_objects += 1
            self.obj_bytes += FRAME_SIZE
            return h
        if n + HEADER > FRAME_SIZE:
            raise PoolError(f"object of {n} bytes needs the raw page form (>= {self.huge_threshold})")
        cls = _CLASS_OF[n + HEADER]
        # The fullest zspage with a free slot, or a new one.
        mask = self._nonempty[cls]
        z = self._heads[cls * (GROUPS + 1) + mask.bit_length() - 1] if mask else self._new_zspage(cls)
        h = self._new_handle(0)
        slot, frame, off = self._pop_slot(z, cls, h)
        if off + HEADER + n <= FRAME_SIZE:
            at = ((frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT) + off + HEADER
            self._bytes[frame >> ARENA_SHIFT][at : at + n] = data
        else:
            self._put(frame, off + HEADER, data)
        self.handles[h] = z << 16 | slot
        self.obj_bytes += n
        return h

    def load(self, h: int, n: int) -> memoryview | bytes:
        """The first ``n`` bytes of object ``h``.  A memoryview into the pool
        is valid only until the pool is next changed."""
        loc = self.handles[h]
        if loc & _HUGE_LOC:
            view, base = self._frame_view(loc & 0xFFFFFFFF)
            return view[base : base + n]
        # _slot_addr and _get, inlined: once per page read.
        z = loc >> 16
        offset = (loc & 0xFFFF) * self._csize[self.zs_class[z]]
        frame = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        off = (offset & (FRAME_SIZE - 1)) + HEADER
        if off + n <= FRAME_SIZE:
            at = ((frame & (ARENA_FRAMES - 1)) << FRAME_SHIFT) + off
            return self._bytes[frame >> ARENA_SHIFT][at : at + n]
        return self._get(frame, off, n)

    def free(self, h: int, n: int) -> None:
        """Free object ``h`` whose payload is ``n`` bytes long."""
        self._check_handle(h)
        loc = self.handles[h]
        self.obj_bytes -= n
        if loc & _HUGE_LOC:
            self._give_frame(loc & 0xFFFFFFFF)
            self.huge_objects -= 1
        else:
            z = loc >> 16
            self._push_slot(z, self.zs_class[z], loc & 0xFFFF)
        self._drop_handle(h)

    # -- compaction -------------------------------------------------------

    def freeable(self, cls: int) -> int:
        """Whole zspages compaction could free in ``cls`` (zs_can_compact)."""
        c = self.classes[cls]
        wasted = self.cls_zspages[cls] * c.objs_per_zspage - self.cls_used[cls]
        return wasted // c.objs_per_zspage

    def _emptiest(self, cls: int) -> int:
        mask = self._nonempty[cls]
        if not mask:
            return 0
        low = (mask & -mask).bit_length() - 1
        return self._heads[cls * (GROUPS + 1) + low]

    def _fullest_except(self, cls: int, avoid: int) -> int:
        mask = self._nonempty[cls]
        while mask:
            group = mask.bit_length() - 1
            z = self._heads[cls * (GROUPS + 1) + group]
            while z:
                if z != avoid:
                    return z
                z = self.zs_next[z]
            mask &= ~(1 << group)
        return 0

    def _compact_class(self, cls: int, budget: int) -> int:
        c = self.classes[cls]
        moves = 0
        while moves < budget and self.freeable(cls) > 0:
            src = self._emptiest(cls)
            dst = self._fullest_except(cls, src)
            if not src or not dst:
                break
            slot = 0
            while moves < budget and self.zs_inuse[src] and self.zs_group[dst] != GROUP_FULL:
                # Find the next allocated slot of src: its header is a handle.
                while True:
                    frame, off = self._slot_addr(src, c.size, slot)
                    view, base = self._frame_view(frame)
                    hdr = self._words[frame >> ARENA_SHIFT][(base + off) >> 2]
                    if not hdr & _FREE_TAG:
                        break
                    slot += 1
                dslot, dframe, doff = self._pop_slot(dst, cls, hdr)
                self._put(dframe, doff, bytes(self._get(frame, off, c.size)))
                self.handles[hdr] = dst << 16 | dslot
                moves += 1
                if self.zs_inuse[src] == 1:
                    self.pages_compacted += c.frames_per_zspage
                self._push_slot(src, cls, slot)
                slot += 1
        return moves

    def compact(self, max_moves: int | None = None) -> int:
        """Move objects out of sparse zspages, freeing those it empties.
        Classes that can free the most go first.  Returns objects moved."""
        budget = max_moves if max_moves is not None else 1 << 62
        for cls in [c for c in self._fragmented if not self.freeable(c)]:
            self._fragmented.discard(cls)
        order = sorted(self._fragmented, key=lambda i: -self.freeable(i) * self.classes[i].frames_per_zspage)
        moved = 0
        for cls in order:
            if moved >= budget:
                break
            moved += self._compact_class(cls, budget - moved)
            if not self.freeable(cls):
                self._fragmented.discard(cls)
        self.trim()
        return moved

    def freeable_frames(self) -> int:
        return sum(self.freeable(i) * self.classes[i].frames_per_zspage for i in self._fragmented)

    # -- stats --------------------------------------------------------------

    @property
    def mem_used_total(self) -> int:
        return self.frames_used * FRAME_SIZE

    def metadata_bytes(self) -> int:
        """Bytes of pool metadata in use: handle entries, zspage records and
        frame links (tables are faulted in lazily, so this is what they cost)."""
        zspages = sum(self.cls_zspages)
        return self.handles_used * 8 + zspages * 19 + self.frames_used * 4

    def class_stats(self) -> list[dict[str, int]]:
        out = []
        for i, c in enumerate(self.classes):
            zspages = self.cls_zspages[i]
            out.append(
                {
                    "size": c.size,
                    "frames_per_zspage": c.frames_per_zspage,
                    "objs_per_zspage": c.objs_per_zspage,
                    "obj_allocated": zspages * c.objs_per_zspage,
                    "obj_used": self.cls_used[i],
                    "zspages": zspages,
                    "frames_used": zspages * c.frames_per_zspage,
                    "freeable": self.freeable(i),
                }
            )
        out.append(
            {
                "size": FRAME_SIZE,
                "frames_per_zspage": 1,
                "objs_per_zspage": 1,
                "obj_allocated": self.huge_objects,
                "obj_used": self.huge_objects,
                "zspages": self.huge_objects,
                "frames_used": self.huge_objects,
                "freeable": 0,
            }
        )
        return out
