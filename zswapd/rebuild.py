"""The rebuild scan and the invariant check, in Python: what the Python
engine runs when a worker attaches to a state, and the reference that the C
engine's zswapd/engine/rebuild.c follows step for step (tests/test_state.py
compares the bytes both leave and the errors both raise).

rebuild_pages  the page table's resident extents once: each entry's handle
               is claimed (pool.Pool.begin_rebuild, claim_word, claim_object,
               finish_rebuild, which free what nothing claims and rebuild
               every volatile index); returns the page counters.
check_pages    owners from the page table and the page counters against it,
               then check_pool: every volatile index of the pool against the
               persistent tables and the owners.

The crash rules they rely on are at the top of pool.py and store.py.  This
module reads the pool's private indexes: it is the pool's own check, kept
apart from the allocator only for length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from . import backing, entry
from .codec import ALGO_ZSTD, ALGORITHMS, KIND_COMPRESSED, KIND_HUGE, KIND_SAME, PAGE_SIZE
from .pool import (
    FRAME_SHIFT,
    FRAME_SIZE,
    GROUP_FULL,
    GROUPS,
    LOC_HUGE,
    SLOT_END,
    SLOT_FREE,
    Pool,
    loc_frame,
    loc_slot,
    loc_zspage,
    obj_loc,
    slot_next,
)
from .state import DICT_MAX_BYTES, DICT_SLOTS, MAX_SEGMENTS, StateError

Extents = Sequence[tuple[int, int]]


def _stored(table: memoryview, extents: Extents) -> Iterator[tuple[int, int, int, int]]:
    """(page, entry, kind, handle) of each page in ``extents`` that holds
    something, in page order."""
    for first, end in extents:
        for idx, e in enumerate(table[first:end].tolist(), first):
            kind = entry.kind(e)
            if kind:
                yield idx, e, kind, entry.handle(e)


def rebuild_pages(pool: Pool, table: memoryview, extents: Extents) -> tuple[int, int, int]:
    """The rebuild scan in Python (the reference): the page table once,
    claiming each named handle, then pool.finish_rebuild.  Returns
    (pages_stored, same_pages, huge_pages)."""
    stored = same = huge = 0
    nalgos = len(ALGORITHMS)
    pool.begin_rebuild()
    heads = pool.state.view("dict_head")
    refs = pool.state.view("dict_refs")
    for slot in range(1, DICT_SLOTS + 1):
        head = heads[slot]
        refs[slot] = 0
        if head and (not head & 0xFFFFFFFF or head & 0xFFFFFFFF > DICT_MAX_BYTES or not head >> 32):
            raise StateError(f"dictionary slot {slot} has a bad head {head:#x}")
    for idx, e, kind, h in _stored(table, extents):
        if e & entry.UNUSED:
            raise StateError(f"page {idx}: entry {e:#x} has bits set that no entry uses")
        stored += 1
        backed = e & entry.BACKED  # its object in the file: rebuild_segments' part, its dictionary here
        try:
            if kind == KIND_SAME and not backed:
                pool.claim_word(h)
                same += 1
                continue
            n = entry.length(e)
            tier = entry.tier(e)
            if (kind == KIND_HUGE) != (n == PAGE_SIZE) or entry.algo(e) >= nalgos:
                raise StateError(f"entry {e:#x} has a bad length or algorithm for its kind")
            if tier and (kind != KIND_COMPRESSED or entry.algo(e) != ALGO_ZSTD):
                raise StateError(f"entry {e:#x} names tier {tier} but is not a zstd object")
            if tier and tier != entry.TIER_PLAIN and not heads[tier]:
                raise StateError(f"entry {e:#x} names dictionary slot {tier}, which the state does not hold")
            if not backed:
                pool.claim_object(h, n)
                huge += kind == KIND_HUGE
            if tier and tier != entry.TIER_PLAIN:
                refs[tier] += 1
        except StateError as err:
            raise StateError(f"page {idx}: {err}") from None
    pool.finish_rebuild()
    return stored, same, huge


def check_pages(pool: Pool, table: memoryview, extents: Extents, counts: tuple[int, int, int]) -> None:
    """The invariant check in Python (the reference): owners from the page
    table, the counters (pages_stored, same_pages, huge_pages) against it,
    then check_pool."""
    owners: dict[int, int] = {}
    same = huge = stored = 0
    drefs = [0] * (DICT_SLOTS + 1)
    for idx, e, kind, h in _stored(table, extents):
        if e & entry.BACKED:
            stored += 1
            if 0 < entry.tier(e) <= DICT_SLOTS:
                drefs[entry.tier(e)] += 1
            continue
        if h in owners:
            raise StateError(f"page {idx} names handle {h}, which another page names too")
        stored += 1
        same += kind == KIND_SAME
        huge += kind == KIND_HUGE
        owners[h] = -1 if kind == KIND_SAME else entry.length(e)
        if 0 < entry.tier(e) <= DICT_SLOTS:
            drefs[entry.tier(e)] += 1
    refs = pool.state.view("dict_refs")
    last = [
        f"dictionary slot {slot}: {refs[slot]} references counted, {drefs[slot]} entries name it"
        for slot in range(1, DICT_SLOTS + 1)
        if refs[slot] != drefs[slot]
    ]
    if (stored, same, huge) != counts:
        raise StateError(
            f"counters say {counts[0]} stored, {counts[1]} same-filled, {counts[2]} huge pages; "
            f"the page table holds {stored}, {same}, {huge}"
        )
    check_pool(pool, owners, last)


def check_pool(pool: Pool, owners: Mapping[int, int], last: Sequence[str] = ()) -> None:
    """Verify every volatile index against the persistent tables, given
    the owners' view: handle -> payload length (-1 for a word handle).
    Raises StateError naming each broken invariant (``last``: those the
    caller found, reported after the pool's)."""
    errors: list[str] = []

    def bad(msg: str) -> None:
        if len(errors) < 20:
            errors.append(msg)

    # Handles: owned once (the owner checks that), free once, nothing lost.
    free_h = pool._handle_free[: pool._handle_free_top].tolist()
    if len(set(free_h)) != len(free_h):
        bad("a handle is on the free stack twice")
    for h in free_h:
        if not 0 < h <= pool._handles_made or h in owners:
            bad(f"free handle {h} is out of range or owned")
    if len(owners) + len(free_h) != pool._handles_made:
        bad(f"{len(owners)} owned + {len(free_h)} free handles != {pool._handles_made} made")
    if pool.handles_used != len(owners):
        bad(f"handles_used {pool.handles_used} != {len(owners)} owned")
    # Objects, from the owners' side.
    frame_owner: dict[int, str] = {}
    per_zspage: dict[int, set[int]] = {}
    obj_bytes = huge = 0
    for h, n in owners.items():
        if not 0 < h <= pool._handles_made:
            bad(f"owned handle {h} is outside 1..{pool._handles_made}")
            continue
        if n < 0:
            continue
        obj_bytes += n
        loc = pool.handles[h]
        if n == FRAME_SIZE:
            huge += 1
            frame = loc_frame(loc)
            if not loc & LOC_HUGE or frame >= pool._frames_made:
                bad(f"huge handle {h} has entry {loc:#x}")
            elif frame in frame_owner:
                bad(f"frame {frame} owned by huge handle {h} and {frame_owner[frame]}")
            else:
                frame_owner[frame] = f"huge handle {h}"
            continue
        z, slot = loc_zspage(loc), loc_slot(loc)
        if loc & LOC_HUGE or not 0 < z <= pool._zs_made:
            bad(f"handle {h} has entry {loc:#x}")
            continue
        per_zspage.setdefault(z, set()).add(slot)
    if obj_bytes != pool.obj_bytes:
        bad(f"obj_bytes {pool.obj_bytes} != {obj_bytes} owned")
    if huge != pool.huge_objects:
        bad(f"huge_objects {pool.huge_objects} != {huge} owned")
    # Zspages: live ones against their slot headers, lists and totals.
    free_z = pool._zs_freelist[: pool._zs_free_top].tolist()
    if len(set(free_z)) != len(free_z) or any(not 0 < z <= pool._zs_made for z in free_z):
        bad("the free zspage stack has duplicates or ids out of range")
    free_zs = set(free_z)
    in_lists: dict[int, int] = {}
    for cls in range(len(pool.classes)):
        for group in range(1, GROUPS + 1):
            z = pool._heads[cls * (GROUPS + 1) + group]
            if bool(z) != bool(pool._nonempty[cls] & 1 << group):
                bad(f"class {cls} group {group}: nonempty bit disagrees with the list")
            prev = 0
            while z:
                if z in in_lists:
                    bad(f"zspage {z} is on two fullness lists (or a list loops)")
                    break
                in_lists[z] = group
                if pool.zs_prev[z] != prev or pool.zs_class[z] != cls:
                    bad(f"zspage {z}: bad back link or class on list {cls}/{group}")
                prev, z = z, pool.zs_next[z]
    cls_zspages = [0] * len(pool.classes)
    cls_used = [0] * len(pool.classes)
    for z in range(1, pool._zs_made + 1):
        if z in free_zs:
            if z in per_zspage:
                bad(f"zspage {z} is free but handles {sorted(per_zspage[z])[:4]} point into it")
            continue
        cls = pool.zs_class[z]
        if cls >= len(pool.classes):
            bad(f"zspage {z} has class {cls}")
            continue
        c = pool.classes[cls]
        cls_zspages[cls] += 1
        frame = pool.zs_first[z]
        for i in range(c.frames_per_zspage):
            if i:
                frame = pool.frame_next[frame]
            if frame >= pool._frames_made:
                bad(f"zspage {z} chains frame {frame} beyond {pool._frames_made} made")
            elif frame in frame_owner:
                bad(f"frame {frame} owned by zspage {z} and {frame_owner[frame]}")
            else:
                frame_owner[frame] = f"zspage {z}"
        used = per_zspage.get(z, set())
        cls_used[cls] += len(used)
        if pool.zs_inuse[z] != len(used) or not used:
            bad(f"zspage {z}: inuse {pool.zs_inuse[z]}, {len(used)} owned objects")
        for slot in used:
            if slot >= c.objs_per_zspage:
                bad(f"zspage {z}: slot {slot} beyond {c.objs_per_zspage}")
                continue
            f, off = pool._slot_addr(z, c.size, slot)
            hdr = pool._words[((f << FRAME_SHIFT) + off) >> 2]
            if hdr > pool.max_handles or pool.handles[hdr] != obj_loc(z, slot):
                bad(f"zspage {z} slot {slot}: header {hdr:#x} does not name its owner")
        # The free list threads exactly the unowned slots.
        seen: set[int] = set()
        slot = pool.zs_free[z]
        while slot != SLOT_END and len(seen) <= c.objs_per_zspage:
            if slot in seen or slot in used or slot >= c.objs_per_zspage:
                bad(f"zspage {z}: free list reaches slot {slot} twice, owned or out of range")
                break
            seen.add(slot)
            f, off = pool._slot_addr(z, c.size, slot)
            hdr = pool._words[((f << FRAME_SHIFT) + off) >> 2]
            if not hdr & SLOT_FREE:
                bad(f"zspage {z}: free slot {slot} has an owned header {hdr:#x}")
                break
            slot = slot_next(hdr)
        if len(seen) + len(used) != c.objs_per_zspage:
            bad(f"zspage {z}: {len(seen)} free + {len(used)} owned slots != {c.objs_per_zspage}")
        group = pool._group_of(pool.zs_inuse[z], c.objs_per_zspage)  # any inuse, even a corrupt one
        if pool.zs_group[z] != group or in_lists.get(z, GROUP_FULL) != group:
            bad(f"zspage {z}: group {pool.zs_group[z]}, listed in {in_lists.get(z)}, should be {group}")
    if cls_zspages != pool.cls_zspages:
        bad("per-class zspage counts are wrong")
    if cls_used != pool.cls_used:
        bad("per-class object counts are wrong")
    # Frames: owned ones once, free ones once on the hot or cold stack.
    if pool.frames_used != len(frame_owner):
        bad(f"frames_used {pool.frames_used} != {len(frame_owner)} owned")
    stacks = pool._hot[: pool._hot_top].tolist() + pool._cold[: pool._cold_top].tolist()
    if len(set(stacks)) != len(stacks):
        bad("a free frame is on the hot/cold stacks twice")
    for f in stacks:
        if f in frame_owner or not 0 <= f < pool._frames_made:
            bad(f"free frame {f} is owned by {frame_owner.get(f)} or out of range")
    if len(stacks) + len(frame_owner) != pool._frames_made:
        bad(f"{len(stacks)} free + {len(frame_owner)} owned frames != {pool._frames_made} made")
    for msg in last:
        bad(msg)
    if errors:
        raise StateError("pool invariants broken: " + "; ".join(errors))


def _segment_words(segs: memoryview, segments: Extents) -> Iterator[tuple[int, int]]:
    for first, end in segments:
        for s, w in enumerate(segs[first:end].tolist(), first):
            if w:
                yield s, w


def _backed(table: memoryview, pages: Extents) -> Iterator[tuple[int, int, int, int]]:
    """(page, entry, segment, offset in it) of each backed page, checked:
    a bad length, kind or location raises StateError."""
    for idx, e, kind, _ in _stored(table, pages):
        if not e & entry.BACKED:
            continue
        n = entry.length(e)
        off = entry.location(e) * backing.OBJ_ALIGN
        seg, at = off >> backing.SEG_SHIFT, off & (backing.SEG_SIZE - 1)
        if (
            kind not in (KIND_HUGE, KIND_COMPRESSED)
            or not 0 < n <= PAGE_SIZE
            or (kind == KIND_HUGE) != (n == PAGE_SIZE)
        ):
            raise StateError(f"page {idx}: backed entry {e:#x} has a bad kind or length")
        if seg >= MAX_SEGMENTS or at + backing.span(n) > backing.SEG_SIZE:
            raise StateError(f"page {idx}: backed entry {e:#x} names no segment's object")
        yield idx, e, seg, at


def rebuild_segments(table: memoryview, segs: memoryview, pages: Extents, segments: Extents) -> int:
    """The segment table after a crash (the reference for backing.c's
    rebuild_segments): every segment in use made full with no live bytes,
    then each backed page's object counted live in its segment, which must
    be in use and hold the object below its fill.  Returns bd_count."""
    for s, w in _segment_words(segs, segments):
        state = backing.seg_state(w)
        if state == backing.SEG_FREE:
            raise StateError(f"segment {s}: free, but its word is {w:#x}")
        segs[s] = backing.seg_word(0, backing.seg_fill(w), backing.SEG_FULL)
    count = 0
    for idx, e, seg, at in _backed(table, pages):
        w = segs[seg]
        sp = backing.span(entry.length(e))
        if backing.seg_state(w) == backing.SEG_FREE or at + sp > backing.seg_fill(w):
            raise StateError(f"page {idx}: backed entry {e:#x} points past what segment {seg} holds")
        segs[seg] = w + sp
        count += 1
    return count


def check_segments(table: memoryview, segs: memoryview, pages: Extents, segments: Extents, bd_count: int) -> None:
    """The segment table's live bytes and states against the backed pages,
    and bd_count against their number (backing.c's check_segments)."""
    live: dict[int, int] = {}
    count = 0
    for _idx, e, seg, _at in _backed(table, pages):
        live[seg] = live.get(seg, 0) + backing.span(entry.length(e))
        count += 1
    errors: list[str] = []
    if count != bd_count:
        errors.append(f"bd_count {bd_count} != {count} backed pages")
    seen = set()
    for s, w in _segment_words(segs, segments):
        seen.add(s)
        if backing.seg_state(w) == backing.SEG_FREE:
            errors.append(f"segment {s} is free but its word is {w:#x}")
        elif backing.seg_live(w) != live.get(s, 0) or backing.seg_live(w) > backing.seg_fill(w):
            errors.append(
                f"segment {s}: live {backing.seg_live(w)}, fill {backing.seg_fill(w)}, pages name {live.get(s, 0)}"
            )
    for s in sorted(set(live) - seen)[:4]:
        errors.append(f"segment {s} is free but pages name {live[s]} bytes in it")
    if errors:
        raise StateError("backing invariants broken: " + "; ".join(errors[:20]))
