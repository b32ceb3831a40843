"""The engine: the allocator and the page-level mechanics over a state's tables.

Two engines implement one narrow interface (``Engine`` below):

python  ``PythonEngine``, pool.py plus the page-level half of the store.  The
        reference: readable, and the model the native one is checked against.
native  ``NativeEngine``, zswapd/engine/*.c: the same tables, the same crash
        order, in C with the GIL released (see the top of engine/engine.h).

The store (store.py) keeps the policy (memory limit, full/accept_percent,
when and how much to compact, the names of the stats) and calls the engine
for the mechanics: write/readinto/discard_pages of byte ranges and pages,
a bounded compaction step, trim and refill of the frame reserve, counters.
A write that meets a full pool stops at that page (REFUSED: the store is
full and the page needs memory; NOROOM: the pool had no frame or handle)
and asks the store's ``policy`` what to do: compact and go on from that
page, with the form it already compressed, or end the write there.  The
engine never decides; the store never redoes the engine's work.

Rebuild and the invariant checks (what a new worker runs before serving)
are written twice: in Python (rebuild.py, over pool.py's ``begin_rebuild``/
``claim_*``/``finish_rebuild``), the reference and what the Python engine
runs; and in C (``rebuild``/``check_pages``, engine/rebuild.c), one pass
over the page table's resident extents and one over the pool tables, about
50 times faster.  The
two leave the same bytes and raise on the same corruptions
(tests/test_state.py compares them, also after crash-point kills).  An
engine still hands out a Python ``Pool`` carrying its volatile indexes
(``reference``) for the class statistics, and takes indexes back
(``adopt``).

Selection: ``[pool] engine = "auto" | "native" | "python"``; auto takes the
native engine when the extension imports and otherwise logs one warning and
serves with the Python one.  A state under a test crash hook is served by the
Python engine (its crash points are Python stores).
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import zstandard

from . import backing, codec, entry, rebuild
from . import pool as pool_rules
from .codec import ALGORITHMS, KIND_COMPRESSED, KIND_HUGE, KIND_SAME, PAGE_SIZE, Buffer, Codec, fill_page
from .config import ENGINES, MAX_DICTIONARY_SIZE, MAX_FUSE_THREADS, MAX_IDLE_AGE
from .errors import BadRequest, CorruptObject
from .pool import _CLASS_OF, CLASSES, CLASSES_ID, HUGE_THRESHOLD, Pool, PoolFull, pool_geometry
from .state import COUNTER_SNAPSHOT, DICT_MAX_BYTES, DICT_SLOTS, TABLES, State, StateError

# Where a write stopped (Engine.write), for the store's policy to decide on.
OK, REFUSED, NOROOM = 0, 1, 2

# The store's policy, asked by Engine.write where a write stops:
# policy(status, retried) -> go on from that page?  ``retried``: the page
# already stopped for want of room (NOROOM) and the policy made room.
Policy = Callable[[int, bool], bool]

_ZERO_PAGE = bytes(PAGE_SIZE)

log = logging.getLogger("zswapd")


_SAME = "<same>"


def _stat(kind: str, help_: str, metric: str | None = _SAME) -> Any:
    """A Counters field.  ``kind`` as in Prometheus: "counter" only grows,
    "gauge" goes up and down; ``help_`` says what it counts (the metrics'
    HELP line, control.prometheus); ``metric``: the metric's name if not the
    field's (zswapd_NAME, plus _total for a counter), None for none."""
    return field(default=0, metadata={"kind": kind, "help": help_, "metric": metric})


@dataclass
class Counters:
    """The event counters, under zram's stat names, with what each counts.
    The C engine keeps the same list in the same order (engine.h's
    ENGINE_COUNTERS, checked at import).  The ones state.COUNTER_SNAPSHOT
    names are snapshotted into the state header (Store.save_counters) and
    come back after a takeover; the others are recounted from the page
    table by the rebuild."""

    num_reads: int = _stat("counter", "Read requests served (swap-ins; a request is one or more pages)")
    num_writes: int = _stat("counter", "Write requests served (swap-outs; a request is one or more pages)")
    failed_reads: int = _stat("counter", "Failed reads")
    failed_writes: int = _stat("counter", "Failed writes")
    notify_free: int = _stat("counter", "Pages freed by discard")
    same_pages: int = _stat("gauge", "Same-filled pages stored")
    huge_pages: int = _stat("gauge", "Incompressible pages stored raw")
    pages_stored: int = _stat("gauge", "Pages stored")
    mem_used_max: int = _stat("gauge", "Peak of mem_used_total")
    compactions: int = _stat("counter", "Compaction runs")
    limit_hits: int = _stat("counter", "Stores that hit the memory limit")
    # The recompression tier (tier.c, PythonEngine.recompress_step): pages
    # recompressed and the bytes that saved when it happened; pages tried
    # and kept because they did not save enough, or did not compress below
    # the huge threshold at all.
    recompressed: int = _stat("counter", "Pages recompressed", metric="recompress_pages")
    recompress_saved: int = _stat(
        "counter", "Bytes saved by recompression when it happened", metric="recompress_saved_bytes"
    )
    recompress_skipped: int = _stat("counter", "Pages recompression kept as they were (saving under the threshold)")
    recompress_incompressible: int = _stat("counter", "Pages the secondary codec could not compress")
    # CPU the tier's policy spent (steps and training), in microseconds,
    # measured from its thread's own CPU clock; dictionaries trained.  In
    # stats' "recompress" section (cpu_seconds, trainings), not metrics of
    # their own: control's tier metrics export the CPU time in seconds.
    recompress_cpu_us: int = _stat("counter", "CPU microseconds spent recompressing and training", metric=None)
    dictionaries_trained: int = _stat("counter", "Dictionaries trained", metric=None)
    # Writeback (backing.py), as zram's bd_stat: pages in the backing file
    # (recounted by the rebuild), pages read from it and written to it.
    bd_count: int = _stat("gauge", "Pages in the backing file (zram bd_stat)")
    bd_reads: int = _stat("counter", "Pages read from the backing file (zram bd_stat)")
    bd_writes: int = _stat("counter", "Pages written to the backing file (zram bd_stat)")
    segments_cleaned: int = _stat(
        "counter", "Backing file segments cleaned and freed", metric="writeback_segments_cleaned"
    )


COUNTER_NAMES = tuple(f.name for f in fields(Counters))
# stats key -> (metric name, kind, help) of the counters exported as metrics,
# in the order above.
COUNTER_METRICS = {
    f.name: (f.name if f.metadata["metric"] == _SAME else f.metadata["metric"], f.metadata["kind"], f.metadata["help"])
    for f in fields(Counters)
    if f.metadata["metric"] is not None
}
SAVED_COUNTERS = tuple(name for name in COUNTER_NAMES if name in COUNTER_SNAPSHOT)
# Every name the snapshot keeps is a counter, or the engine's pages_compacted.
assert set(COUNTER_SNAPSHOT) == {*SAVED_COUNTERS, "pages_compacted"}, COUNTER_SNAPSHOT


class _EngineCounters(Counters):
    """The C engine's counters seen as a Counters: each field reads and sets
    the engine's own (atomic) one."""

    def __init__(self, engine: Any) -> None:  # no dataclass __init__: the fields are the engine's
        object.__setattr__(self, "_engine", engine)


def _counter_property(name: str) -> property:
    return property(lambda self: getattr(self._engine, name), lambda self, v: setattr(self._engine, name, v))


for _name in COUNTER_NAMES:
    setattr(_EngineCounters, _name, _counter_property(_name))


class Engine(Protocol):
    """What the store needs of an engine."""

    name: str
    state: State
    frame_limit: int
    pages_compacted: int
    # The idle tick stamped on every write and read (entry.tick_of); the
    # store sets it as time passes.
    now_tick: int
    # The store's full flag (Store.full reads and sets this one): while set,
    # a write refuses pages that need pool memory (REFUSED).
    full: int
    # The store's policy for a write that stops (None: every stop ends it).
    policy: Policy | None

    @property
    def c(self) -> Counters: ...
    @property
    def huge_threshold(self) -> int: ...
    @property
    def frames_used(self) -> int: ...
    @property
    def mem_used_total(self) -> int: ...
    @property
    def obj_bytes(self) -> int: ...
    @property
    def reserve_bytes(self) -> int: ...
    @property
    def cls_zspages(self) -> list[int]: ...
    @property
    def compressions(self) -> int:
        """Pages given to the compressor: a page a write stopped at and then
        stored counts once (the write goes on with its compressed form)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (a Counters field).  The way the
        store bumps a counter: the native engine's threads bump the same
        ones, so ``c.name += 1`` (a load, then a store) could lose theirs;
        the native count is one atomic add."""
        ...

    def write(self, offset: int, data: Buffer) -> tuple[int, int]:
        """One write request (counted in num_writes): ``data`` at byte
        ``offset``, partial pages read-modify-write.  A page that needs pool
        memory while ``full`` is set (REFUSED), or finds no room (NOROOM),
        stops the write; ``policy`` decides whether it goes on from that
        page, without compressing it again.  Returns (bytes written, OK), or
        the status it ended on; the page it ended at keeps its old contents.
        CorruptObject if a partial page's old contents do not decompress."""
        ...

    def readinto(self, offset: int, out: memoryview) -> int:
        """One read request (counted in num_reads); CorruptObject (counted
        in failed_reads) for an object that does not decompress."""
        ...

    def discard_pages(self, first: int, end: int) -> int:
        """Free pages first..end-1; returns how many held something."""
        ...

    def compact(self, max_moves: int | None = None) -> int: ...
    def rebuild_pages(self, extents: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
        """Recompute every volatile index from the page table's ``extents``
        and the persistent tables, freeing what no page names; sets and
        returns (pages_stored, same_pages, huge_pages).  StateError if the
        persistent tables cannot be repaired."""
        ...

    def check_pages(self, extents: Sequence[tuple[int, int]]) -> None:
        """StateError unless each live handle is named by exactly one page,
        the page counters match the table and every index is right."""
        ...

    def recompress_step(
        self,
        first: int,
        end: int,
        min_len: int,
        max_len: int,
        idle_ticks: int,
        threshold: int,
        level: int,
        max_pages: int,
        slot: int = 0,
        over: int = 0,
    ) -> tuple[int, int, int, int, int, int, int, int]:
        """Recompress candidates among pages first..end-1 (tier.c; the
        crash order at its top): objects stored by a write, never tried,
        of min_len..max_len bytes (4096: a huge page), idle at least
        idle_ticks, until max_pages were compressed, with dictionary
        ``slot`` (0: none).  A new object is kept if it is ``threshold``
        bytes smaller and in a smaller size class; otherwise the page is
        marked tried.  New objects may take ``over`` frames past the memory
        limit (at most pool.MOVE_RESERVE: the ladder's).  Returns (next page, pages recompressed, bytes saved,
        candidates compressed, OK or NOROOM, probes, probe bytes without the
        dictionary, probe bytes with it): one candidate in PROBE_EVERY is
        also compressed without the dictionary, for the retrain rule."""
        ...

    def census(self) -> tuple[list[int], list[int], list[int]]:
        """(stored pages by idle age in ticks, pages by codec, payload bytes
        by codec), codec index kind * 32 + algorithm * 8 + tier."""
        ...

    def add_dictionary(self, data: bytes) -> tuple[int, int]:
        """Install a dictionary in the lowest free slot (tier.c's order:
        bytes, then the head); returns (slot, id).  ValueError if every slot
        is in use."""
        ...

    def drop_dictionary(self, slot: int) -> None:
        """Free a slot no entry names (ValueError otherwise)."""
        ...

    def dictionaries(self) -> list[tuple[int, int, int, int]]:
        """(slot, id, bytes, pages naming it) of each installed dictionary."""
        ...

    def broken_dictionaries(self) -> list[int]:
        """Installed slots zstd refused at the last rebuild (corrupt or
        truncated bytes in the state): kept, their pages read as corrupt
        objects, no step uses them, dropped once no page names them
        (tier.h)."""
        ...

    def sample(self, first: int, end: int, idle_ticks: int, stride: int, max_pages: int) -> tuple[bytes, int]:
        """Up to ``max_pages`` idle compressed pages, as a write stored them
        (tier 0) or recompressed without a dictionary (tier.h's
        sample_idle), decompressed and concatenated, every ``stride`` pages
        from ``first``; and the page to go on from.  No idle stamp changes."""
        ...

    def train(self, samples: bytes, size: int) -> bytes:
        """A zstd dictionary of at most ``size`` bytes trained on the pages
        of ``samples`` (zdict.h); ValueError if zstd cannot train on them."""
        ...

    def attach_backing(self, fd: int, size: int) -> None:
        """Serve and write back with the backing file ``fd`` of ``size``
        bytes (backing.py); the segment table must fit it (StateError)."""
        ...

    def writeback(self, max_objects: int, max_bytes: int, idle_ticks: int = 0) -> tuple[int, int]:
        """One bounded writeback step over pages idle at least ``idle_ticks``:
        (objects moved, bytes appended)."""
        ...

    def clean(self, max_objects: int, max_bytes: int, percent: int) -> tuple[int, int]:
        """One bounded cleaning step: (objects moved, segments freed)."""
        ...

    def backing_figures(self) -> dict[str, int]:
        """size, live_bytes, dead_bytes, segments_used, bytes_written."""
        ...

    def backing_latency(self) -> list[int]:
        """Reads of backed pages by latency: [<= 1 us, <= 2 us, <= 4 us, ...]."""
        ...

    def rebuild_backing(self, pages: Sequence[tuple[int, int]], segments: Sequence[tuple[int, int]]) -> int:
        """After rebuild_pages: the segment table's live bytes recomputed
        from the backed entries, open and cleaning segments made full;
        sets and returns bd_count.  StateError for a location no segment
        holds."""
        ...

    def check_backing(self, pages: Sequence[tuple[int, int]], segments: Sequence[tuple[int, int]]) -> None: ...
    def trim(self) -> int: ...
    def refill_reserve(self) -> int: ...
    def freeable(self, cls: int) -> int: ...
    def freeable_frames(self) -> int: ...
    def frame_room(self, over: int = 0) -> int: ...
    def set_codec(self, codec: Codec) -> None: ...
    def reference(self) -> Pool: ...
    def adopt(self, pool: Pool) -> None: ...
    def class_stats(self) -> list[dict[str, Any]]: ...
    def metadata_bytes(self) -> int: ...
    def close(self) -> None: ...


def _spans(offset: int, length: int) -> Any:
    """Split a byte range into (page, offset in page, offset in range, length)."""
    pos = 0
    while pos < length:
        idx, within = divmod(offset + pos, PAGE_SIZE)
        take = min(PAGE_SIZE - within, length - pos)
        yield idx, within, pos, take
        pos += take


Extents = rebuild.Extents


class PythonEngine(Pool):
    """The reference engine: pool.py's allocator plus the page table."""

    name = "python"

    def __init__(self, state: State, codec: Codec, reserve_frames: int = 64, frame_limit: int = 0) -> None:
        self.full = 0
        self.policy: Policy | None = None
        self.compressions = 0
        self.now_tick = 0
        # The secondary codec: recompress_page(page, level, room) -> the
        # page compressed by zstd at ``level`` if it fits in ``room`` bytes.
        # Tests hand it the C engine's (_engine.recompress_page) to compare
        # tables byte for byte: python-zstandard bundles its own libzstd.
        # (None: python-zstandard's, with _dicts and _cdicts below.)
        self.recompress_page: Callable[..., bytes | None] | None = None
        self._dicts: dict[int, zstandard.ZstdCompressionDict] = {}
        self._cdicts: dict[tuple[int, int], zstandard.ZstdCompressor] = {}
        g = state.geometry
        super().__init__(g.max_frames, g.max_handles, frame_limit, reserve_frames, state)
        self.table = state.view("page")
        self._dict_head = state.view("dict_head")
        self._dict_refs = state.view("dict_refs")
        self._dict_bytes = state.view("dict_bytes")
        self.codec = codec
        self._c = Counters()
        self.segs = state.view("segment")
        self.backing: backing.Backing | None = None
        # The page the last write stopped at: (index, its bytes, kind,
        # algorithm, payload), to go on with instead of a second compression.
        self._stopped: tuple[int, bytes, int, int, Buffer | int] | None = None

    @property
    def c(self) -> Counters:
        return self._c

    def set_codec(self, codec: Codec) -> None:
        self.codec = codec

    def reference(self) -> Pool:
        return self

    def adopt(self, pool: Pool) -> None:
        assert pool is self

    def count(self, name: str, n: int = 1) -> None:
        if name not in COUNTER_NAMES:
            raise AttributeError(f"no engine counter named {name!r}")
        setattr(self._c, name, getattr(self._c, name) + n)

    def rebuild_pages(self, extents: Extents) -> tuple[int, int, int]:
        counts = rebuild.rebuild_pages(self, self.table, extents)
        self._c.pages_stored, self._c.same_pages, self._c.huge_pages = counts
        self._load_dicts()
        return counts

    def check_pages(self, extents: Extents) -> None:
        c = self._c
        rebuild.check_pages(self, self.table, extents, (c.pages_stored, c.same_pages, c.huge_pages))

    def close(self) -> None:
        pass

    # -- the backing file (backing.py) ----------------------------------------

    def attach_backing(self, fd: int, size: int) -> None:
        self.backing = backing.Backing(self, backing.BackingFile(fd, size, self.state.hook))

    def _backing(self) -> backing.Backing:
        if self.backing is None:
            raise BadRequest("no backing file is attached")
        return self.backing

    def writeback(self, max_objects: int, max_bytes: int, idle_ticks: int = 0) -> tuple[int, int]:
        return self._backing().writeback_step(max_objects, max_bytes, idle_ticks)

    def clean(self, max_objects: int, max_bytes: int, percent: int) -> tuple[int, int]:
        return self._backing().clean_step(max_objects, max_bytes, percent)

    def backing_figures(self) -> dict[str, int]:
        return self._backing().figures()

    def backing_latency(self) -> list[int]:
        return list(self._backing().latency)

    def rebuild_backing(self, pages: Extents, segments: Extents) -> int:
        self._c.bd_count = rebuild.rebuild_segments(self.table, self.segs, pages, segments)
        return self._c.bd_count

    def check_backing(self, pages: Extents, segments: Extents) -> None:
        rebuild.check_segments(self.table, self.segs, pages, segments, self._c.bd_count)

    # -- pages --------------------------------------------------------------

    def _release(self, e: int) -> None:
        kind = entry.kind(e)
        if not kind:
            return
        self._c.pages_stored -= 1
        if e & entry.BACKED:
            # The object stays in its segment as dead bytes (cleaning's).
            self.segs[entry.location(e) * backing.OBJ_ALIGN // backing.SEG_SIZE] -= backing.span(entry.length(e))
            self._c.bd_count -= 1
            if 0 < entry.tier(e) <= entry.DICT_SLOTS:
                self._dict_refs[entry.tier(e)] -= 1
            return
        h = entry.handle(e)
        if kind == KIND_SAME:
            self.free_word(h)
            self._c.same_pages -= 1
        else:
            self.free(h, entry.length(e))
            if kind == KIND_HUGE:
                self._c.huge_pages -= 1
            tier = entry.tier(e)
            if 0 < tier <= entry.DICT_SLOTS:
                self._dict_refs[tier] -= 1  # after the entry stopped naming it

    def _store_page(self, idx: int, page: Buffer, refuse: bool) -> int:
        stopped, self._stopped = self._stopped, None
        if stopped is not None and stopped[0] == idx and stopped[1] == bytes(page):
            kind, algo, payload = stopped[2:]  # the page this write stopped at
        else:
            kind, algo, payload = self.codec.encode(page, self.huge_threshold)
            if kind != KIND_SAME:
                self.compressions += 1
        if refuse and kind != KIND_SAME:
            self._stopped = (idx, bytes(page), kind, algo, bytes(payload) if kind == KIND_HUGE else payload)  # type: ignore[arg-type]
            return REFUSED
        # Allocate before freeing the old object: a failed store keeps the page.
        try:
            h = self.store_word(payload) if kind == KIND_SAME else self.store(payload)  # type: ignore[arg-type]
        except PoolFull:
            self._stopped = (idx, bytes(page), kind, algo, bytes(payload) if kind == KIND_HUGE else payload)  # type: ignore[arg-type]
            return NOROOM
        c = self._c
        now = self.now_tick  # a write is an access
        if kind == KIND_SAME:
            self.table[idx], old = entry.make(h, kind, stamp=now), self.table[idx]
            c.same_pages += 1
        else:
            self.table[idx], old = entry.make(h, kind, algo, len(payload), stamp=now), self.table[idx]  # type: ignore[arg-type]
            if kind == KIND_HUGE:
                c.huge_pages += 1
        c.pages_stored += 1
        if entry.kind(old):
            self._release(old)
        used = self.mem_used_total
        if used > c.mem_used_max:
            c.mem_used_max = used
        return OK

    def _load_page(self, idx: int) -> Buffer:
        e = self.table[idx]
        kind = entry.kind(e)
        if not kind:
            return _ZERO_PAGE
        if entry.idle(e) != self.now_tick:  # a read is an access: page.c's stamp_locked
            self.table[idx] = entry.with_idle(e, self.now_tick)
        h = entry.handle(e)
        if e & entry.BACKED:
            data: Buffer = self._backing().load(idx, e)
        elif kind == KIND_SAME:
            return fill_page(self.word(h))
        else:
            data = self.load(h, entry.length(e))
        if kind == KIND_HUGE:
            return data
        try:
            return self._decompress(e, data)
        except Exception as e:
            # One exception type for a bad object, whichever engine and codec.
            self._c.failed_reads += 1
            raise CorruptObject(f"corrupt object: page {idx} did not decompress to a 4096-byte page ({e})") from None

    def _decompress(self, e: int, data: Buffer) -> bytes:
        tier = entry.tier(e)
        if tier and tier != entry.TIER_PLAIN:
            d = self._dicts.get(tier)
            if d is None or entry.algo(e) != codec.ALGO_ZSTD:
                raise ValueError(f"dictionary slot {tier} is not held")
            out: bytes = zstandard.ZstdDecompressor(dict_data=d).decompress(data, max_output_size=PAGE_SIZE)
            if len(out) != PAGE_SIZE:
                raise ValueError(f"decompressed to {len(out)} bytes")
            return out
        return self.codec.decompress(entry.algo(e), data)

    # -- dictionaries (tier.c's order) ------------------------------------------

    def _dict_at(self, slot: int) -> int:
        return (slot - 1) * DICT_MAX_BYTES

    def _load_dicts(self) -> None:
        """dict_load_all: a slot zstd refuses stays installed, unloaded
        (broken_dictionaries)."""
        self._dicts.clear()
        self._cdicts.clear()
        for slot in range(1, entry.DICT_SLOTS + 1):
            head = self._dict_head[slot]
            if head:
                at, n = self._dict_at(slot), head & 0xFFFFFFFF
                d = zstandard.ZstdCompressionDict(bytes(self._dict_bytes[at : at + n]))
                try:
                    zstandard.ZstdDecompressor(dict_data=d)  # digests it now, as ZSTD_createDDict
                except zstandard.ZstdError:
                    continue
                self._dicts[slot] = d

    def broken_dictionaries(self) -> list[int]:
        return [s for s in range(1, entry.DICT_SLOTS + 1) if self._dict_head[s] and s not in self._dicts]

    def add_dictionary(self, data: bytes) -> tuple[int, int]:
        n = len(data)
        if not 0 < n <= DICT_MAX_BYTES:
            raise ValueError(f"a dictionary must be 1..{DICT_MAX_BYTES} bytes that zstd accepts")
        heads = [self._dict_head[s] for s in range(entry.DICT_SLOTS + 1)]
        free = [s for s in range(1, entry.DICT_SLOTS + 1) if not heads[s]]
        if not free:
            raise ValueError(f"every dictionary slot ({entry.DICT_SLOTS}) is in use")
        slot, top = free[0], max(h >> 32 for h in heads)
        d = zstandard.ZstdCompressionDict(bytes(data))
        at = self._dict_at(slot)
        self._dict_bytes[at : at + n] = data
        self._dicts[slot] = d
        self._dict_refs[slot] = 0
        self._dict_head[slot] = (top + 1) << 32 | n  # last
        return slot, top + 1

    def drop_dictionary(self, slot: int) -> None:
        if not 0 < slot <= entry.DICT_SLOTS or not self._dict_head[slot]:
            raise ValueError(f"dictionary slot {slot} holds no dictionary")
        if self._dict_refs[slot]:
            raise ValueError(f"dictionary slot {slot} is still named by {self._dict_refs[slot]} pages")
        self._dict_head[slot] = 0  # first
        self._dicts.pop(slot, None)
        for key in [k for k in self._cdicts if k[0] == slot]:
            del self._cdicts[key]

    def dictionaries(self) -> list[tuple[int, int, int, int]]:
        out = []
        for slot in range(1, entry.DICT_SLOTS + 1):
            head = self._dict_head[slot]
            if head:
                out.append((slot, head >> 32, head & 0xFFFFFFFF, self._dict_refs[slot]))
        return out

    def sample(self, first: int, end: int, idle_ticks: int, stride: int, max_pages: int) -> tuple[bytes, int]:
        if stride < 1 or max_pages > 1 << 20:
            raise ValueError("sample: stride must be >= 1 and max at most 2^20 pages")
        now = self.now_tick & entry.IDLE_MASK
        out: list[bytes] = []
        idx = first
        end = min(end, len(self.table))
        while idx < end and len(out) < max_pages:
            e = self.table[idx]
            if (
                entry.kind(e) == KIND_COMPRESSED
                and entry.tier(e) in (0, entry.TIER_PLAIN)
                and not e & entry.BACKED
                and entry.age(e, now) >= idle_ticks
            ):
                try:
                    out.append(self.codec.decompress(entry.algo(e), self.load(entry.handle(e), entry.length(e))))
                except Exception:
                    pass
            idx += stride
        return b"".join(out), idx

    def train(self, samples: bytes, size: int) -> bytes:
        return _train(samples, size)

    def _secondary(self, page: Buffer, level: int, room: int, slot: int) -> bytes | None:
        """The page compressed by zstd at ``level`` (with dictionary
        ``slot``), if it fits in ``room`` bytes."""
        if self.recompress_page is not None:  # a test's codec (see __init__)
            if not slot:
                return self.recompress_page(page, level, room)
            at, n = self._dict_at(slot), self._dict_head[slot] & 0xFFFFFFFF
            return self.recompress_page(page, level, room, bytes(self._dict_bytes[at : at + n]))
        zc = self._cdicts.get((slot, level))
        if zc is None:
            if slot:
                zc = zstandard.ZstdCompressor(
                    level=level, dict_data=self._dicts[slot], write_content_size=False, write_checksum=False,
                    write_dict_id=False,
                )  # fmt: skip
                self._cdicts.clear()  # one at a time, as tier.c's CDict
                self._cdicts[(slot, level)] = zc
            else:
                zc = _zstd_compressor(level)
        out: bytes = zc.compress(page)
        return out if len(out) <= room else None

    # -- the recompression tier (zswapd/engine/tier.c, step for step) ----------

    def recompress_step(
        self,
        first: int,
        end: int,
        min_len: int,
        max_len: int,
        idle_ticks: int,
        threshold: int,
        level: int,
        max_pages: int,
        slot: int = 0,
        over: int = 0,
    ) -> tuple[int, int, int, int, int, int, int, int]:
        if not 1 <= level <= _ZSTD_MAX_LEVEL:
            raise ValueError(f"zstd level {level} is outside 1..{_ZSTD_MAX_LEVEL}")
        if not 0 <= over <= pool_rules.MOVE_RESERVE:
            raise ValueError(f"a step may take at most {pool_rules.MOVE_RESERVE} frames past the limit, not {over}")
        if slot and (slot > entry.DICT_SLOTS or not self._dict_head[slot] or slot not in self._dicts):
            raise ValueError(f"dictionary slot {slot} holds no dictionary")
        tier = slot or entry.TIER_PLAIN
        probes = probe_plain = probe_dict = 0
        table, c = self.table, self._c
        now = self.now_tick & entry.IDLE_MASK
        room = self.huge_threshold - 1
        pages = saved = looked = 0
        st = OK
        idx = first
        end = min(end, len(table))
        while idx < end and looked < max_pages:
            e = table[idx]
            kind = entry.kind(e)
            if not kind:
                idx += 1
                continue
            if entry.age(e, now) > entry.IDLE_CLAMP:
                e = entry.with_idle(e, now - entry.IDLE_CLAMP)
                table[idx] = e
            n = entry.length(e)
            if (
                kind not in (KIND_COMPRESSED, KIND_HUGE)
                or entry.tier(e)
                or entry.tried(e)
                or e & entry.BACKED
                or not min_len <= n <= max_len
                or entry.age(e, now) < idle_ticks
            ):
                idx += 1
                continue
            looked += 1
            h = entry.handle(e)
            data = bytes(self.load(h, n))
            if kind == KIND_COMPRESSED:
                try:
                    page = self.codec.decompress(entry.algo(e), data)
                except Exception:  # corrupt: a read reports it
                    idx += 1
                    continue
            else:
                page = data
            out = self._secondary(page, level, room, slot)
            m = len(out) if out else 0
            if slot and looked % PROBE_EVERY == 1:  # the retrain rule's probe
                plain = self._secondary(page, level, room, 0)
                probes += 1
                probe_plain += len(plain) if plain else PAGE_SIZE
                probe_dict += m or PAGE_SIZE
            old_cls = len(CLASSES) if kind == KIND_HUGE else _CLASS_OF[n + pool_rules.HEADER]
            if not m or m + threshold > n or _CLASS_OF[m + pool_rules.HEADER] >= old_cls:
                table[idx] = e | entry.TRIED
                if m:
                    c.recompress_skipped += 1
                else:
                    c.recompress_incompressible += 1
                idx += 1
                continue
            try:
                h2 = self.store(out, over)  # type: ignore[arg-type]
            except PoolFull:
                st = NOROOM
                break
            c.mem_used_max = max(c.mem_used_max, self.mem_used_total)  # the move reserve shows
            if slot:
                self._dict_refs[slot] += 1  # counted before the entry names it
            table[idx] = entry.make(h2, KIND_COMPRESSED, codec.ALGO_ZSTD, m, tier, entry.idle(e))
            self.free(h, n)
            if kind == KIND_HUGE:
                c.huge_pages -= 1
            c.recompressed += 1
            c.recompress_saved += n - m
            pages += 1
            saved += n - m
            idx += 1
        self.trim()
        return idx, pages, saved, looked, st, probes, probe_plain, probe_dict

    def census(self) -> tuple[list[int], list[int], list[int]]:
        return census_of(self.table.tolist(), self.now_tick)

    def write(self, offset: int, data: Buffer) -> tuple[int, int]:
        # write_request in zswapd/engine/page.c, step for step.
        self._c.num_writes += 1
        mv = memoryview(data).cast("B")
        done, retried = 0, False
        while True:
            step, st = self._write_range(offset + done, mv[done:], bool(self.full))
            if step:
                retried = False  # a new page stops, if one does
            done += step
            if st == OK or self.policy is None or not self.policy(st, retried):
                return done, st
            retried = retried or st == NOROOM

    def _write_range(self, offset: int, mv: memoryview, refuse: bool) -> tuple[int, int]:
        """Store ``mv`` at ``offset`` up to the first page that stops."""
        n = len(mv)
        try:
            if not offset % PAGE_SIZE and not n % PAGE_SIZE:
                # The swap path: whole pages, so no read-modify-write.
                store_page = self._store_page
                idx = offset // PAGE_SIZE
                for pos in range(0, n, PAGE_SIZE):
                    st = store_page(idx, mv[pos : pos + PAGE_SIZE], refuse)
                    if st:
                        return pos, st
                    idx += 1
                return n, OK
            for idx, within, pos, take in _spans(offset, n):
                if take == PAGE_SIZE:
                    st = self._store_page(idx, mv[pos : pos + PAGE_SIZE], refuse)
                else:
                    page = bytearray(self._load_page(idx))
                    page[within : within + take] = mv[pos : pos + take]
                    st = self._store_page(idx, page, refuse)
                if st:
                    return pos, st
            return n, OK
        finally:
            self.trim()  # also when a store failed part way

    def readinto(self, offset: int, out: memoryview) -> int:
        self._c.num_reads += 1
        n = len(out)
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

    def discard_pages(self, first: int, end: int) -> int:
        freed = 0
        table = self.table
        for idx in range(first, end):
            old = table[idx]
            if entry.kind(old):
                table[idx] = 0  # the entry first, then the object (crash rule 2)
                self._release(old)
                freed += 1
        self._c.notify_free += freed
        self.trim()
        return freed


_ZSTD_MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL


@functools.lru_cache(maxsize=4)
def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    # The frame codec.py writes: no content size, checksum or dictionary id.
    return zstandard.ZstdCompressor(level=level, write_content_size=False, write_checksum=False, write_dict_id=False)


# tier.h's PROBE_EVERY: one candidate in this many is also compressed
# without the dictionary, for the retrain rule.
PROBE_EVERY = 32


def _train(samples: bytes, size: int) -> bytes:
    """python-zstandard's trainer (zdict.h's fastCover) over 4096-byte pages."""
    pages: list[Buffer] = [samples[i : i + PAGE_SIZE] for i in range(0, len(samples) - PAGE_SIZE + 1, PAGE_SIZE)]
    if not 0 < size <= DICT_MAX_BYTES:
        raise ValueError(f"dictionary size must be 1..{DICT_MAX_BYTES} bytes")
    try:
        out: bytes = zstandard.train_dictionary(size, pages).as_bytes()
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd could not train a {size}-byte dictionary on {len(pages)} pages ({e})") from None
    return out


def census_of(entries: Sequence[int], now: int) -> tuple[list[int], list[int], list[int]]:
    """Engine.census over a list of page-table entries (tier_api.c's)."""
    ages = [0] * (entry.IDLE_MASK + 1)
    pages = [0] * 128
    nbytes = [0] * 128
    for e in entries:
        kind = e & entry.KIND_MASK
        if not kind:
            continue
        ages[entry.age(e, now)] += 1
        i = kind * 32 + entry.algo(e) * 8 + entry.tier(e)
        pages[i] += 1
        if kind != KIND_SAME:
            nbytes[i] += entry.length(e)
    return ages, pages, nbytes


# The tier field names state's dictionary slots, and config bounds the idle
# age and dictionary size by what the entry and the state can hold: one
# number each, written where it belongs and asserted here.
assert entry.DICT_SLOTS == DICT_SLOTS, "entry.DICT_SLOTS and state.DICT_SLOTS disagree"
assert MAX_IDLE_AGE == entry.IDLE_CLAMP * entry.IDLE_TICK, "config.MAX_IDLE_AGE and entry's clamp disagree"
assert MAX_DICTIONARY_SIZE == DICT_MAX_BYTES, "config.MAX_DICTIONARY_SIZE and state.DICT_MAX_BYTES disagree"


def python_rules() -> dict[str, Any]:
    """Every rule the C engine also writes down (its RULES), from the Python
    modules that define them; equal, or the C build is refused."""
    return {
        "ENTRY_KIND_MASK": entry.KIND_MASK,
        "ENTRY_ALGO_SHIFT": entry.ALGO_SHIFT,
        "ENTRY_ALGO_MASK": entry.ALGO_MASK,
        "ENTRY_LEN_SHIFT": entry.LEN_SHIFT,
        "ENTRY_LEN_MASK": entry.LEN_MASK,
        "ENTRY_TIER_SHIFT": entry.TIER_SHIFT,
        "ENTRY_TIER_MASK": entry.TIER_MASK,
        "DICT_SLOTS": entry.DICT_SLOTS,
        "DICT_MAX_BYTES": DICT_MAX_BYTES,
        "TIER_PLAIN": entry.TIER_PLAIN,
        "ENTRY_TRIED": entry.TRIED,
        "ENTRY_IDLE_SHIFT": entry.IDLE_SHIFT,
        "ENTRY_IDLE_MASK": entry.IDLE_MASK,
        "IDLE_CLAMP": entry.IDLE_CLAMP,
        "ENTRY_HANDLE_SHIFT": entry.HANDLE_SHIFT,
        "ENTRY_UNUSED": entry.UNUSED,
        "ENTRY_BACKED": entry.BACKED,
        "SEG_SIZE": backing.SEG_SIZE,
        "SEG_BLOCK": backing.BLOCK,
        "OBJ_ALIGN": backing.OBJ_ALIGN,
        "OBJ_HEADER": backing.OBJ_HEADER,
        "MAX_SEGMENTS": backing.MAX_SEGMENTS,
        "MAX_PENDING": backing.MAX_PENDING,
        "SEG_FILL_SHIFT": backing.SEG_FILL_SHIFT,
        "SEG_STATE_SHIFT": backing.SEG_STATE_SHIFT,
        "LAT_BUCKETS": backing.LAT_BUCKETS,
        "SEG_FREE": backing.SEG_FREE,
        "SEG_OPEN": backing.SEG_OPEN,
        "SEG_FULL": backing.SEG_FULL,
        "SEG_CLEANING": backing.SEG_CLEANING,
        "KIND_SAME": codec.KIND_SAME,
        "KIND_COMPRESSED": codec.KIND_COMPRESSED,
        "KIND_HUGE": codec.KIND_HUGE,
        "ALGO_LZ4": codec.ALGO_LZ4,
        "ALGO_ZSTD": codec.ALGO_ZSTD,
        "LOC_HUGE": pool_rules.LOC_HUGE,
        "LOC_FRAME_MASK": pool_rules.LOC_FRAME_MASK,
        "LOC_ZSPAGE_SHIFT": pool_rules.LOC_ZSPAGE_SHIFT,
        "LOC_SLOT_MASK": pool_rules.LOC_SLOT_MASK,
        "SLOT_FREE": pool_rules.SLOT_FREE,
        "SLOT_END": pool_rules.SLOT_END,
        "FRAME_SIZE": pool_rules.FRAME_SIZE,
        "HEADER": pool_rules.HEADER,
        "GROUPS": pool_rules.GROUPS,
        "MAX_FRAMES_PER_ZSPAGE": pool_rules.MAX_FRAMES_PER_ZSPAGE,
        "MOVE_RESERVE": pool_rules.MOVE_RESERVE,
        "ST_OK": OK,
        "ST_REFUSED": REFUSED,
        "ST_NOROOM": NOROOM,
        "MAX_THREADS": MAX_FUSE_THREADS,
        "TABLES": tuple((name, struct.calcsize(fmt), dim) for name, fmt, dim, _ in TABLES),
        "COUNTERS": COUNTER_NAMES,
    }


def rules_disagreeing(native: dict[str, Any]) -> list[str]:
    """The shared rules on which a C build's RULES and this Python differ."""
    mine = python_rules()
    return [
        f"{k}: C {native.get(k)!r}, Python {mine.get(k)!r}"
        for k in sorted(set(mine) | set(native))
        if native.get(k) != mine.get(k)
    ]


try:
    from . import _engine

    _NATIVE_ERROR = ""
    if _disagree := rules_disagreeing(_engine.RULES):
        # A build from other sources than this Python: serving with it
        # would misread the state.  Refused as if it were not built.
        _NATIVE_ERROR = "the built engine disagrees with this zswapd's Python on " + "; ".join(_disagree)
        _engine = None  # type: ignore[assignment]
except ImportError as e:  # not built: no compiler or no lz4/zstd headers at install
    _engine = None  # type: ignore[assignment]
    _NATIVE_ERROR = str(e)


if _engine is not None:

    class NativeEngine(_engine.Engine):
        """The C engine on the same state; see the top of engine/engine.h."""

        name = "native"
        # The store's; C reads it where a write from Python stops (the FUSE
        # threads ask it through fuse/threads.py).
        policy: Policy | None = None

        def __init__(self, state: State, codec: Codec, reserve_frames: int = 64, frame_limit: int = 0) -> None:
            g = state.geometry
            if state.hook is not None:
                raise StateError("the native engine cannot run under a crash hook (its stores are not crash points)")
            if g.classes_id != CLASSES_ID:
                raise StateError(f"state's class table {g.classes_id:#x} is not this zswapd's {CLASSES_ID:#x}")
            bufs: dict[str, Any] = {t.name: state.view(t.name) for t in state.tables}
            bufs["arena"] = state.arena()[0]
            classes = [(c.size, c.frames_per_zspage, c.objs_per_zspage) for c in CLASSES]
            super().__init__(
                bufs, state.fds()[1], g.npages, g.max_frames, g.max_handles, classes, bytes(_CLASS_OF),
                HUGE_THRESHOLD, reserve_frames, codec.algo_id, codec.zstd_level,
            )  # fmt: skip
            self.frame_limit = frame_limit
            self.state = state
            self.codec = codec
            self.classes = CLASSES
            self._ref: Pool | None = None
            self._counters = _EngineCounters(self)  # bumped in C, atomically

        @property
        def c(self) -> Counters:
            return self._counters

        @property
        def handles(self) -> memoryview:
            return self.state.view("handle")

        def set_codec(self, codec: Codec) -> None:
            self._set_codec(codec.algo_id, codec.zstd_level)
            self.codec = codec

        def reference(self) -> Pool:
            if self._ref is None:
                g = self.state.geometry
                self._ref = Pool(g.max_frames, g.max_handles, reserve_frames=self.reserve_frames, state=self.state)
            self._ref.set_volatile(self.volatile())
            self._ref.frame_limit = self.frame_limit
            return self._ref

        def adopt(self, pool: Pool) -> None:
            self.set_volatile(pool.volatile())

        def rebuild_pages(self, extents: Extents) -> tuple[int, int, int]:
            return self.rebuild(list(extents), len(ALGORITHMS))

        def train(self, samples: bytes, size: int) -> bytes:
            return _engine.train_dictionary(samples, size)

        def check_pages(self, extents: Extents) -> None:
            super().check_pages(list(extents))

        def rebuild_backing(self, pages: Extents, segments: Extents) -> int:
            count: int = super().rebuild_backing(list(pages), list(segments))
            return count

        def check_backing(self, pages: Extents, segments: Extents) -> None:
            super().check_backing(list(pages), list(segments))

        def class_stats(self) -> list[dict[str, Any]]:
            return self.reference().class_stats()

        def metadata_bytes(self) -> int:
            return self.state.resident_bytes([t.name for t in self.state.tables if t.name != "page"])


def native_error() -> str:
    """Why the native engine is unavailable ("" when it is available)."""
    return _NATIVE_ERROR


_warned = False


def select(name: str, hooked: bool = False) -> str:
    """The engine that will serve for ``[pool] engine = name``."""
    global _warned
    if name not in ENGINES:
        raise BadRequest(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "python":
        return "python"
    if name == "native":
        if _NATIVE_ERROR:
            raise BadRequest(
                f"engine 'native' was asked for but the extension is not built ({_NATIVE_ERROR}); "
                'install gcc python3-dev liblz4-dev libzstd-dev and reinstall, or set engine = "auto"'
            )
        if hooked:
            raise BadRequest("engine 'native' cannot run on a state with a crash hook; use engine 'python'")
        return "native"
    if hooked:
        return "python"
    if _NATIVE_ERROR:
        if not _warned:
            _warned = True
            log.warning("native engine not available (%s); serving with the Python engine", _NATIVE_ERROR)
        return "python"
    return "native"


def make_engine(name: str, state: State, codec: Codec, reserve_frames: int = 64, frame_limit: int = 0) -> Engine:
    """An engine over ``state``; ``name`` as in ``[pool] engine``."""
    if select(name, state.hook is not None) == "native":
        return NativeEngine(state, codec, reserve_frames, frame_limit)
    return PythonEngine(state, codec, reserve_frames, frame_limit)


def open_pool(name: str, max_frames: int, max_handles: int, frame_limit: int = 0, reserve_frames: int = 64) -> Engine:
    """A bare pool (no device pages) served by engine ``name``: what the pool
    tests run against both engines."""
    state = State.create(pool_geometry(max_frames, max_handles))
    return make_engine(name, state, Codec(), reserve_frames, frame_limit)
