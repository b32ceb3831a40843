"""Persistent state: every byte a new worker needs, in memfd mappings.

Glossary (the same words as in pool.py, store.py and docs/design.md):

state
    Two memfds, mapped MAP_SHARED: *meta* (a header page, then the tables)
    and *arena* (the frames).  Whoever holds the fds holds the device's
    contents; a process that dies loses nothing but its volatile indexes.
header
    The first page of meta: magic, layout version, geometry, the codec ids
    that page-table entries refer to, the negotiated FUSE INIT, a snapshot of
    the event counters, and a directory of the tables.  Little-endian.
geometry
    The sizes everything else is derived from: device pages, frames, handles
    (zspages = frames + 1), and a fingerprint of the size-class table, since
    a slot's position in a zspage depends on it.
persistent table
    Truth after a crash: the page table, the handle table, each zspage's first
    frame and class, each frame's chain link.  Written in an order that keeps
    them repairable at every step (see store.py and pool.py).
volatile table
    An index (free stacks, fullness-list links, objects in use, free-slot
    heads).  Kept in meta next to the others so one mlock and one mincore
    cover all metadata, but never read after a crash: the rebuild scan
    overwrites it from the persistent tables.
hole
    A page of a memfd with nothing behind it: a frame given back with
    ``fallocate(PUNCH_HOLE)`` or a table page never touched.  Reads as zeros
    and costs no memory.  ``MADV_DONTNEED`` would free nothing here: on a
    MAP_SHARED mapping it only drops this process's page-table entries, the
    page stays in the memfd's page cache.

Table entries are fixed-width (memoryview formats ``B``, ``H``, ``I``, ``Q``
are 1, 2, 4, 8 bytes on every Linux ABI); ``L`` is never used because it is
8 bytes on x86_64 and 4 on i386.  Entries are in native byte order; the magic
is written as bytes, so an attach on a machine of the other order fails on it.

Apart from creating, mapping and punching its own memfds, this module does no
I/O.  It imports nothing else of zswapd: the pool and the store sit above it.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from . import libc

MAGIC = b"zswapdST"
# Bumped on any change to the header or to a table's format or order; an
# older or newer worker then refuses the state instead of misreading it.
LAYOUT_VERSION = 2
# One header page: mincore and holes work in pages, and the tables after it
# start page aligned.
HEADER_BYTES = 4096
FRAME_BYTES = 4096  # pool.FRAME_SIZE; repeated here because state sits below pool
# Frames and zspages are named by ``I`` entries, so both must stay below 2**32
# (zspage ids go up to max_frames + 1).
MAX_FRAMES = (1 << 32) - 2
# The page table keeps a handle in bits 32-62, so handles fit in 31 bits.
MAX_HANDLES = 0x7FFFFFFF
# Segments of the backing file (backing.py): 32 GiB, the most a page
# entry's 31-bit location in 16-byte units addresses, of 256 KiB.  The
# segment table is that long whatever the file's size: it is sparse, so
# only the segments a file has ever used cost memory.
MAX_SEGMENTS = 1 << 17
# Event counters kept in the header snapshot, by name: slot i holds
# COUNTER_SNAPSHOT[i] (engine.Counters' names, and the engine's
# pages_compacted).  Only ever appended to: 32 slots leave room for more
# without a layout change (a worker reads a slot it does not name as 0).
COUNTER_SLOTS = 32
COUNTER_SNAPSHOT = (
    "num_reads",
    "num_writes",
    "failed_reads",
    "failed_writes",
    "notify_free",
    "mem_used_max",
    "compactions",
    "limit_hits",
    "recompressed",
    "recompress_saved",
    "recompress_skipped",
    "recompress_incompressible",
    "recompress_cpu_us",
    "dictionaries_trained",
    "pages_compacted",
    "bd_reads",
    "bd_writes",
    "segments_cleaned",
)
assert len(COUNTER_SNAPSHOT) <= COUNTER_SLOTS
# Up to this many bytes of ",".join(codec algorithm names): page-table entries
# name their algorithm by index, so the list must mean the same to every
# worker that attaches.
ALGORITHMS_BYTES = 32
# Dictionary slots 1..DICT_SLOTS (entry.DICT_SLOTS, whose tier field names
# them; engine.py checks the two agree), each up to DICT_MAX_BYTES: zstd's
# own guidance is 100 KiB-class dictionaries, and 256 KiB leaves room for a
# dictionary_size of twice the default.  Sparse: a slot costs memory only
# while it holds a dictionary.
DICT_SLOTS = 6
DICT_MAX_BYTES = 256 * 1024
_MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 1)
# Sealed once sized: nobody holding a state fd (a worker, the supervisor,
# systemd's fd store) can shrink it, which would SIGBUS every mapping, or
# grow it.  Both memfds are sized once, at create (sparse, to their final
# size: the geometry fixes every table and the arena), so nothing of ours
# ever resizes them.  F_SEAL_SEAL: nor can anyone add F_SEAL_WRITE or
# F_SEAL_FUTURE_WRITE later, which would fail the next worker's writable
# mapping.  Punching holes (frames given back) is still allowed: only a
# write seal would refuse it.
_STATE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# Fixed header fields, little-endian, at offset 0.
_HEAD = struct.Struct(
    "<8s I I"  # magic, layout version, header bytes
    " I I"  # page size, frame size
    " Q Q Q Q"  # npages, max_frames, max_handles, max_zspages
    " I I"  # class-table fingerprint, table count
    f" {ALGORITHMS_BYTES}s i i"  # algorithm names, configured algorithm id, zstd level
)
# The negotiated FUSE INIT, filled by the worker after INIT and restored by
# the next one (INIT is never sent again on a live connection).
_INIT_AT = 256
# valid, minor, max_write, max_readahead, flags | flags2 << 32, max_pages, time_gran
_INIT = struct.Struct("<I I I I Q I I")
# The number of workers before the one serving (stats' worker_restarts), so a
# supervisor restarted by systemd goes on counting where the dead one was.
# Zero in a state written before it existed, which is the right reading.
_RESTARTS_AT = 320
_RESTARTS = struct.Struct("<Q")
# The number of supervisors before the one running (stats'
# supervisor_restarts), written by the supervisor itself with pwrite.
_SUPERVISOR_RESTARTS_AT = 328
# The runtime settings in force (what `zswapd set` changes; the algorithm and
# zstd level are in the fixed fields): a worker that takes over after a crash
# goes on with them, as zram keeps what was written to its sysfs files.
# valid, accept_percent, memory_limit; valid is 0 in an older state.
_SETTINGS_AT = 336
_SETTINGS = struct.Struct("<I I Q")
# Writeback's daily meter ([writeback] daily_limit): the day (UTC days
# since the epoch) and the bytes written back in it, so a takeover goes on
# counting.  valid is 0 in an older state.
_WRITEBACK_AT = 448
_WRITEBACK = struct.Struct("<I I Q Q")  # valid, pad, day, bytes written that day
# The backing file the pages were written back to (backing.identity): a
# takeover given another file, or none, says so instead of reading garbage;
# a supervisor that lost the fd reopens the file by path only if it is this
# one.  valid is 0 in an older state and before writeback was first used.
_BACKING_AT = 480
_BACKING = struct.Struct("<I I Q Q Q")  # valid, pad, st_dev, st_ino, size
_COUNTERS_AT = 512
_COUNTERS = struct.Struct(f"<{COUNTER_SLOTS}Q")
assert _WRITEBACK_AT + _WRITEBACK.size <= _BACKING_AT and _BACKING_AT + _BACKING.size <= _COUNTERS_AT
_DIR_AT = 1024
_DIR = struct.Struct("<12s 4s Q Q")  # name, format, offset in meta, entries
_MAX_TABLES = (HEADER_BYTES - _DIR_AT) // _DIR.size


class StateError(Exception):
    """The memfds do not hold a state this code can use, or it is corrupt."""


@dataclass(frozen=True)
class Geometry:
    npages: int  # device pages: page-table entries
    max_frames: int  # frames in the arena
    max_handles: int  # handles 1..max_handles (0 means none)
    classes_id: int  # fingerprint of the pool's size-class table

    @property
    def max_zspages(self) -> int:
        # zspage ids start at 1 (0 means none) and a zspage holds a frame.
        return self.max_frames + 1

    def check(self) -> None:
        if self.npages < 0:
            raise StateError(f"geometry: npages must be >= 0, got {self.npages}")
        if not 8 <= self.max_frames <= MAX_FRAMES:
            raise StateError(f"geometry: max_frames must be in 8..{MAX_FRAMES}, got {self.max_frames}")
        if not 1 <= self.max_handles <= MAX_HANDLES:
            raise StateError(f"geometry: max_handles must be in 1..{MAX_HANDLES}, got {self.max_handles}")


class Table(NamedTuple):
    name: str
    fmt: str
    entries: int
    persistent: bool


# The tables of meta, in order: (name, entry format, what it is indexed by,
# persistent).  The C engine lists them too (zswapd/engine/engine.h,
# ENGINE_TABLES); engine.py checks at import that the two lists agree.
TABLES = (
    ("page", "Q", "pages", True),  # entry.py: kind, algorithm, length, tier, tried, idle stamp, handle
    ("handle", "Q", "handles", True),  # zspage << 16 | slot, huge tag | frame, or a fill word
    ("zs_first", "I", "zspages", True),  # first frame of a zspage
    ("zs_class", "H", "zspages", True),  # size class of a zspage
    ("frame_next", "I", "frames", True),  # next frame in a zspage's chain
    ("zs_inuse", "H", "zspages", False),
    ("zs_free", "H", "zspages", False),  # first free slot, 0xFFFF when full
    ("zs_next", "I", "zspages", False),  # fullness-list links
    ("zs_prev", "I", "zspages", False),
    ("zs_group", "B", "zspages", False),
    ("zs_stack", "I", "zspages", False),  # free zspage ids
    ("hot", "I", "frames", False),  # free frames still resident
    ("cold", "I", "frames", False),  # free frames punched out
    ("handle_stack", "I", "handles", False),  # free handles
    # Dictionaries of the recompression tier, slot 0 unused (tier 0 names
    # none).  dict_head: id << 32 | length in bytes, 0 for a free slot,
    # written after the bytes (a slot is installed complete or not at all)
    # and zeroed before a slot is reused; dict_refs: entries naming the
    # slot (volatile: the rebuild recounts them).
    ("dict_head", "Q", "dicts", True),
    ("dict_refs", "Q", "dicts", False),
    ("dict_bytes", "B", "dict_bytes", True),  # slot s at (s - 1) * DICT_MAX_BYTES
    ("segment", "Q", "segments", True),  # backing.py: live bytes, fill, state of each segment
)


def dimensions(g: Geometry) -> dict[str, int]:
    """Entries per table, by what the table is indexed by: handles and
    zspages are numbered from 1 (0 means none)."""
    return {"pages": g.npages, "handles": g.max_handles + 1, "zspages": g.max_zspages, "frames": g.max_frames,
            "dicts": DICT_SLOTS + 1, "dict_bytes": DICT_SLOTS * DICT_MAX_BYTES, "segments": MAX_SEGMENTS}  # fmt: skip


def layout(g: Geometry) -> list[Table]:
    """The tables of meta, in order.  Each starts on a page boundary so that
    mincore can tell them apart and an untouched one stays a hole."""
    entries = dimensions(g)
    return [Table(name, fmt, entries[dim], persistent) for name, fmt, dim, persistent in TABLES]


def _page_up(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _offsets(tables: list[Table]) -> tuple[dict[str, int], int]:
    at = HEADER_BYTES
    offsets = {}
    for t in tables:
        offsets[t.name] = at
        at += _page_up(t.entries * struct.calcsize(t.fmt))
    return offsets, at


class InitParams(NamedTuple):
    minor: int
    max_write: int
    max_readahead: int
    flags: int  # flags | flags2 << 32
    max_pages: int
    time_gran: int


class CrashHook:
    """Test hook: ends the process with ``os._exit`` after N writes to the
    persistent tables, arena or holes.  Only a State created or attached
    with a hook routes writes through it; without one, the pool writes to
    plain memoryviews and pays nothing."""

    EXIT_CODE = 77

    def __init__(self) -> None:
        self.left = -1  # disarmed

    def arm(self, steps: int) -> None:
        self.left = steps

    def step(self) -> None:
        if self.left < 0:
            return
        if self.left == 0:
            os._exit(self.EXIT_CODE)
        self.left -= 1


class _SteppedView:
    """A memoryview whose every store is a crash point.  A slice store is two
    crash points, half each, so a torn copy is exercised too."""

    __slots__ = ("_view", "_hook")

    def __init__(self, view: memoryview, hook: CrashHook) -> None:
        self._view = view
        self._hook = hook

    def __len__(self) -> int:
        return len(self._view)

    def __getitem__(self, key: int | slice) -> object:
        return self._view[key]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        view, hook = self._view, self._hook
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(view))
            half = (stop - start) // 2
            data = cast(memoryview, value)
            hook.step()
            view[start : start + half] = data[:half]
            hook.step()
            view[start + half : stop] = data[half:]
            return
        hook.step()
        view[key] = value

    def tolist(self) -> list[int]:
        out: list[int] = self._view.tolist()
        return out


def _address(m: mmap.mmap) -> int:
    # The ctypes object holds a buffer export on the mapping; drop it at once
    # so close() can unmap.  The address stays valid while the mapping lives.
    probe = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(probe)
    del probe
    return addr


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class State:
    """The memfds of one device and their mappings.  ``create`` makes new
    ones; ``attach`` maps ones that another process made and checks that
    they hold a state of this layout.  Either way the volatile tables are
    not to be trusted until the store's rebuild has run."""

    def __init__(self, fds: tuple[int, int], geometry: Geometry, hook: CrashHook | None) -> None:
        self.geometry = geometry
        self.hook = hook
        self._fds = fds
        self._finalizer = weakref.finalize(self, _close_fds, fds)
        self.tables = layout(geometry)
        self.offsets, self.meta_bytes = _offsets(self.tables)
        self.arena_bytes = geometry.max_frames * FRAME_BYTES
        self._meta = mmap.mmap(fds[0], self.meta_bytes, flags=mmap.MAP_SHARED)
        self._arena = mmap.mmap(fds[1], self.arena_bytes, flags=mmap.MAP_SHARED)
        self._meta_addr = _address(self._meta)
        self._views: list[memoryview] = []
        mv = memoryview(self._meta)
        self._views.append(mv)
        self._tables: dict[str, memoryview] = {}
        for t in self.tables:
            at = self.offsets[t.name]
            nbytes = t.entries * struct.calcsize(t.fmt)
            piece = mv[at : at + nbytes]
            view = piece.cast(t.fmt)  # type: ignore[call-overload]
            self._views += [piece, view]
            self._tables[t.name] = view
        self._header = mv[:HEADER_BYTES]
        av = memoryview(self._arena)
        self._arena_bytes_view = av
        self._arena_words_view = av.cast("I")
        self._views += [self._header, av, self._arena_words_view]

    # -- making and attaching ------------------------------------------------

    @classmethod
    def create(cls, geometry: Geometry, algorithms: Sequence[str] = (), hook: CrashHook | None = None) -> State:
        """New, empty memfds for ``geometry``.  ``algorithms`` names the codec
        ids the page table will use, in order."""
        geometry.check()
        names = ",".join(algorithms).encode()
        if len(names) > ALGORITHMS_BYTES:
            raise StateError(f"algorithm names {names!r} exceed {ALGORITHMS_BYTES} bytes")
        tables = layout(geometry)
        if len(tables) > _MAX_TABLES:
            raise StateError("too many tables for the header directory")
        _, meta_bytes = _offsets(tables)
        meta = os.memfd_create("zswapd-meta", _MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        arena = os.memfd_create("zswapd-arena", _MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # Sparse: shmem gives a page only when it is first written.
            os.ftruncate(meta, meta_bytes)
            os.ftruncate(arena, geometry.max_frames * FRAME_BYTES)
            for fd in (meta, arena):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _STATE_SEALS)
            state = cls((meta, arena), geometry, hook)
        except BaseException:
            _close_fds((meta, arena))
            raise
        g = geometry
        state._header[: _HEAD.size] = _HEAD.pack(
            MAGIC, LAYOUT_VERSION, HEADER_BYTES, mmap.PAGESIZE, FRAME_BYTES,
            g.npages, g.max_frames, g.max_handles, g.max_zspages, g.classes_id, len(tables), names, -1, 0,
        )  # fmt: skip
        for i, t in enumerate(tables):
            at = _DIR_AT + i * _DIR.size
            state._header[at : at + _DIR.size] = _DIR.pack(
                t.name.encode(), t.fmt.encode(), state.offsets[t.name], t.entries
            )
        return state

    @classmethod
    def attach(cls, fds: Sequence[int], hook: CrashHook | None = None) -> State:
        """Map memfds another State made (``fds()`` of it, in that order).
        The fds are duplicated: the caller keeps and closes its own."""
        if len(fds) != 2:
            raise StateError(f"a state is 2 memfds (meta, arena), got {len(fds)}")
        meta_size = os.fstat(fds[0]).st_size
        if meta_size < HEADER_BYTES:
            raise StateError(f"meta memfd is {meta_size} bytes, smaller than a header ({HEADER_BYTES})")
        head = os.pread(fds[0], _HEAD.size, 0)
        (magic, version, header_bytes, page_size, frame_size, npages, max_frames, max_handles, max_zspages,
         classes_id, ntables, _names, _algo, _level) = _HEAD.unpack(head)  # fmt: skip
        if magic != MAGIC:
            raise StateError(f"meta memfd has magic {magic!r}, expected {MAGIC!r}: not a zswapd state")
        if version != LAYOUT_VERSION:
            raise StateError(
                f"state layout version {version}, this zswapd reads version {LAYOUT_VERSION}: "
                "restart with the zswapd that made it, or swapoff and start afresh"
            )
        if (header_bytes, page_size, frame_size) != (HEADER_BYTES, mmap.PAGESIZE, FRAME_BYTES):
            raise StateError(
                f"state made with header/page/frame sizes {header_bytes}/{page_size}/{frame_size}, "
                f"expected {HEADER_BYTES}/{mmap.PAGESIZE}/{FRAME_BYTES}"
            )
        g = Geometry(npages, max_frames, max_handles, classes_id)
        g.check()
        if max_zspages != g.max_zspages:
            raise StateError(f"header says {max_zspages} zspages, geometry implies {g.max_zspages}")
        tables = layout(g)
        offsets, meta_bytes = _offsets(tables)
        if ntables != len(tables):
            raise StateError(f"header lists {ntables} tables, this layout has {len(tables)}")
        for i, t in enumerate(tables):
            at = _DIR_AT + i * _DIR.size
            name, fmt, offset, count = _DIR.unpack(os.pread(fds[0], _DIR.size, at))
            got = (name.rstrip(b"\0").decode(errors="replace"), fmt.rstrip(b"\0").decode(errors="replace"))
            if got != (t.name, t.fmt) or (offset, count) != (offsets[t.name], t.entries):
                raise StateError(
                    f"table {i} is {got[0]}:{got[1]} at {offset} x{count}, "
                    f"expected {t.name}:{t.fmt} at {offsets[t.name]} x{t.entries}"
                )
        if meta_size < meta_bytes:
            raise StateError(f"meta memfd is {meta_size} bytes, the layout needs {meta_bytes}")
        arena_size = os.fstat(fds[1]).st_size
        if arena_size < g.max_frames * FRAME_BYTES:
            raise StateError(f"arena memfd is {arena_size} bytes, {g.max_frames} frames need {g.max_frames * 4096}")
        mine = (os.dup(fds[0]), os.dup(fds[1]))
        try:
            return cls((mine[0], mine[1]), g, hook)
        except BaseException:
            _close_fds(mine)
            raise

    def fds(self) -> tuple[int, int]:
        """(meta, arena), to hand to another process; close-on-exec is set,
        so pass them explicitly (``pass_fds``)."""
        return self._fds

    def close(self) -> None:
        """Unmap and close.  A mapping some caller still holds a view into is
        left to the garbage collector; the fds are closed regardless."""
        for v in reversed(self._views):
            try:
                v.release()
            except BufferError:
                pass
        self._tables.clear()
        for m in (self._meta, self._arena):
            try:
                m.close()
            except BufferError:
                pass
        self._finalizer()

    # -- views -----------------------------------------------------------------

    def view(self, name: str) -> memoryview:
        """A table, as a typed memoryview (a stepped view under a crash hook
        if the table is persistent)."""
        view = self._tables[name]
        if self.hook is not None and any(t.persistent for t in self.tables if t.name == name):
            return cast(memoryview, _SteppedView(view, self.hook))
        return view

    def arena(self) -> tuple[memoryview, memoryview]:
        """The arena as bytes and as 4-byte words (slot headers)."""
        if self.hook is not None:
            return (
                cast(memoryview, _SteppedView(self._arena_bytes_view, self.hook)),
                cast(memoryview, _SteppedView(self._arena_words_view, self.hook)),
            )
        return self._arena_bytes_view, self._arena_words_view

    # -- frames back to the kernel ---------------------------------------------

    def punch(self, first: int, count: int) -> None:
        """Give frames first..first+count-1 back to the kernel.  They read as
        zeros afterwards.  Works on mlocked mappings, where MADV_REMOVE fails
        with EINVAL; MADV_DONTNEED would free nothing (see ``hole``)."""
        if self.hook is not None:
            self.hook.step()
        if count <= 0:
            return
        try:
            libc.fallocate(self._fds[1], libc.PUNCH_HOLE, first * FRAME_BYTES, count * FRAME_BYTES)
        except OSError as e:
            why = os.strerror(e.errno or 0)
            raise StateError(f"punching frames {first}+{count} out of the arena memfd failed: {why}") from None

    def arena_allocated_bytes(self) -> int:
        """Bytes of the arena memfd backed by memory (or swap)."""
        return os.fstat(self._fds[1]).st_blocks * 512

    # -- measurement -----------------------------------------------------------

    def resident_bytes(self, names: Sequence[str] | None = None) -> int:
        """Bytes of meta (the header and every table, or only ``names``)
        resident in memory, by mincore: what the metadata really costs, since
        tables are faulted in lazily."""
        if names is None:
            return self._resident(0, self.meta_bytes)
        total = 0
        for t in self.tables:
            if t.name in names:
                total += self._resident(self.offsets[t.name], _page_up(t.entries * struct.calcsize(t.fmt)))
        return total

    def _resident(self, offset: int, length: int) -> int:
        pages = length // mmap.PAGESIZE
        if not pages:
            return 0
        vec = (ctypes.c_ubyte * pages)()
        try:
            libc.mincore(self._meta_addr + offset, length, vec)
        except OSError as e:
            raise StateError(f"mincore over the metadata failed: {os.strerror(e.errno or 0)}") from None
        return (pages - bytes(vec).count(0)) * mmap.PAGESIZE

    def extents(self, name: str) -> Iterator[tuple[int, int]]:
        """Ranges [first, end) of entries of a table that are not holes (may
        hold a non-zero entry).  Lets a scan skip the never-touched parts of
        a lazily faulted table instead of faulting them all in."""
        t = next(t for t in self.tables if t.name == name)
        size = struct.calcsize(t.fmt)
        start = self.offsets[name]
        end = start + t.entries * size
        pos = start
        fd = self._fds[0]
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return  # ENXIO: nothing but holes from here on
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            yield (data - start) // size, -(-(hole - start) // size)
            pos = hole

    # -- header fields -----------------------------------------------------------

    def algorithms(self) -> tuple[str, ...]:
        names = _HEAD.unpack(self._header[: _HEAD.size])[11]
        text = bytes(names).rstrip(b"\0").decode(errors="replace")
        return tuple(text.split(",")) if text else ()

    def save_codec(self, algo_id: int, zstd_level: int) -> None:
        """Record the algorithm configured for new writes (informational: the
        page table records each page's own)."""
        at = _HEAD.size - 8
        struct.pack_into("<ii", self._header, at, algo_id, zstd_level)

    def codec(self) -> tuple[int, int]:
        algo, level = struct.unpack_from("<ii", self._header, _HEAD.size - 8)
        return int(algo), int(level)

    def save_init(self, p: InitParams) -> None:
        _INIT.pack_into(self._header, _INIT_AT, 1, *p)

    def load_init(self) -> InitParams | None:
        """The FUSE INIT a previous worker negotiated, or None if none did."""
        valid, *rest = _INIT.unpack_from(self._header, _INIT_AT)
        return InitParams(*rest) if valid == 1 else None

    def save_settings(self, memory_limit: int, accept_percent: int) -> None:
        _SETTINGS.pack_into(self._header, _SETTINGS_AT, 1, accept_percent, memory_limit)

    def load_settings(self) -> tuple[int, int] | None:
        """(memory_limit, accept_percent) last in force, or None if never saved."""
        valid, accept_percent, memory_limit = _SETTINGS.unpack_from(self._header, _SETTINGS_AT)
        return (int(memory_limit), int(accept_percent)) if valid == 1 else None

    def save_writeback_day(self, day: int, written: int) -> None:
        _WRITEBACK.pack_into(self._header, _WRITEBACK_AT, 1, 0, day, written)

    def load_writeback_day(self) -> tuple[int, int]:
        """(day, bytes written back that day), (0, 0) if never saved."""
        valid, _, day, written = _WRITEBACK.unpack_from(self._header, _WRITEBACK_AT)
        return (int(day), int(written)) if valid == 1 else (0, 0)

    def save_backing(self, ident: tuple[int, int, int]) -> None:
        _BACKING.pack_into(self._header, _BACKING_AT, 1, 0, *ident)

    def load_backing(self) -> tuple[int, int, int] | None:
        """(device, inode, size) of the backing file, or None if none was used."""
        valid, _, dev, ino, size = _BACKING.unpack_from(self._header, _BACKING_AT)
        return (int(dev), int(ino), int(size)) if valid == 1 else None

    def save_restarts(self, n: int) -> None:
        _RESTARTS.pack_into(self._header, _RESTARTS_AT, n)

    def save_counters(self, values: Mapping[str, int]) -> None:
        """Snapshot the counters COUNTER_SNAPSHOT names (one missing from
        ``values`` is saved as 0)."""
        vals = [values.get(name, 0) for name in COUNTER_SNAPSHOT]
        _COUNTERS.pack_into(self._header, _COUNTERS_AT, *vals, *[0] * (COUNTER_SLOTS - len(vals)))

    def load_counters(self) -> dict[str, int]:
        """The snapshot, by name: every name COUNTER_SNAPSHOT has."""
        return dict(zip(COUNTER_SNAPSHOT, _COUNTERS.unpack_from(self._header, _COUNTERS_AT), strict=False))


def read_restarts(meta_fd: int) -> int:
    """The worker count a state's header holds (State.save_restarts), read
    with pread: the supervisor calls it without attaching the state."""
    return _read_count(meta_fd, _RESTARTS_AT)


def read_backing(meta_fd: int) -> tuple[int, int, int] | None:
    """State.load_backing with pread: for the supervisor, which does not
    attach the state."""
    raw = os.pread(meta_fd, _BACKING.size, _BACKING_AT)
    if len(raw) != _BACKING.size:
        return None
    valid, _, dev, ino, size = _BACKING.unpack(raw)
    return (int(dev), int(ino), int(size)) if valid == 1 else None


def read_supervisor_restarts(meta_fd: int) -> int:
    return _read_count(meta_fd, _SUPERVISOR_RESTARTS_AT)


def write_supervisor_restarts(meta_fd: int, n: int) -> None:
    os.pwrite(meta_fd, _RESTARTS.pack(n), _SUPERVISOR_RESTARTS_AT)


def _read_count(meta_fd: int, at: int) -> int:
    raw = os.pread(meta_fd, _RESTARTS.size, at)
    return int(_RESTARTS.unpack(raw)[0]) if len(raw) == _RESTARTS.size else 0
