"""The page store: the device as a page table over the pool, plus the memory
limit and the compaction policy.

Glossary (shared with pool.py, state.py and codec.py):

page         4096 bytes of the device, numbered from 0.
page table   one packed 64-bit entry per page, in the state's "page" table:
             kind, algorithm, payload length and handle (entry.py)
limit        the most frames the pool may use (``mem_used_total``, as zram's
             ``mem_limit``); 0 means no limit.
full         set when a store could not fit even after compaction (and the
             ladder's recompression); stores are then refused until usage
             falls below ``accept_percent`` of the limit (zswap's accept
             threshold), so the edge does not thrash.
idle stamp   a page's last write or read, in minutes, in its entry (entry.py).
tier         how a page's object is stored: as a write stored it, or
             recompressed with zstd and perhaps a dictionary (entry.py;
             the mechanics in engine/tier.c, the policy in recompress.py).

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
3a. recompression (engine.recompress_step; zswapd/engine/tier.c) stores the
   page's new object, switches the entry if it is still the one the object
   was read from, then frees the old object: rule 1 again.  The idle stamp
   and the tried bit are rewritten in place (one store, same object).
4. partial-page writes read, modify and store a whole page: rule 1 again.

``rebuild`` (run when a Store attaches to an existing state) walks the page
table once (skipping its holes), lets the pool claim each named handle, and
frees every object and handle no page names; the counters derived from the
contents (pages_stored, same_pages, huge_pages, compr_data_size) are
recounted, and the event counters come back from the header snapshot that
``stats()`` refreshes.  ``check_invariants`` then verifies that each live
handle is named by exactly one page and every pool index is right.

The mechanics (encoding pages, the pool, the page-table switches in the
order above) are the engine's (engine.py: the Python reference or the native
one in engine/*.c, both on the same tables); the store keeps the policy: the
limit, ``full`` and its accept threshold, when and how far to compact, and
the names of the stats.

No I/O here beyond the state's own mappings; deterministic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator

from . import backing, entry
from .codec import ALGORITHMS, KIND_HUGE, KIND_SAME, PAGE_SIZE, Buffer, Codec
from .engine import COUNTER_METRICS, COUNTER_NAMES, NOROOM, REFUSED, SAVED_COUNTERS, Counters, Engine, make_engine
from .errors import BadRequest, DeviceFull
from .pool import CLASSES, FRAME_SIZE, MAX_FRAMES_PER_ZSPAGE, MOVE_RESERVE, pool_geometry
from .state import DICT_MAX_BYTES, Geometry, State

# The recompression tier's defaults (docs/benchmarks.md, "ceiling"): zstd
# level 8 is where a dictionary starts to pay on real memory; an object is
# kept only if it shrinks by 128 bytes (and lands in a smaller class).
RECOMPRESS_LEVEL = 8
RECOMPRESS_THRESHOLD = 128
# A recompression pass takes objects by bands of length, the biggest first
# (zram since 6.13: the biggest objects save the most per page compressed):
# huge pages, then these lower bounds, each band up to the one above.
RECOMPRESS_BANDS = (3072, 2048, 1024, 512, 256, 1)
# Page-table entries one recompression step scans at most (a C step scans
# 64 Ki entries in well under a millisecond) and pages it compresses at most
# (zstd level 8: 50-100 us a page, so a step stays a few milliseconds).
RECOMPRESS_SCAN = 1 << 16
RECOMPRESS_STEP_PAGES = 32
# The ladder's order (oldest first): passes over pages idle at least this
# many ticks, then the pass's own idle age.
IDLE_LADDER = (entry.IDLE_CLAMP, 360, 120, 60, 30, 10, 5, 1)
# Pages sampled to train a dictionary (16 MiB of samples, zstd's advice of
# about 100 times the dictionary's size), and the fewest worth training on.
TRAIN_PAGES = 4096
TRAIN_MIN_PAGES = 256
# Probes (one recompressed page in engine.PROBE_EVERY) the retrain rule
# averages: right after training (the base) and lately (a rolling window).
RETRAIN_PROBES = 32
# Idle histogram buckets (stats "idle"): lower bounds of age in seconds.
IDLE_BUCKETS = (0, 5 * 60, 30 * 60, 3600, 2 * 3600, 6 * 3600, entry.IDLE_CLAMP * entry.IDLE_TICK)

# Bound on objects moved by one synchronous compaction on the write path.
SYNC_COMPACT_MOVES = 1 << 14
# Steps in a row that may move nothing before a compaction run gives up.  The
# native engine reads the freeable figures without the class locks, so a
# writer can take the free slots between the figure and the step; the run
# retries (the caller pausing between tries) rather than end on the first
# empty step, and a few tries cover a writer that keeps taking slots without
# spinning on a class that truly has nothing to give.
COMPACT_RETRIES = 3
# The ladder before full (write_stopped): objects one synchronous writeback
# pass may move (a segment's worth of typical objects, a few ms of disk),
# and the passes one stopped write may take before it reports full.
SYNC_WRITEBACK_OBJECTS = 256
SYNC_WRITEBACK_PASSES = 8
# Cleaning on the write path takes only segments this many percent dead.
SYNC_CLEAN_DEAD = 10
# Seconds in a day of the daily limit (UTC days: the meter resets at 00:00 UTC).
DAY = 86400

# The figures of ``stats()`` a metrics scraper gets (control.prometheus):
# stats key -> (metric name, kind, help), kind as in Prometheus.  The
# counters describe themselves (engine.Counters); these are the store's and
# the pool's.
METRICS: dict[str, tuple[str, str, str]] = {
    "orig_data_size": ("orig_data_size", "gauge", "Bytes of pages stored, uncompressed (zram mm_stat)"),
    "compr_data_size": ("compr_data_size", "gauge", "Bytes of compressed payload stored"),
    "mem_used_total": ("mem_used_total", "gauge", "Bytes of pool frames in use"),
    "mem_limit": ("mem_limit", "gauge", "Memory limit in bytes (0 = none)"),
    "pages_compacted": ("pages_compacted", "counter", "Frames freed by compaction"),
    **COUNTER_METRICS,
    "metadata_bytes": ("metadata_bytes", "gauge", "Bytes of metadata (page table, handles, zspages)"),
    "full": ("full", "gauge", "1 while the pool refuses stores"),
}


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


__all__ = ["Counters", "Store", "StoreError", "StoreFull", "store_geometry"]


def _quantile(hist: list[int], q: float) -> int | None:
    """The upper bound (2^i us) of the bucket holding quantile ``q``."""
    total = sum(hist)
    if not total:
        return None
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= q * total:
            return 1 << i
    return 1 << (len(hist) - 1)


class Store:
    def __init__(
        self,
        size: int,
        codec: Codec | None = None,
        memory_limit: int = 0,
        accept_percent: int = 90,
        reserve_frames: int = 64,
        state: State | None = None,
        engine: str = "auto",
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
        # The engine serves the tables; ``pool`` is its old name, kept for
        # the pool-level figures (frames_used, freeable, ...).
        self.engine: Engine = make_engine(engine, state, self.codec, reserve_frames)
        self.engine.policy = self.write_stopped
        self.pool = self.engine
        self.table = state.view("page")
        self.tier_lock = threading.Lock()
        # The retrain rule's probes (note_probes): (probes, bytes without the
        # dictionary, bytes with it), right after training and lately.
        self.probe_base = self.probe_recent = (0, 0, 0)
        self.accept_percent = accept_percent
        self.full = False
        self.memory_limit = 0
        # The backing file (attach_backing); none until then.
        self.backing_path = ""
        self.backing_size = 0
        self.daily_limit = 0
        self.clock: Callable[[], float] = time.time  # the daily meter's clock; tests set it
        self.wb_day, self.written_today = state.load_writeback_day()
        if attached:
            self.rebuild()
            self.check_invariants()
            self.release_free_dictionaries()
        state.save_codec(self.codec.algo_id, self.codec.zstd_level)
        self.set_limit(memory_limit)

    @property
    def full(self) -> bool:
        """The engine's flag, the one copy: a write refuses pages that need
        memory while it is set, in Python and on the C FUSE threads."""
        return bool(self.engine.full)

    @full.setter
    def full(self, value: bool) -> None:
        self.engine.full = int(value)

    @property
    def c(self) -> Counters:
        """The counters (engine.Counters), kept by the engine."""
        return self.engine.c

    def close(self) -> None:
        """Unmap the state and close this process's fds on it."""
        self.engine.policy = None  # and the engine's hold on this store
        self.engine.close()  # drops the engine's hold on the mappings first
        self.state.close()

    # -- recovery -------------------------------------------------------------

    def rebuild(self) -> None:
        """Recompute every volatile index and derived counter from the page
        table and the pool's persistent tables, freeing what no page names.
        The scan is the engine's (rebuild.py's, or the native
        one, which leaves the same bytes); the event counters come back from
        the header snapshot."""
        pages = list(self.state.extents("page"))
        self.engine.rebuild_pages(pages)
        self.engine.rebuild_backing(pages, list(self.state.extents("segment")))
        saved = self.state.load_counters()
        c = self.c
        for name in SAVED_COUNTERS:
            setattr(c, name, saved[name])
        self.engine.pages_compacted = saved["pages_compacted"]
        c.mem_used_max = max(c.mem_used_max, self.engine.mem_used_total)

    def check_invariants(self) -> None:
        """Raise StateError unless each live handle is named by exactly one
        page and every pool index agrees with the persistent tables."""
        pages = list(self.state.extents("page"))
        self.engine.check_pages(pages)
        self.engine.check_backing(pages, list(self.state.extents("segment")))

    def save_counters(self) -> None:
        """Snapshot the event counters into the state header."""
        c = self.c
        self.state.save_counters(
            {name: getattr(c, name) for name in SAVED_COUNTERS} | {"pages_compacted": self.engine.pages_compacted}
        )

    # -- runtime settings -----------------------------------------------------

    def apply_setting(self, name: str, value: int | str) -> dict[str, object]:
        """Apply one runtime setting (config.RUNTIME_KEYS), already checked
        against the config schema: the one place the control socket's
        ``set`` and a reload (SIGHUP) change the store.  Returns what the
        setting did (for memory_limit, ``set_limit``'s figures) and, when it
        holds but cannot take full effect yet, a ``warning`` for the operator."""
        if name == "memory_limit":
            assert isinstance(value, int)
            out: dict[str, object] = dict(self.set_limit(value))
            if not out["met"]:
                out["warning"] = (
                    f"memory_limit {value} is below the {self.mem_used_total} bytes in use and compaction cannot "
                    "free enough without dropping data; nothing was dropped, new stores fail until it fits"
                )
            return out
        if name == "accept_percent":
            assert isinstance(value, int)
            self.set_accept_percent(value)
        elif name == "algorithm":
            self.set_algorithm(algorithm=str(value))
        elif name == "zstd_level":
            assert isinstance(value, int)
            self.set_algorithm(zstd_level=value)
        else:
            raise StoreError(f"{name} is not a runtime setting of the store")
        return {}

    # -- limit ----------------------------------------------------------------

    def set_limit(self, nbytes: int) -> dict[str, int | bool]:
        """Change the memory limit.  Never drops data: a limit below what is
        stored is kept, compaction runs, and new stores fail until it fits."""
        if nbytes < 0:
            raise StoreError(f"memory limit must be >= 0, got {nbytes}")
        self.memory_limit = nbytes
        self.engine.frame_limit = -(-nbytes // FRAME_SIZE) if nbytes else 0
        moved = 0
        if nbytes and self.engine.mem_used_total > nbytes:
            moved = self.compact()
        met = not nbytes or self.engine.mem_used_total <= nbytes
        self.update_full()
        self.state.save_settings(self.memory_limit, self.accept_percent)
        return {"memory_limit": nbytes, "met": met, "objects_moved": moved}

    def set_accept_percent(self, percent: int) -> None:
        if not 0 < percent <= 100:
            raise StoreError(f"accept_percent must be in 1..100, got {percent}")
        self.accept_percent = percent
        self.update_full()
        self.state.save_settings(self.memory_limit, self.accept_percent)

    def set_algorithm(self, algorithm: str | None = None, zstd_level: int | None = None) -> None:
        """Switch the codec for new writes.  Every page records its own
        algorithm, so pages already stored stay readable."""
        algorithm = self.codec.algorithm if algorithm is None else algorithm
        zstd_level = self.codec.zstd_level if zstd_level is None else zstd_level
        if (algorithm, zstd_level) != (self.codec.algorithm, self.codec.zstd_level):
            self.codec = Codec(algorithm, zstd_level)
            self.engine.set_codec(self.codec)
            self.state.save_codec(self.codec.algo_id, self.codec.zstd_level)

    @property
    def mem_used_total(self) -> int:
        return self.engine.mem_used_total

    @property
    def frames_used(self) -> int:
        return self.engine.frames_used

    def refill_reserve(self) -> None:
        """Top up the hot frame reserve; call off the write path."""
        self.engine.refill_reserve()

    def compaction_wanted(self, waste_threshold: int, watermark: int) -> bool:
        """The background policy: compact when the bytes lost to partly used
        zspages pass ``waste_threshold``, or when usage passes ``watermark``
        percent of the limit, and only if compaction can free a frame.

        What it promises, asked every round: once the device is quiet, either
        the waste is at most ``waste_threshold`` or nothing is freeable (and,
        over the watermark, nothing is freeable).  A run started above the
        threshold goes on until nothing is freeable (compact_steps), so it
        ends below it; discards after a run may leave waste under the
        threshold with a zspage or two freeable, and that is kept: it costs
        less than the threshold says is worth a run."""
        pool = self.engine
        waste = pool.mem_used_total - pool.obj_bytes
        high = bool(self.memory_limit) and pool.mem_used_total * 100 >= self.memory_limit * watermark
        return (waste > waste_threshold or high) and pool.freeable_frames() > 0

    def update_full(self) -> None:
        if self.full and (
            not self.memory_limit or self.engine.mem_used_total * 100 < self.memory_limit * self.accept_percent
        ):
            self.full = False

    def compact(self, max_moves: int | None = None) -> int:
        self.engine.count("compactions")
        moved = self.engine.compact(max_moves)
        self.update_full()
        return moved

    # -- range checks ---------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise StoreError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise StoreError(f"range {offset}+{length} is beyond the device size {self.size}")

    def compact_steps(self, moves_per_step: int) -> Generator[int, None, None]:
        """One compaction run in bounded steps, yielding the objects each step
        moved, so a caller doing I/O can serve requests in between.  A step
        that moved nothing while something is still freeable yields 0: the
        caller should pause before the next try.  The run ends when nothing is
        freeable, after COMPACT_RETRIES such steps in a row, or when the
        caller stops iterating."""
        self.engine.count("compactions")
        empty = 0
        try:
            while self.engine.freeable_frames():
                moved = self.engine.compact(moves_per_step)
                empty = 0 if moved else empty + 1
                if empty > COMPACT_RETRIES:
                    return
                yield moved
        finally:
            self.update_full()

    # -- recompression ---------------------------------------------------------
    #
    # The tier lock serialises everything that changes the tier's state:
    # steps, sampling, installing and dropping dictionaries (tier.c relies on
    # one such thread at a time).  The policy's thread or task holds it per
    # step.  The write path never recompresses: the thread that asks
    # write_stopped is a serving one (a C FUSE thread with the native
    # engine), where compressing at the secondary level, and making that
    # thread's secondary zstd context and the dictionary's CDict, would
    # allocate exactly when memory is short.  A refused write wakes the
    # policy instead (recompress.py, the ladder).

    def tick(self, seconds: float) -> None:
        """The time now (CLOCK_MONOTONIC seconds, time.monotonic()), which
        writes and reads stamp on their pages as their idle stamp."""
        self.engine.now_tick = entry.tick_of(seconds)

    def recompress_bands(self, threshold: int) -> list[tuple[int, int]]:
        """(min_len, max_len) of each band a pass takes, the biggest first;
        bands whose objects cannot shrink by ``threshold`` are left out."""
        top = self.engine.huge_threshold - 1
        bands = [(PAGE_SIZE, PAGE_SIZE)]
        for low in RECOMPRESS_BANDS:
            if top > threshold and top >= low:
                bands.append((max(low, threshold + 1), top))
            top = low - 1
        return bands

    def dictionary_slot(self) -> int:
        """The current dictionary's slot (the newest that zstd could load),
        0 if there is none."""
        broken = self.engine.broken_dictionaries()
        dicts = [d for d in self.engine.dictionaries() if d[0] not in broken]
        return max(dicts, key=lambda d: d[1])[0] if dicts else 0

    def broken_dictionaries(self) -> list[str]:
        """What a takeover found wrong with the state's dictionaries, one
        sentence each: a dictionary zstd refuses (corrupt or truncated bytes)
        costs only the pages recompressed with it, whose reads fail as
        corrupt objects; the rest is served, the policy trains a new one,
        and the slot is freed once its last page is rewritten or discarded
        (tier.h).  Empty when all is well."""
        broken = self.engine.broken_dictionaries()
        return [
            f"recompression dictionary {ident} (slot {slot}, {n} bytes) in the state is corrupt: zstd cannot load "
            f"it; reads of the {refs} pages recompressed with it fail (I/O errors, failed_reads), every other page "
            "is served, and the slot is freed when its last page is rewritten or discarded"
            for slot, ident, n, refs in self.engine.dictionaries()
            if slot in broken
        ]

    def recompress_steps(
        self,
        idle_ticks: int,
        threshold: int = RECOMPRESS_THRESHOLD,
        level: int = RECOMPRESS_LEVEL,
        max_pages: int | None = None,
        step_pages: int = RECOMPRESS_STEP_PAGES,
        dictionary: bool = True,
        oldest_first: bool = False,
        reserve: bool = False,
    ) -> Generator[tuple[int, int, int], None, None]:
        """One recompression pass in bounded steps (engine.recompress_step),
        yielding (pages recompressed, bytes saved, candidates compressed) of
        each.  Idle pages of at least ``idle_ticks`` ticks, biggest objects
        first (``oldest_first``: by idle age, the ladder's order), at most
        ``max_pages`` candidates in all, with the current dictionary if
        ``dictionary`` and there is one.  It ends when every band was
        scanned, when the pool has no room for a new object, or when the
        caller stops iterating.

        ``reserve`` (the ladder's passes, at the limit): new objects may take
        up to pool.MOVE_RESERVE frames past the memory limit, and the pass
        pays them back by compacting what its moves freed (bounded steps,
        yielded as (0, 0, 0)): when no room is left even so, it compacts and
        goes on from the same page if that freed frames, and it compacts
        once more at its end while usage is over the limit.  Without it a
        pass at the limit moves nothing once the smaller classes have no
        free slot: a move writes its new copy before it frees the old."""
        if not 0 <= threshold <= PAGE_SIZE:
            raise StoreError(f"recompression threshold must be in 0..{PAGE_SIZE} bytes, got {threshold}")
        left = (1 << 62) if max_pages is None else max_pages
        over = MOVE_RESERVE if reserve else 0
        slot = self.dictionary_slot() if dictionary else 0
        if oldest_first:
            ages = [a for a in IDLE_LADDER if a >= idle_ticks] + [idle_ticks]
            passes = [(age, 1, PAGE_SIZE) for age in dict.fromkeys(ages)]
        else:
            passes = [(idle_ticks, low, high) for low, high in self.recompress_bands(threshold)]
        try:
            for age, low, high in passes:
                at = 0
                while at < self.npages and left > 0:
                    end = min(at + RECOMPRESS_SCAN, self.npages)
                    with self.tier_lock:
                        if slot and not any(d[0] == slot for d in self.engine.dictionaries()):
                            slot = 0  # dropped meanwhile: go on without
                        at, pages, saved, looked, st, probes, plain, with_dict = self.engine.recompress_step(
                            at, end, low, max(high, low), age, threshold, level, min(step_pages, left), slot, over
                        )
                    self.note_probes(probes, plain, with_dict)
                    left -= looked
                    yield pages, saved, looked
                    if st == NOROOM:
                        # the reserve is spent too: compaction pays it back
                        # and the pass goes on from this page, or it ends
                        if not reserve or not (yield from self._pay_back()):
                            return
            if reserve:
                yield from self._pay_back()
        finally:
            self.update_full()

    def _pay_back(self) -> Generator[tuple[int, int, int], None, bool]:
        """The move reserve paid back: compaction in bounded steps (each
        yielded as (0, 0, 0)) while usage is over the limit, or, under it,
        until a zspage of the longest chain fits again.  True if it freed
        frames."""
        pool = self.engine
        before = pool.frames_used
        budget = SYNC_COMPACT_MOVES
        steps = self.compact_steps(512)
        try:
            for moved in steps:
                yield 0, 0, 0
                budget -= moved
                if budget <= 0 or pool.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
                    break
        finally:
            steps.close()
        return pool.frames_used < before

    def clamp_idle(self) -> None:
        """Restamp every page idle longer than entry.IDLE_CLAMP ticks to
        exactly that age, so its stamp never wraps to look fresh (entry.py).
        Each recompression scan does this on its way; this is the scan alone
        (an empty band of lengths: no candidate, nothing compressed), for
        while no pass runs."""
        at = 0
        while at < self.npages:
            end = min(at + RECOMPRESS_SCAN, self.npages)
            with self.tier_lock:
                at = self.engine.recompress_step(at, end, 1, 0, entry.IDLE_MASK, 0, RECOMPRESS_LEVEL, 1 << 62)[0]

    def recompress(
        self,
        idle_ticks: int = 0,
        threshold: int = RECOMPRESS_THRESHOLD,
        level: int = RECOMPRESS_LEVEL,
        max_pages: int | None = None,
        dictionary: bool = True,
    ) -> dict[str, int]:
        """A whole pass at once (``zswapd recompress``): pages recompressed,
        bytes saved and candidates compressed."""
        total = [0, 0, 0]
        for step in self.recompress_steps(idle_ticks, threshold, level, max_pages, dictionary=dictionary):
            for i, v in enumerate(step):
                total[i] += v
        return {"pages": total[0], "bytes_saved": total[1], "candidates": total[2]}

    # -- dictionaries -----------------------------------------------------------

    def training_samples(self, idle_ticks: int, pages: int = TRAIN_PAGES) -> bytes:
        """Up to ``pages`` idle pages, spread over the device, for training."""
        stride = max(1, self.c.pages_stored // max(1, pages))
        with self.tier_lock:
            data, _ = self.engine.sample(0, self.npages, idle_ticks, stride, pages)
        return data

    def install_dictionary(self, data: bytes) -> int:
        """Make ``data`` the current dictionary (a new slot; the retrain
        rule starts measuring afresh) and drop those no page uses."""
        with self.tier_lock:
            slot, _id = self.engine.add_dictionary(data)
        self.probe_base = self.probe_recent = (0, 0, 0)
        self.drop_unused_dictionaries()
        return slot

    def dictionary_slot_free(self) -> bool:
        """Whether a new dictionary would find a slot, once those no page
        names (but the current one) are dropped."""
        self.drop_unused_dictionaries()
        return len(self.engine.dictionaries()) < entry.DICT_SLOTS

    def drop_unused_dictionaries(self) -> int:
        """Free every dictionary but the current one that no page names,
        and give a dropped one's bytes back to the kernel (its head is
        zeroed first, so nothing reads them any more)."""
        dropped = 0
        with self.tier_lock:
            current = self.dictionary_slot()
            for slot, _id, _n, refs in self.engine.dictionaries():
                if slot != current and not refs:
                    self.engine.drop_dictionary(slot)
                    self.state.release("dict_bytes", (slot - 1) * DICT_MAX_BYTES, DICT_MAX_BYTES)
                    dropped += 1
        return dropped

    def release_free_dictionaries(self) -> None:
        """The bytes of every free dictionary slot back to the kernel: after a
        rebuild, for slots a worker dropped before it released them."""
        with self.tier_lock:
            held = {d[0] for d in self.engine.dictionaries()}
            for slot in range(1, entry.DICT_SLOTS + 1):
                if slot not in held:
                    self.state.release("dict_bytes", (slot - 1) * DICT_MAX_BYTES, DICT_MAX_BYTES)

    def note_probes(self, probes: int, plain: int, with_dict: int) -> None:
        """The retrain rule's measure: the first RETRAIN_PROBES probes after
        training are the base, later ones a rolling window of as many."""
        if not probes:
            return
        n, p, d = self.probe_base
        if n < RETRAIN_PROBES:
            self.probe_base = (n + probes, p + plain, d + with_dict)
            return
        n, p, d = self.probe_recent
        if n >= RETRAIN_PROBES:
            n = p = d = 0
        self.probe_recent = (n + probes, p + plain, d + with_dict)

    @staticmethod
    def _gain(probe: tuple[int, int, int]) -> float:
        _, plain, with_dict = probe
        return (plain - with_dict) / plain if plain else 0.0

    def retrain_wanted(self) -> bool:
        """No dictionary yet, or the recent pages gain less than half of
        what the pages right after training gained (docs/design.md)."""
        if not self.dictionary_slot():
            return True
        if self.probe_base[0] < RETRAIN_PROBES or self.probe_recent[0] < RETRAIN_PROBES:
            return False
        return self._gain(self.probe_recent) < self._gain(self.probe_base) / 2

    def tier_stats(self) -> dict[str, object]:
        """stats' "recompress", "idle" and "codecs": one census of the page
        table (engine.census)."""
        ages, pages, nbytes = self.engine.census()
        c = self.c
        tick = entry.IDLE_TICK
        idle = []
        for i, low in enumerate(IDLE_BUCKETS):
            high = IDLE_BUCKETS[i + 1] if i + 1 < len(IDLE_BUCKETS) else (entry.IDLE_MASK + 1) * tick
            idle.append({"min_age_seconds": low, "pages": sum(ages[low // tick : high // tick])})
        dicts = self.engine.dictionaries()
        ids = {slot: i for slot, i, _n, _r in dicts}
        codecs = []
        for i, n in enumerate(pages):
            if not n:
                continue
            kind, algo, tier = i // 32, i // 8 % 4, i % 8
            name = {KIND_SAME: "same", KIND_HUGE: "huge"}.get(kind, ALGORITHMS[algo] if algo < len(ALGORITHMS) else "?")
            codecs.append(
                {
                    "codec": name,
                    "tier": "primary" if not tier else "recompressed",
                    "dictionary": ids.get(tier) if 0 < tier <= entry.DICT_SLOTS else None,
                    "pages": n,
                    "bytes": nbytes[i],
                }
            )
        recompressed = sum(n for i, n in enumerate(pages) if i % 8)
        return {
            "recompress": {
                "pages": recompressed,
                "bytes_saved": c.recompress_saved,
                "recompressed": c.recompressed,
                "skipped": c.recompress_skipped,
                "incompressible": c.recompress_incompressible,
                "cpu_seconds": round(c.recompress_cpu_us / 1e6, 3),
                "trainings": c.dictionaries_trained,
                "dictionary_gain": round(self._gain(self.probe_recent if self.probe_recent[0] else self.probe_base), 4),
                "dictionaries": [
                    {"id": i, "bytes": nb, "pages": refs, "current": slot == self.dictionary_slot()}
                    for slot, i, nb, refs in sorted(dicts, key=lambda d: d[1])
                ],
            },
            "idle": idle,
            "codecs": codecs,
        }

    def _make_room(self) -> None:
        """Synchronous, bounded compaction until a new zspage fits."""
        if self.engine.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
            return  # frames are not what is short (the handle table is)
        budget = SYNC_COMPACT_MOVES
        steps = self.compact_steps(512)
        try:
            for moved in steps:
                budget -= moved
                if budget <= 0 or self.engine.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
                    break
        finally:
            steps.close()

    # -- the backing file (backing.py) -------------------------------------------

    def attach_backing(self, fd: int, size: int, path: str = "", daily_limit: int = 0) -> None:
        """Write back to (and read backed pages from) ``fd``, a backing file
        of ``size`` bytes that the supervisor opened and holds."""
        self.engine.attach_backing(fd, size)
        self.backing_path = path
        self.backing_size = size
        self.daily_limit = daily_limit

    @property
    def backed(self) -> bool:
        return bool(self.backing_size)

    def _day_budget(self) -> int:
        """Bytes writeback may still append today (the daily limit's rest)."""
        day = int(self.clock() // DAY)
        if day != self.wb_day:
            self.wb_day, self.written_today = day, 0
            self.state.save_writeback_day(day, 0)
        if not self.daily_limit:
            return 1 << 62
        return max(0, self.daily_limit - self.written_today)

    def writeback(self, max_objects: int, max_bytes: int = 1 << 62, idle_ticks: int = 0) -> tuple[int, int]:
        """One bounded writeback step within the daily limit, over pages
        idle at least ``idle_ticks``: (objects moved, bytes appended).
        (0, 0) without a file or budget."""
        if not self.backed:
            return 0, 0
        budget = min(max_bytes, self._day_budget())
        if budget <= 0:
            return 0, 0
        moved, nbytes = self.engine.writeback(max_objects, budget, idle_ticks)
        if nbytes:
            self.written_today += nbytes
            self.state.save_writeback_day(self.wb_day, self.written_today)
        self.update_full()
        return moved, nbytes

    def clean(
        self, max_objects: int, max_bytes: int = 1 << 62, percent: int = backing.CLEAN_PERCENT
    ) -> tuple[int, int]:
        """One bounded cleaning step: (objects moved, segments freed)."""
        if not self.backed:
            return 0, 0
        return self.engine.clean(max_objects, max_bytes, percent)

    def cleaning_wanted(self, dead_share: int) -> bool:
        """Dead bytes over ``dead_share`` percent of what the file holds, or
        at most two free segments left with dead bytes to reclaim."""
        if not self.backed:
            return False
        fig = self.engine.backing_figures()
        dead, used = fig["dead_bytes"], fig["live_bytes"] + fig["dead_bytes"]
        free = self.backing_size // backing.SEG_SIZE - fig["segments_used"]
        return dead * 100 > used * dead_share or (free <= 2 and dead >= backing.SEG_SIZE // 2)

    def backing_full(self) -> bool:
        """No segment left for writeback (one is kept for cleaning)."""
        return (
            self.backed and self.engine.backing_figures()["segments_used"] >= self.backing_size // backing.SEG_SIZE - 1
        )

    def _write_back_for_room(self) -> bool:
        """The ladder's writeback rung, on the write path: write the oldest
        pages back, cleaning first when the file has no free segment, and
        compact what writeback emptied, until a zspage fits again.  True
        only if it moved pages out of the pool and that made room, so a
        write that keeps stopping ends (the pool empties at worst); False
        when nothing more could go (no file, the file full of live data,
        the day's limit spent)."""
        if not self.backed:
            return False
        room = self.engine.frame_room()
        moved_any = False
        ages = list(IDLE_LADDER) + [0]  # the oldest first
        for _ in range(SYNC_WRITEBACK_PASSES + len(ages)):
            moved, _ = self.writeback(SYNC_WRITEBACK_OBJECTS, idle_ticks=ages[0])
            if not moved:
                if len(ages) > 1:
                    ages.pop(0)  # none that old left: the next band
                    continue
                if not self.backing_full() or not self._clean_for_room():
                    break
                continue
            moved_any = True
            self._make_room()
            if self.engine.frame_room() >= MAX_FRAMES_PER_ZSPAGE:
                break
        return moved_any and self.engine.frame_room() > room

    def _clean_for_room(self) -> bool:
        """Clean until a segment is freed (the file being full), only
        segments with SYNC_CLEAN_DEAD percent or more dead: one nearly all
        live would cost a segment to free one.  False if none is."""
        for _ in range(backing.SEG_SIZE // backing.OBJ_ALIGN // SYNC_WRITEBACK_OBJECTS + 1):
            moved, freed = self.clean(SYNC_WRITEBACK_OBJECTS, percent=100 - SYNC_CLEAN_DEAD)
            if freed:
                return True
            if not moved:
                return False
        return False

    def backing_stats(self) -> dict[str, object] | None:
        if not self.backed:
            return None
        fig = self.engine.backing_figures()
        self._day_budget()
        return {
            "file": self.backing_path,
            "size": self.backing_size,
            "live_bytes": fig["live_bytes"],
            "dead_bytes": fig["dead_bytes"],
            "segments_used": fig["segments_used"],
            "segments_cleaned": self.c.segments_cleaned,
            "written_today": self.written_today,
            "daily_limit": self.daily_limit,
            "bytes_written": fig["bytes_written"],
            # Reads of written-back pages (pread of their blocks, O_DIRECT):
            # the bucket bound (a power of two) under which the median and
            # the 99th percentile fall, since this worker started.
            "read_latency_p50_us": _quantile(self.engine.backing_latency(), 0.5),
            "read_latency_p99_us": _quantile(self.engine.backing_latency(), 0.99),
        }

    # -- byte level -----------------------------------------------------------

    def write_stopped(self, status: int, retried: bool) -> bool:
        """The policy where a write stops at a page (the engine asks it,
        from Python or from a C FUSE thread, holding none of its locks):
        True for the write to go on from that page, False to end it there
        (DeviceFull).  REFUSED (the store is full and the page needs
        memory): go on once usage has fallen below the accept threshold.
        NOROOM (no frame or handle): compact, bounded, and try the page
        again; no room a second time makes the store full."""
        engine = self.engine
        if status == REFUSED:
            self.update_full()
            if self.full and not self._write_back_for_room():
                engine.count("failed_writes")
                return False
            self.full = False
            return True
        if retried:
            # Compaction made no room: write the oldest pages back (the
            # ladder's writeback rung; the policy's next round recompresses,
            # without budget); full only when that makes no room (no file,
            # the file full or the day's limit spent).
            if self._write_back_for_room():
                return True
            self.full = True
            engine.count("failed_writes")
            return False
        engine.count("limit_hits")
        self._make_room()
        return True

    def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at byte ``offset``; partial pages read-modify-write.
        On StoreFull, pages before the failing one are written and the failing
        page keeps its old contents."""
        n = len(data)
        self._check(offset, n)
        _done, status = self.engine.write(offset, data)
        if status == REFUSED:
            raise StoreFull("pool is full; waiting for usage to fall below the accept threshold")
        if status == NOROOM:
            raise StoreFull("pool is full and compaction cannot make room")
        return n

    def readinto(self, offset: int, out: memoryview) -> int:
        self._check(offset, len(out))
        return self.engine.readinto(offset, out)

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
        freed = self.engine.discard_pages(first, last)
        self.update_full()
        return freed

    def _zero_bytes(self, offset: int, length: int) -> None:
        """Zero part of the device, skipping pages that are already empty."""
        end = offset + length
        while offset < end:
            take = min(end, (offset // PAGE_SIZE + 1) * PAGE_SIZE) - offset
            if entry.kind(self.table[offset // PAGE_SIZE]):
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
        used = self.engine.mem_used_total
        room = max(0, self.memory_limit - used)
        ratio = (self.c.pages_stored * PAGE_SIZE / used) if used else 1.0
        return min(empty, int(room * max(ratio, 1.0)))

    def metadata_bytes(self) -> int:
        """What the metadata mappings hold resident (mincore): header, page
        table, handle, zspage and frame tables, free stacks."""
        return self.state.resident_bytes()

    def stats(self) -> dict[str, object]:
        pool = self.engine
        self.save_counters()
        c = self.c
        return {
            "orig_data_size": c.pages_stored * PAGE_SIZE,
            "compr_data_size": pool.obj_bytes,
            "mem_used_total": pool.mem_used_total,
            "mem_limit": self.memory_limit,
            "pages_compacted": pool.pages_compacted,
            **{name: getattr(c, name) for name in COUNTER_NAMES},
            "metadata_bytes": self.metadata_bytes(),
            "engine": self.engine.name,
            "reserve_bytes": pool.reserve_bytes,
            "algorithm": self.codec.algorithm,
            "zstd_level": self.codec.zstd_level,
            "accept_percent": self.accept_percent,
            "full": self.full,
            "freeable_bytes": pool.freeable_frames() * FRAME_SIZE,
            "classes": pool.class_stats(),
            **self.tier_stats(),
            "writeback": self.backing_stats(),
        }

    def reset_max(self) -> None:
        self.c.mem_used_max = self.engine.mem_used_total
