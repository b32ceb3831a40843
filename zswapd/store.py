"""The page store: the device as a page table over the pool, plus the memory
limit and the compaction policy.

Glossary (shared with pool.py, state.py and codec.py):

page         4096 bytes of the device, numbered from 0.
page table   one packed 64-bit entry per page, in the state's "page" table:
               bits 0-1   kind: 0 empty (reads as zeros), 1 same-filled,
                          2 compressed, 3 huge (raw page)
               bits 2-3   algorithm of a compressed page (codec.ALGORITHMS,
                          whose order the state header records)
               bits 4-16  payload length in bytes
               bits 32-62 handle in the pool (for a same-filled page, the
                          handle holds the fill word and owns no frames)
limit        the most frames the pool may use (``mem_used_total``, as zram's
             ``mem_limit``); 0 means no limit.
full         set when a store could not fit even after compaction; stores are
             then refused until usage falls below ``accept_percent`` of the
             limit (zswap's accept threshold), so the edge does not thrash.

Crash consistency
-----------------
The page table is where a rebuild starts: a page's contents are whatever its
entry names, and every entry is switched by one aligned 8-byte store, which a
process's death cannot tear.  So every mutation is ordered:

1. write, rewrite: the new object (or word handle) is complete in the pool
   first (pool.py, rule 1), then the entry is switched to it, then the old
   object is freed.  A crash before the switch leaves the old page and an
   unowned new object; after it, the new page and an old object nothing
   names.  Either way the page reads as before or after the write.
2. discard: the entry is zeroed first, then the object is freed.
3. compaction moves objects under their handles and never touches the page
   table (pool.py, rule 3).
4. partial-page writes read, modify and store a whole page: rule 1 again.

``rebuild`` (run when a Store attaches to an existing state) walks the page
table once (skipping its holes), lets the pool claim each named handle, and
frees every object and handle no page names; the counters derived from the
contents (pages_stored, same_pages, huge_pages, compr_data_size) are
recounted, and the event counters come back from the header snapshot that
``stats()`` refreshes.  ``check_invariants`` then verifies that each live
handle is named by exactly one page and every pool index is right.

No I/O here beyond the state's own mappings; deterministic.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

from .codec import ALGORITHMS, KIND_HUGE, KIND_SAME, PAGE_SIZE, Buffer, Codec, fill_page
from .errors import BadRequest, DeviceFull
from .pool import CLASSES, FRAME_SIZE, MAX_FRAMES_PER_ZSPAGE, Pool, PoolFull, pool_geometry
from .state import Geometry, State, StateError

_KIND_MASK = 0x3
_LEN_SHIFT = 4
_LEN_MASK = 0x1FFF
_HANDLE_SHIFT = 32
_ZERO_PAGE = bytes(PAGE_SIZE)
# Bound on objects moved by one synchronous compaction on the write path.
SYNC_COMPACT_MOVES = 1 << 14


StoreError = BadRequest
StoreFull = DeviceFull


def store_geometry(size: int, reserve_frames: int = 64) -> Geometry:
    """The state geometry a Store of ``size`` bytes makes for itself."""
    npages = size // PAGE_SIZE
    # The pool never needs more frames than the device has pages, plus the
    # partly filled zspages each class may hold; beyond that compaction
    # always finds room.
    slack = len(CLASSES) * MAX_FRAMES_PER_ZSPAGE + reserve_frames
    return pool_geometry(npages + slack, npages + 64, npages)


# Event counters saved in the state header, in this order (never reorder:
# a new worker reads an older worker's snapshot).
_SAVED = ("num_reads", "num_writes", "failed_reads", "failed_writes", "notify_free", "mem_used_max",
          "compactions", "limit_hits")  # fmt: skip


@dataclass
class Counters:
    num_reads: int = 0
    num_writes: int = 0
    failed_reads: int = 0
    failed_writes: int = 0
    notify_free: int = 0
    same_pages: int = 0
    huge_pages: int = 0
    pages_stored: int = 0
    mem_used_max: int = 0
    compactions: int = 0
    limit_hits: int = 0


def _spans(offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a byte range into (page, offset in page, offset in range, length)."""
    pos = 0
    while pos < length:
        idx, within = divmod(offset + pos, PAGE_SIZE)
        take = min(PAGE_SIZE - within, length - pos)
        yield idx, within, pos, take
        pos += take


class Store:
    def __init__(
        self,
        size: int,
        codec: Codec | None = None,
        memory_limit: int = 0,
        accept_percent: int = 90,
        reserve_frames: int = 64,
        state: State | None = None,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise StoreError(f"device size must be a positive multiple of {PAGE_SIZE}, got {size}")
        if not 0 < accept_percent <= 100:
            raise StoreError(f"accept_percent must be in 1..100, got {accept_percent}")
        self.size = size
        self.npages = size // PAGE_SIZE
        self.codec = codec or Codec()
        attached = state is not None
        if state is None:
            state = State.create(store_geometry(size, reserve_frames), ALGORITHMS)
        elif state.geometry.npages != self.npages:
            raise StoreError(
                f"the state holds a device of {state.geometry.npages} pages, this store is {self.npages} pages"
            )
        elif state.algorithms() != ALGORITHMS:
            raise StoreError(
                f"the state's page table names algorithms {state.algorithms()}, this zswapd has {ALGORITHMS}"
            )
        self.state = state
        g = state.geometry
        self.pool = Pool(g.max_frames, g.max_handles, reserve_frames=reserve_frames, state=state)
        self.table = state.view("page")
        self.c = Counters()
        self.accept_percent = accept_percent
        self.full = False
        self.memory_limit = 0
        if attached:
            self.rebuild()
            self.check_invariants()
        state.save_codec(self.codec.algo_id, self.codec.zstd_level)
        self.set_limit(memory_limit)

    def close(self) -> None:
        """Unmap the state and close this process's fds on it."""
        self.state.close()

    # -- recovery -------------------------------------------------------------

    def rebuild(self) -> None:
        """Recompute every volatile index and derived counter from the page
        table and the pool's persistent tables, freeing what no page names."""
        pool, c = self.pool, Counters()
        pool.begin_rebuild()
        for first, end in self.state.extents("page"):
            for idx, entry in enumerate(self.table[first:end].tolist(), first):
                kind = entry & _KIND_MASK
                if not kind:
                    continue
                h = entry >> _HANDLE_SHIFT
                if entry & (1 << 63) or (entry >> 17) & 0x7FFF:
                    raise StateError(f"page {idx}: entry {entry:#x} has bits set that no entry uses")
                c.pages_stored += 1
                try:
                    if kind == KIND_SAME:
                        pool.claim_word(h)
                        c.same_pages += 1
                        continue
                    n = (entry >> _LEN_SHIFT) & _LEN_MASK
                    if (kind == KIND_HUGE) != (n == PAGE_SIZE) or (entry >> 2) & 0x3 >= len(ALGORITHMS):
                        raise StateError(f"entry {entry:#x} has a bad length or algorithm for its kind")
                    pool.claim_object(h, n)
                    c.huge_pages += kind == KIND_HUGE
                except StateError as e:
                    raise StateError(f"page {idx}: {e}") from None
        pool.finish_rebuild()
        saved = dict(zip(_SAVED, self.state.load_counters(), strict=False))
        for name in _SAVED:
            setattr(c, name, saved.get(name, 0))
        pool.pages_compacted = self.state.load_counters()[len(_SAVED)]
        c.mem_used_max = max(c.mem_used_max, pool.mem_used_total)
        self.c = c

    def check_invariants(self) -> None:
        """Raise StateError unless each live handle is named by exactly one
        page and every pool index agrees with the persistent tables."""
        owners: dict[int, int] = {}
        same = huge = stored = 0
        for first, end in self.state.extents("page"):
            for idx, entry in enumerate(self.table[first:end].tolist(), first):
                kind = entry & _KIND_MASK
                if not kind:
                    continue
                h = entry >> _HANDLE_SHIFT
                if h in owners:
                    raise StateError(f"page {idx} names handle {h}, which another page names too")
                stored += 1
                same += kind == KIND_SAME
                huge += kind == KIND_HUGE
                owners[h] = -1 if kind == KIND_SAME else (entry >> _LEN_SHIFT) & _LEN_MASK
        c = self.c
        if (stored, same, huge) != (c.pages_stored, c.same_pages, c.huge_pages):
            raise StateError(
                f"counters say {c.pages_stored} stored, {c.same_pages} same-filled, {c.huge_pages} huge pages; "
                f"the page table holds {stored}, {same}, {huge}"
            )
        self.pool.check_invariants(owners)

    def save_counters(self) -> None:
        """Snapshot the event counters into the state header."""
        c = self.c
        self.state.save_counters([getattr(c, name) for name in _SAVED] + [self.pool.pages_compacted])

    # -- limit ----------------------------------------------------------------

    def set_limit(self, nbytes: int) -> dict[str, int | bool]:
        """Change the memory limit.  Never drops data: a limit below what is
        stored is kept, compaction runs, and new stores fail until it fits."""
        if nbytes < 0:
            raise StoreError(f"memory limit must be >= 0, got {nbytes}")
        self.memory_limit = nbytes
        self.pool.frame_limit = -(-nbytes // FRAME_SIZE) if nbytes else 0
        moved = 0
        if nbytes and self.pool.mem_used_total > nbytes:
            moved = self.compact()
        met = not nbytes or self.pool.mem_used_total <= nbytes
        self.update_full()
        return {"memory_limit": nbytes, "met": met, "objects_moved": moved}

    def set_accept_percent(self, percent: int) -> None:
        if not 0 < percent <= 100:
            raise StoreError(f"accept_percent must be in 1..100, got {percent}")
        self.accept_percent = percent
        self.update_full()

    def set_algorithm(self, algorithm: str | None = None, zstd_level: int | None = None) -> None:
        """Switch the codec for new writes.  Every page records its own
        algorithm, so pages already stored stay readable."""
        algorithm = self.codec.algorithm if algorithm is None else algorithm
        zstd_level = self.codec.zstd_level if zstd_level is None else zstd_level
        if (algorithm, zstd_level) != (self.codec.algorithm, self.codec.zstd_level):
            self.codec = Codec(algorithm, zstd_level)

    @property
    def mem_used_total(self) -> int:
        return self.pool.mem_used_total

    @property
    def frames_used(self) -> int:
        return self.pool.frames_used

    def refill_reserve(self) -> None:
        """Top up the hot frame reserve; call off the write path."""
        self.pool.refill_reserve()

    def compaction_wanted(self, waste_threshold: int, watermark: int) -> bool:
        """The background policy: compact when the bytes lost to partly used
        zspages pass ``waste_threshold``, or when usage passes ``watermark``
        percent of the limit, and only if compaction can free a frame."""
        pool = self.pool
        waste = pool.mem_used_total - pool.obj_bytes
        high = bool(self.memory_limit) and pool.mem_used_total * 100 >= self.memory_limit * watermark
        return (waste > waste_threshold or high) and pool.freeable_frames() > 0

    def update_full(self) -> None:
        if self.full and (
            not self.memory_limit or self.pool.mem_used_total * 100 < self.memory_limit * self.accept_percent
        ):
            self.full = False

    def compact(self, max_moves: int | None = None) -> int:
        self.c.compactions += 1
        moved = self.pool.compact(max_moves)
        self.update_full()
        return moved

    # -- range checks ---------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise StoreError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise StoreError(f"range {offset}+{length} is beyond the device size {self.size}")

    # -- page level -----------------------------------------------------------

    def _release(self, entry: int) -> None:
        kind = entry & _KIND_MASK
        if not kind:
            return
        h = entry >> _HANDLE_SHIFT
        self.c.pages_stored -= 1
        if kind == KIND_SAME:
            self.pool.free_word(h)
            self.c.same_pages -= 1
        else:
            self.pool.free(h, (entry >> _LEN_SHIFT) & _LEN_MASK)
            if kind == KIND_HUGE:
                self.c.huge_pages -= 1

    def _store_page(self, idx: int, page: Buffer) -> None:
        kind, algo, payload = self.codec.encode(page, self.pool.huge_threshold)
        pool = self.pool
        if self.full and kind != KIND_SAME:
            self.update_full()
            if self.full:
                self.c.failed_writes += 1
                raise StoreFull("pool is full; waiting for usage to fall below the accept threshold")
        # Allocate before freeing the old object: a failed store keeps the page.
        alloc: Any = pool.store_word if kind == KIND_SAME else pool.store
        try:
            h = alloc(payload)
        except PoolFull:
            self.c.limit_hits += 1
            self._make_room()
            try:
                h = alloc(payload)
            except PoolFull:
                self.full = True
                self.c.failed_writes += 1
                raise StoreFull("pool is full and compaction cannot make room") from None
        c = self.c
        if kind == KIND_SAME:
            self.table[idx], old = h << _HANDLE_SHIFT | kind, self.table[idx]
            c.same_pages += 1
        else:
            self.table[idx], old = h << _HANDLE_SHIFT | len(payload) << _LEN_SHIFT | algo << 2 | kind, self.table[idx]  # type: ignore[arg-type]
            if kind == KIND_HUGE:
                c.huge_pages += 1
        c.pages_stored += 1
        if old & _KIND_MASK:
            self._release(old)
        used = pool.mem_used_total
        if used > c.mem_used_max:
            c.mem_used_max = used

    def compact_steps(self, moves_per_step: int) -> Generator[int, None, None]:
        """One compaction run in bounded steps, yielding the objects each step
        moved, so a caller doing I/O can serve requests in between.  It ends
        when nothing is freeable (or when the caller stops iterating)."""
        self.c.compactions += 1
        try:
            while self.pool.freeable_frames():
                moved = self.pool.compact(moves_per_step)
                if not moved:
                    return
                yield moved
        finally:
            self.update_full()

    def _make_room(self) -> None:
        """Synchronous, bounded compaction until a new zspage fits."""
        if self.pool.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
            return  # frames are not what is short (the handle table is)
        budget = SYNC_COMPACT_MOVES
        steps = self.compact_steps(512)
        try:
            for moved in steps:
                budget -= moved
                if budget <= 0 or self.pool.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
                    break
        finally:
            steps.close()

    def _load_page(self, idx: int) -> Buffer:
        entry = self.table[idx]
        kind = entry & _KIND_MASK
        if not kind:
            return _ZERO_PAGE
        h = entry >> _HANDLE_SHIFT
        if kind == KIND_SAME:
            return fill_page(self.pool.word(h))
        data = self.pool.load(h, (entry >> _LEN_SHIFT) & _LEN_MASK)
        if kind == KIND_HUGE:
            return data
        try:
            return self.codec.decompress((entry >> 2) & 0x3, data)
        except Exception:
            self.c.failed_reads += 1
            raise

    def _drop_page(self, idx: int) -> None:
        old = self.table[idx]
        if old & _KIND_MASK:
            self.table[idx] = 0
            self._release(old)
            self.c.notify_free += 1

    # -- byte level -----------------------------------------------------------

    def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at byte ``offset``; partial pages read-modify-write.
        On StoreFull, pages before the failing one are written and the failing
        page keeps its old contents."""
        n = len(data)
        self._check(offset, n)
        self.c.num_writes += 1
        mv = memoryview(data).cast("B")
        try:
            if not offset % PAGE_SIZE and not n % PAGE_SIZE:
                # The swap path: whole pages, so no read-modify-write.
                store_page = self._store_page
                idx = offset // PAGE_SIZE
                for pos in range(0, n, PAGE_SIZE):
                    store_page(idx, mv[pos : pos + PAGE_SIZE])
                    idx += 1
                return n
            for idx, within, pos, take in _spans(offset, n):
                if take == PAGE_SIZE:
                    self._store_page(idx, mv[pos : pos + PAGE_SIZE])
                else:
                    page = bytearray(self._load_page(idx))
                    page[within : within + take] = mv[pos : pos + take]
                    self._store_page(idx, page)
            return n
        finally:
            self.pool.trim()  # also when a store failed part way

    def readinto(self, offset: int, out: memoryview) -> int:
        n = len(out)
        self._check(offset, n)
        self.c.num_reads += 1
        if not offset % PAGE_SIZE and not n % PAGE_SIZE:
            load_page = self._load_page
            idx = offset // PAGE_SIZE
            for pos in range(0, n, PAGE_SIZE):
                out[pos : pos + PAGE_SIZE] = load_page(idx)
                idx += 1
            return n
        for idx, within, pos, take in _spans(offset, n):
            out[pos : pos + take] = self._load_page(idx)[within : within + take]
        return n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def discard(self, offset: int, length: int) -> int:
        """Free the whole pages in the range; zero partial pages at its ends.
        Returns the number of pages freed."""
        self._check(offset, length)
        end = offset + length
        first = -(-offset // PAGE_SIZE)
        last = end // PAGE_SIZE
        if first >= last:
            self._zero_bytes(offset, length)
            return 0
        if offset < first * PAGE_SIZE:
            self._zero_bytes(offset, first * PAGE_SIZE - offset)
        if end > last * PAGE_SIZE:
            self._zero_bytes(last * PAGE_SIZE, end - last * PAGE_SIZE)
        before = self.c.notify_free
        for idx in range(first, last):
            self._drop_page(idx)
        self.pool.trim()
        self.update_full()
        return self.c.notify_free - before

    def _zero_bytes(self, offset: int, length: int) -> None:
        """Zero part of the device, skipping pages that are already empty."""
        end = offset + length
        while offset < end:
            take = min(end, (offset // PAGE_SIZE + 1) * PAGE_SIZE) - offset
            if self.table[offset // PAGE_SIZE] & _KIND_MASK:
                self.write(offset, bytes(take))
            offset += take

    zero_range = discard  # empty pages read as zeros, so zeroing is freeing

    # -- stats ------------------------------------------------------------------

    def free_bytes_estimate(self) -> int:
        """Bytes still writable: empty device pages, or, under a limit, the
        room left at the current compression ratio, whichever is less."""
        empty = (self.npages - self.c.pages_stored) * PAGE_SIZE
        if not self.memory_limit:
            return empty
        used = self.pool.mem_used_total
        room = max(0, self.memory_limit - used)
        ratio = (self.c.pages_stored * PAGE_SIZE / used) if used else 1.0
        return min(empty, int(room * max(ratio, 1.0)))

    def metadata_bytes(self) -> int:
        """What the metadata mappings hold resident (mincore): header, page
        table, handle, zspage and frame tables, free stacks."""
        return self.state.resident_bytes()

    def stats(self) -> dict[str, object]:
        pool = self.pool
        self.save_counters()
        return {
            "orig_data_size": self.c.pages_stored * PAGE_SIZE,
            "compr_data_size": pool.obj_bytes,
            "mem_used_total": pool.mem_used_total,
            "mem_limit": self.memory_limit,
            "mem_used_max": self.c.mem_used_max,
            "same_pages": self.c.same_pages,
            "pages_compacted": pool.pages_compacted,
            "huge_pages": self.c.huge_pages,
            "num_reads": self.c.num_reads,
            "num_writes": self.c.num_writes,
            "failed_reads": self.c.failed_reads,
            "failed_writes": self.c.failed_writes,
            "notify_free": self.c.notify_free,
            "pages_stored": self.c.pages_stored,
            "metadata_bytes": self.metadata_bytes(),
            "reserve_bytes": pool.reserve_bytes,
            "algorithm": self.codec.algorithm,
            "compactions": self.c.compactions,
            "limit_hits": self.c.limit_hits,
            "full": self.full,
            "freeable_bytes": pool.freeable_frames() * FRAME_SIZE,
            "classes": pool.class_stats(),
        }

    def reset_max(self) -> None:
        self.c.mem_used_max = self.pool.mem_used_total
