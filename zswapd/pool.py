"""zsmalloc-style pool: compressed objects packed into frames, reached by handles.

Glossary (the same words are used everywhere in zswapd):

frame
    4 KiB of the arena memfd; frame ``f`` is at byte ``f * 4096``.  A free
    frame is either *hot* (still resident, kept as a reserve for the write
    path) or *cold* (punched out of the memfd).
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

Metadata lives in the tables of a ``state.State`` (memfd mappings, sized up
front, faulted in lazily), never in a Python object per stored object or
frame; the frames live in its arena memfd, frame ``f`` at byte ``f * 4096``.
``metadata_bytes`` is what those tables hold resident, measured by mincore.

Crash consistency
-----------------
The persistent tables (state.py) are the handle table, ``zs_first``,
``zs_class``, ``frame_next`` and the slot headers in the arena.  Everything
else here (free stacks, fullness lists, ``zs_inuse``, ``zs_free``, per-class
totals) is volatile: a worker that died may have left it half updated, and
``rebuild`` recomputes it from the persistent tables and from the owners the
store names (its page table).  The pool's stores are ordered so that the
process may die between any two of them:

1. A new object is complete before anyone names it.  ``store`` takes a
   handle, takes a slot (writing the handle into the slot header), copies the
   payload, and only then writes the location into the handle table.  A new
   zspage's ``zs_first``/``zs_class``/``frame_next`` and slot headers are
   written before its first slot is handed out.  Until the store switches a
   page-table entry to the new handle, the scan sees neither the handle nor
   the object and frees both.
2. ``free`` runs only after the store has switched the page-table entry
   away (store.py): from then on nothing the scan starts from names the
   handle, so a crash half way through a free leaves garbage, never a lie.
3. Compaction copies an object into a slot of the destination zspage (header
   first, then payload), then switches the handle-table entry (one 8-byte
   store), then frees the old slot.  Before the switch the handle names the
   old, intact copy; after it, the new complete one.  The other copy, whose
   header still names the handle, is found unowned (the handle points
   elsewhere) and freed.
4. A zspage's ``zs_first``, ``zs_class`` and frame chain never change while
   any handle points into it, and a frame is punched (state.punch) only when
   it is free, so what the scan follows is intact.

The scan (``rebuild``): every handle the store claims must point to a slot
whose header names it (or to a huge frame); a zspage is live if such a slot
is in it.  Slots of live zspages that no claimed handle points to are
threaded onto the free list; zspages and handles nothing claims are freed;
frames no live zspage or huge object owns are punched and put on the cold
stack.  ``rebuild.check_pool`` then verifies every volatile index against the
persistent tables.  A single aligned 8-byte store cannot be torn by a
process's death, so a table entry is either old or new.

The pool does no I/O beyond punching frames out of its own memfd; it is
single threaded and deterministic, so it can be tested byte for byte.
"""

from __future__ import annotations

import array
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .state import Geometry, State, StateError

FRAME_SIZE = 4096
FRAME_SHIFT = 12
MIN_CLASS = 32
CLASS_DELTA = 16
MAX_FRAMES_PER_ZSPAGE = 8
HEADER = 4
GROUPS = 10  # fullness groups 1..10; 0 is empty, 11 is full
# Frames past the memory limit that a background move (the ladder's
# recompression, store.py) may take for its new objects, never a write: at
# the limit a smaller class often has no free slot, and a move writes its new
# copy before it frees the old (crash rule 1).  Two zspages of the longest
# chain: new objects in two classes before compaction of what the moves
# freed pays the frames back.  64 KiB, a quarter of the default hot reserve
# the pool keeps resident anyway.  engine.h's MOVE_RESERVE (checked).
MOVE_RESERVE = 2 * MAX_FRAMES_PER_ZSPAGE
GROUP_FULL = GROUPS + 1
# class_stats' "fullness" histogram: zspages in groups 1..10, then full ones,
# under the column names of the kernel's /sys/kernel/debug/zsmalloc/*/classes
# (group 10 holds zspages over 90% used but not full, hence "99%").
FULLNESS_LABELS = ("10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "99%", "100%")

_MAX_HANDLE = 0x7FFFFFFF

# The handle table's word (the C engine's engine.h writes the same layout;
# engine.py checks the two agree at import):
#   huge object        LOC_HUGE | frame
#   compressed object  zspage << LOC_ZSPAGE_SHIFT | slot
#   same-filled page   the fill word itself (the page entry's kind tells)
LOC_HUGE = 1 << 63
LOC_FRAME_MASK = 0xFFFFFFFF
LOC_ZSPAGE_SHIFT = 16
LOC_SLOT_MASK = 0xFFFF
# A slot's first 4 bytes: the owning handle, or SLOT_FREE | the next free
# slot (SLOT_END: none).
SLOT_FREE = 0x80000000
SLOT_END = 0xFFFF


def obj_loc(z: int, slot: int) -> int:
    return z << LOC_ZSPAGE_SHIFT | slot


def loc_zspage(loc: int) -> int:
    return loc >> LOC_ZSPAGE_SHIFT


def loc_slot(loc: int) -> int:
    return loc & LOC_SLOT_MASK


def loc_frame(loc: int) -> int:
    return loc & LOC_FRAME_MASK


def slot_next(hdr: int) -> int:
    return hdr & SLOT_END


class PoolError(Exception):
    """Misuse of the pool API: bad sizes or unknown handles."""


class PoolFull(Exception):
    """No frame is available under the frame limit or the pool's capacity."""


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
# Slot positions depend on the class table, so a state made under another
# table must not be attached: the header records this fingerprint.
CLASSES_ID = zlib.crc32(
    b"".join(c.size.to_bytes(2, "little") + bytes([c.frames_per_zspage]) for c in CLASSES) + bytes([HEADER])
)


def pool_geometry(max_frames: int, max_handles: int, npages: int = 0) -> Geometry:
    return Geometry(npages, max_frames, max_handles, CLASSES_ID)


class Pool:
    """The allocator.  ``max_frames`` bounds its virtual size; ``frame_limit``
    (0 = none) is the memory limit in frames and may change at any time.

    Without ``state`` it makes a fresh one.  With one (attached after a
    crash), its volatile indexes are garbage until the store's ``rebuild``
    has run ``begin_rebuild``/``claim_*``/``finish_rebuild``."""

    def __init__(
        self,
        max_frames: int,
        max_handles: int,
        frame_limit: int = 0,
        reserve_frames: int = 64,
        state: State | None = None,
    ) -> None:
        if max_frames < MAX_FRAMES_PER_ZSPAGE or max_handles < 1:
            raise PoolError("pool needs at least 8 frames and 1 handle")
        if max_handles > _MAX_HANDLE:
            raise PoolError(f"at most {_MAX_HANDLE} handles")
        if state is None:
            state = State.create(pool_geometry(max_frames, max_handles))
        g = state.geometry
        if (g.max_frames, g.max_handles, g.classes_id) != (max_frames, max_handles, CLASSES_ID):
            raise StateError(
                f"state has {g.max_frames} frames, {g.max_handles} handles, class table {g.classes_id:#x}; "
                f"the pool expects {max_frames}, {max_handles}, {CLASSES_ID:#x}"
            )
        self.state = state
        self.max_frames = max_frames
        self.max_handles = max_handles
        self.frame_limit = frame_limit
        self.reserve_frames = reserve_frames
        self.classes = CLASSES
        self.huge_threshold = HUGE_THRESHOLD
        ncls = len(CLASSES)

        self._arena, self._words = state.arena()
        self._frames_made = 0
        self.frame_next = state.view("frame_next")
        # Freed frames: "hot" ones stay resident as a reserve for the write
        # path; the rest are punched out of the memfd and kept on the cold stack.
        self._hot = state.view("hot")
        self._hot_top = 0
        self._cold = state.view("cold")
        self._cold_top = 0
        self.frames_used = 0

        self.zs_first = state.view("zs_first")
        self.zs_class = state.view("zs_class")
        self.zs_inuse = state.view("zs_inuse")
        self.zs_free = state.view("zs_free")
        self.zs_next = state.view("zs_next")
        self.zs_prev = state.view("zs_prev")
        self.zs_group = state.view("zs_group")
        self._zs_freelist = state.view("zs_stack")
        self._zs_free_top = 0
        self._zs_made = 0  # zspage ids start at 1; 0 means "none"

        self.handles = state.view("handle")
        self._handle_free = state.view("handle_stack")
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
        self._claimed = bytearray(0)  # during a rebuild: 1 per claimed handle
        self._owned = bytearray(0)  # during a rebuild: 1 per owned frame
        self._seen = bytearray(0)  # during a rebuild: 1 per zspage some claim points into
        self._live: list[int] = []  # during a rebuild: zspages some claim points into

    # -- frames -------------------------------------------------------------

    def frame_room(self, over: int = 0) -> int:
        """Frames that may still be taken, under both limit and capacity;
        ``over``: frames past the limit a background move may take (at most
        MOVE_RESERVE)."""
        room = self.max_frames - self.frames_used
        if self.frame_limit:
            room = min(room, self.frame_limit + min(over, MOVE_RESERVE) - self.frames_used)
        return room

    def _take_frame(self) -> int:
        if self._hot_top:
            self._hot_top -= 1
            frame: int = self._hot[self._hot_top]
        elif self._cold_top:
            self._cold_top -= 1
            frame = self._cold[self._cold_top]
        else:
            frame = self._frames_made
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
        top, keep = self._hot_top, self.reserve_frames
        if top <= keep:
            return 0
        frames = sorted(self._hot[keep:top].tolist())
        # Sorted in place, as the native engine's trim does: the stack's
        # tail is volatile, but both engines then leave the same bytes.
        self._hot[keep:top] = array.array("I", frames)
        self._hot_top = keep
        # One punch per run of adjacent frames: freed zspages often are.
        first = prev = frames[0]
        for frame in frames[1:]:
            if frame != prev + 1:
                self.state.punch(first, prev + 1 - first)
                first = frame
            prev = frame
        self.state.punch(first, prev + 1 - first)
        cold, top = self._cold, self._cold_top
        for frame in reversed(frames):  # lowest frames are reused first
            cold[top] = frame
            top += 1
        self._cold_top = top
        return len(frames)

    def refill_reserve(self) -> int:
        """Fault in free frames until the hot reserve is full (not on the write path)."""
        added = 0
        while self._hot_top < self.reserve_frames and (self._cold_top or self._frames_made < self.max_frames):
            hot, self._hot_top = self._hot_top, 0  # make _take_frame skip the hot stack
            frame = self._take_frame()
            self._hot_top = hot
            self.frames_used -= 1
            self._arena[frame << FRAME_SHIFT] = 0  # fault it in now
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
            h: int = self._handle_free[self._handle_free_top]
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
        w: int = self.handles[h]
        return w

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
        frame: int = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        return frame, offset & (FRAME_SIZE - 1)

    def _thread_free(self, z: int, cls: int, slots: list[int]) -> None:
        """Make ``slots`` (ascending) zspage ``z``'s free list, in slot headers."""
        size = self._csize[cls]
        words = self._words
        nxt = SLOT_END
        for slot in reversed(slots):
            frame, off = self._slot_addr(z, size, slot)
            words[((frame << FRAME_SHIFT) + off) >> 2] = SLOT_FREE | nxt
            nxt = slot
        self.zs_free[z] = nxt

    def _new_zspage(self, cls: int, over: int = 0) -> int:
        c = self.classes[cls]
        if self.frame_room(over) < c.frames_per_zspage:
            raise PoolFull(f"no room for a {c.frames_per_zspage}-frame zspage")
        if self._zs_free_top:
            self._zs_free_top -= 1
            z: int = self._zs_freelist[self._zs_free_top]
        else:
            self._zs_made += 1
            z = self._zs_made
        frames = [self._take_frame() for _ in range(c.frames_per_zspage)]
        # The chain, class and first frame are persistent: all written before
        # any slot of this zspage is handed out (crash rule 1).
        for a, b in zip(frames, frames[1:]):
            self.frame_next[a] = b
        self.zs_first[z] = frames[0]
        self.zs_class[z] = cls
        self.zs_inuse[z] = 0
        self.zs_free[z] = 0
        # Thread the free list through the slot headers.
        words = self._words
        last = c.objs_per_zspage - 1
        for slot in range(c.objs_per_zspage):
            offset = slot * c.size
            at = ((frames[offset >> FRAME_SHIFT] << FRAME_SHIFT) + (offset & (FRAME_SIZE - 1))) >> 2
            words[at] = SLOT_FREE | (slot + 1 if slot < last else SLOT_END)
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
        slot: int = self.zs_free[z]
        offset = slot * self._csize[cls]  # _slot_addr, inlined: once per stored page
        frame: int = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        off = offset & (FRAME_SIZE - 1)
        words = self._words
        at = ((frame << FRAME_SHIFT) + off) >> 2
        self.zs_free[z] = slot_next(words[at])
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
        self._words[((frame << FRAME_SHIFT) + off) >> 2] = SLOT_FREE | self.zs_free[z]
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
        base = frame << FRAME_SHIFT
        first = min(len(data), FRAME_SIZE - off)
        self._arena[base + off : base + off + first] = data[:first]
        if first < len(data):
            base2 = self.frame_next[frame] << FRAME_SHIFT
            self._arena[base2 : base2 + len(data) - first] = data[first:]

    def _get(self, frame: int, off: int, n: int) -> memoryview | bytes:
        arena = self._arena
        base = frame << FRAME_SHIFT
        if off + n <= FRAME_SIZE:
            return arena[base + off : base + off + n]
        base2 = self.frame_next[frame] << FRAME_SHIFT
        return bytes(arena[base + off : base + FRAME_SIZE]) + arena[base2 : base2 + off + n - FRAME_SIZE]

    # -- public object API ----------------------------------------------------

    def store(self, data: bytes | bytearray | memoryview, over: int = 0) -> int:
        """Store a payload and return its handle.  A payload of exactly 4096
        bytes is a huge object; anything from ``huge_threshold`` up should be
        passed as the raw page instead, because packing it gains nothing.
        ``over``: frames past the limit it may take, for a background move
        (at most MOVE_RESERVE; 0 for a write)."""
        n = len(data)
        if not 0 <= over <= MOVE_RESERVE:
            raise PoolError(f"a move may take at most {MOVE_RESERVE} frames past the limit, not {over}")
        if n > FRAME_SIZE:
            raise PoolError(f"object of {n} bytes is larger than a frame ({FRAME_SIZE})")
        if n == 0:
            raise PoolError("empty object")
        if n == FRAME_SIZE:
            if self.frame_room(over) < 1:
                raise PoolFull("no room for a huge object")
            h = self._new_handle(0)
            frame = self._take_frame()
            at = frame << FRAME_SHIFT
            self._arena[at : at + FRAME_SIZE] = data
            self.handles[h] = LOC_HUGE | frame  # last: crash rule 1
            self.huge_objects += 1
            self.obj_bytes += FRAME_SIZE
            return h
        if n + HEADER > FRAME_SIZE:
            raise PoolError(f"object of {n} bytes needs the raw page form (>= {self.huge_threshold})")
        cls = _CLASS_OF[n + HEADER]
        # The fullest zspage with a free slot, or a new one.
        mask = self._nonempty[cls]
        z = self._heads[cls * (GROUPS + 1) + mask.bit_length() - 1] if mask else self._new_zspage(cls, over)
        h = self._new_handle(0)
        slot, frame, off = self._pop_slot(z, cls, h)
        if off + HEADER + n <= FRAME_SIZE:
            at = (frame << FRAME_SHIFT) + off + HEADER
            self._arena[at : at + n] = data
        else:
            self._put(frame, off + HEADER, data)
        self.handles[h] = obj_loc(z, slot)  # last: crash rule 1
        self.obj_bytes += n
        return h

    def load(self, h: int, n: int) -> memoryview | bytes:
        """The first ``n`` bytes of object ``h``.  A memoryview into the pool
        is valid only until the pool is next changed."""
        loc = self.handles[h]
        if loc & LOC_HUGE:
            at = loc_frame(loc) << FRAME_SHIFT
            return self._arena[at : at + n]
        # _slot_addr and _get, inlined: once per page read.
        z = loc_zspage(loc)
        offset = loc_slot(loc) * self._csize[self.zs_class[z]]
        frame = self.zs_first[z]
        for _ in range(offset >> FRAME_SHIFT):
            frame = self.frame_next[frame]
        off = (offset & (FRAME_SIZE - 1)) + HEADER
        if off + n <= FRAME_SIZE:
            at = (frame << FRAME_SHIFT) + off
            return self._arena[at : at + n]
        return self._get(frame, off, n)

    def free(self, h: int, n: int) -> None:
        """Free object ``h`` whose payload is ``n`` bytes long.  The caller
        must already have stopped naming ``h`` (crash rule 2)."""
        self._check_handle(h)
        loc = self.handles[h]
        self.obj_bytes -= n
        if loc & LOC_HUGE:
            self._give_frame(loc_frame(loc))
            self.huge_objects -= 1
        else:
            z = loc_zspage(loc)
            self._push_slot(z, self.zs_class[z], loc_slot(loc))
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
                    hdr = self._words[((frame << FRAME_SHIFT) + off) >> 2]
                    if not hdr & SLOT_FREE:
                        break
                    slot += 1
                # Crash rule 3: copy (header, then payload), switch the
                # handle, then free the old slot.
                dslot, dframe, doff = self._pop_slot(dst, cls, hdr)
                payload = bytes(self._get(frame, off + HEADER, c.size - HEADER))
                self._put(dframe, doff + HEADER, payload)
                self.handles[hdr] = obj_loc(dst, dslot)
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

    # -- the volatile scalars, shared with the native engine ---------------------

    # Volatile scalar -> attribute; the native engine uses the names.
    _SCALARS = {"frames_made": "_frames_made", "hot_top": "_hot_top", "cold_top": "_cold_top",
                "frames_used": "frames_used", "zs_free_top": "_zs_free_top", "zs_made": "_zs_made",
                "handle_free_top": "_handle_free_top", "handles_made": "_handles_made",
                "handles_used": "handles_used", "huge_objects": "huge_objects", "obj_bytes": "obj_bytes",
                "pages_compacted": "pages_compacted"}  # fmt: skip

    def volatile(self) -> dict[str, Any]:
        """The volatile indexes kept outside the state's tables (stack tops,
        list heads, per-class totals), under the names the native engine's
        ``volatile()``/``set_volatile()`` use: an engine adopts them after
        this pool's rebuild, and this pool adopts an engine's to check it."""
        out: dict[str, Any] = {name: getattr(self, attr) for name, attr in self._SCALARS.items()}
        out["heads"] = list(self._heads)
        out["nonempty"] = list(self._nonempty)
        out["cls_zspages"] = list(self.cls_zspages)
        out["cls_used"] = list(self.cls_used)
        out["fragmented"] = sorted(self._fragmented)
        return out

    def set_volatile(self, v: Mapping[str, Any]) -> None:
        for name, attr in self._SCALARS.items():
            setattr(self, attr, int(v[name]))
        self._heads = [int(x) for x in v["heads"]]
        self._nonempty = [int(x) for x in v["nonempty"]]
        self.cls_zspages = [int(x) for x in v["cls_zspages"]]
        self.cls_used = [int(x) for x in v["cls_used"]]
        self._fragmented = {int(x) for x in v["fragmented"]}

    # -- rebuild after a crash ------------------------------------------------

    def begin_rebuild(self) -> None:
        """Forget every volatile index; the owner then claims what it names."""
        ncls = len(self.classes)
        self._frames_made = self._hot_top = self._cold_top = self.frames_used = 0
        self._zs_free_top = self._zs_made = 0
        self._handle_free_top = self._handles_made = self.handles_used = 0
        self._heads = [0] * (ncls * (GROUPS + 1))
        self._nonempty = [0] * ncls
        self.cls_zspages = [0] * ncls
        self.cls_used = [0] * ncls
        self.huge_objects = self.obj_bytes = 0
        self._fragmented = set()
        self._claimed = bytearray(self.max_handles + 1)
        self._owned = bytearray(self.max_frames)
        self._seen = bytearray(self.max_frames + 1)
        self._live = []

    def _claim_handle(self, h: int) -> None:
        if not 0 < h <= self.max_handles:
            raise StateError(f"a page names handle {h}, outside 1..{self.max_handles}")
        if self._claimed[h]:
            raise StateError(f"handle {h} is named by two pages")
        self._claimed[h] = 1
        if h > self._handles_made:
            self._handles_made = h
        self.handles_used += 1

    def _own_frame(self, frame: int, what: str) -> None:
        if not 0 <= frame < self.max_frames:
            raise StateError(f"{what} names frame {frame}, outside 0..{self.max_frames - 1}")
        if self._owned[frame]:
            raise StateError(f"frame {frame} is owned twice ({what})")
        self._owned[frame] = 1
        self.frames_used += 1
        if frame >= self._frames_made:
            self._frames_made = frame + 1

    def claim_word(self, h: int) -> None:
        """Rebuild: a page names ``h`` as a word handle."""
        self._claim_handle(h)

    def claim_object(self, h: int, n: int) -> None:
        """Rebuild: a page names ``h`` as an object of ``n`` payload bytes."""
        self._claim_handle(h)
        loc = self.handles[h]
        if n == FRAME_SIZE:
            if not loc & LOC_HUGE:
                raise StateError(f"handle {h} holds a raw page but its entry {loc:#x} is not a huge location")
            self._own_frame(loc_frame(loc), f"huge handle {h}")
            self.huge_objects += 1
            self.obj_bytes += n
            return
        if loc & LOC_HUGE or not 0 < n < self.huge_threshold:
            raise StateError(f"handle {h} of a {n}-byte object has entry {loc:#x}")
        z, slot = loc_zspage(loc), loc_slot(loc)
        if not 0 < z < self.max_frames + 1:
            raise StateError(f"handle {h} points into zspage {z}, outside 1..{self.max_frames}")
        if not self._seen[z]:  # first claim into z: check and own its chain
            cls = self.zs_class[z]
            if cls >= len(self.classes):
                raise StateError(f"zspage {z} has class {cls}, there are {len(self.classes)}")
            frame: int = self.zs_first[z]
            for i in range(self.classes[cls].frames_per_zspage):
                if i:
                    frame = self.frame_next[frame]
                self._own_frame(frame, f"zspage {z}")
            self._seen[z] = 1
            self.zs_inuse[z] = 0
            self._live.append(z)
            if z > self._zs_made:
                self._zs_made = z
        cls = self.zs_class[z]
        c = self.classes[cls]
        if slot >= c.objs_per_zspage or _CLASS_OF[n + HEADER] != cls:
            raise StateError(f"handle {h}: slot {slot} of zspage {z} (class {c.size}) cannot hold {n} bytes")
        frame, off = self._slot_addr(z, c.size, slot)
        hdr = self._words[((frame << FRAME_SHIFT) + off) >> 2]
        if hdr != h:
            raise StateError(f"handle {h} points to slot {slot} of zspage {z}, whose header names {hdr:#x}")
        self.zs_inuse[z] += 1
        self.cls_used[cls] += 1
        self.obj_bytes += n

    def finish_rebuild(self) -> None:
        """Rebuild: free what nothing claimed and rebuild every index."""
        claimed, owned = self._claimed, self._owned
        # Handles: the unclaimed ones below the highest claimed are free.
        top = 0
        for h in range(self._handles_made, 0, -1):
            if not claimed[h]:
                self._handle_free[top] = h
                top += 1
        self._handle_free_top = top
        # Live zspages: slots no claimed handle points to become free.
        live = self._seen
        for z in self._live:
            cls = self.zs_class[z]
            c = self.classes[cls]
            free = []
            for slot in range(c.objs_per_zspage):
                frame, off = self._slot_addr(z, c.size, slot)
                hdr = self._words[((frame << FRAME_SHIFT) + off) >> 2]
                if hdr & SLOT_FREE or not 0 < hdr <= self.max_handles or not claimed[hdr]:
                    free.append(slot)
                elif self.handles[hdr] != obj_loc(z, slot):
                    free.append(slot)  # the other copy of a compaction move
            if c.objs_per_zspage - len(free) != self.zs_inuse[z]:
                raise StateError(f"zspage {z}: {self.zs_inuse[z]} claims, {c.objs_per_zspage - len(free)} owned slots")
            self._thread_free(z, cls, free)
            self.cls_zspages[cls] += 1
            self.zs_group[z] = 0
            self._link(z, cls, self._gtab[cls][self.zs_inuse[z]])
            if free:
                self._fragmented.add(cls)
        top = 0
        for z in range(self._zs_made, 0, -1):
            if not live[z]:
                self._zs_freelist[top] = z
                top += 1
        self._zs_free_top = top
        # Frames: punch every free one (it may hold a dead object) and keep it
        # cold; punch everything above the highest owned in one go.
        made = self._frames_made
        free_frames = [f for f in range(made) if not owned[f]]
        run_start = -1
        for i, f in enumerate(free_frames):
            if run_start < 0:
                run_start = f
            if i + 1 == len(free_frames) or free_frames[i + 1] != f + 1:
                self.state.punch(run_start, f + 1 - run_start)
                run_start = -1
        self.state.punch(made, self.max_frames - made)
        for i, f in enumerate(reversed(free_frames)):
            self._cold[i] = f
        self._cold_top = len(free_frames)
        self._claimed = bytearray(0)
        self._owned = bytearray(0)
        self._seen = bytearray(0)
        self._live = []

    # -- stats --------------------------------------------------------------

    @property
    def mem_used_total(self) -> int:
        return self.frames_used * FRAME_SIZE

    def metadata_bytes(self) -> int:
        """Bytes the pool's tables hold resident (mincore): handle entries,
        zspage records, frame links and the free stacks."""
        return self.state.resident_bytes([t.name for t in self.state.tables if t.name != "page"])

    def class_stats(self) -> list[dict[str, Any]]:
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
                    "fullness": self.fullness(i),
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
                "fullness": [0] * GROUPS + [self.huge_objects],
            }
        )
        return out

    def fullness(self, cls: int) -> list[int]:
        """A class's zspages by fullness group (FULLNESS_LABELS): the length
        of each group's list, then the full ones, which sit on no list.
        A native engine's lists can change under this walk (its heads were
        copied a moment ago); the walk stops after the class's zspage count,
        so it ends, and what it returns is then a close estimate."""
        out = [0] * (GROUPS + 1)
        left = self.cls_zspages[cls]
        for group in range(1, GROUPS + 1):
            z = self._heads[cls * (GROUPS + 1) + group]
            while z and left > 0:
                out[group - 1] += 1
                left -= 1
                z = self.zs_next[z]
        out[GROUPS] = max(0, left)
        return out
