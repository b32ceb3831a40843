"""The page-table entry: one packed 64-bit word per device page, in the
state's "page" table (part of the state's persistent format: a change here
is a change of state.LAYOUT_VERSION).

  bits 0-1    kind: 0 empty (reads as zeros), 1 same-filled, 2 compressed,
              3 huge (a raw page); codec.py's KIND_* values
  bits 2-3    algorithm of a compressed page (codec.ALGORITHMS, whose order
              the state header records)
  bits 4-16   payload length in bytes
  bits 17-19  tier: 0 the object is as a write stored it; 1..6 recompressed
              with zstd and the dictionary in that slot of the state (the
              dictionary table, state.py); 7 recompressed with zstd and no
              dictionary.  Only a compressed zstd object has a tier > 0.
  bit  20     tried: a recompression pass looked at this object and kept it
              (it did not save enough); not a candidate again until the page
              is rewritten
  bits 21-31  idle stamp: the page's last access (write or read) in coarse
              ticks (IDLE_TICK seconds of CLOCK_MONOTONIC, which is the
              machine's, so a worker that takes over reads the same clock),
              modulo 2048.  Ages are (now - stamp) mod 2048; the recompression
              scan clamps a page older than IDLE_CLAMP ticks to exactly that
              age, so a page idle for days does not wrap to look fresh as
              long as a scan runs once per IDLE_CLAMP ticks (17 hours).
  bits 32-62  handle in the pool (of a same-filled page: the handle that
              holds its fill word and owns no frames); when bit 63 is set,
              the object's location in the backing file instead, in
              backing.OBJ_ALIGN (16-byte) units: 31 bits address 32 GiB
  bit 63      BACKED: the payload lives in the backing file (backing.py);
              kind, algorithm, length and tier still describe it, so a read
              decompresses it exactly as it would from the pool

The C engine writes the same layout in zswapd/engine/engine.h, with an
accessor per field; engine.py checks at import that the two agree.
"""

from __future__ import annotations

KIND_MASK = 0x3
ALGO_SHIFT = 2
ALGO_MASK = 0x3
LEN_SHIFT = 4
LEN_MASK = 0x1FFF
TIER_SHIFT = 17
TIER_MASK = 0x7
# Tier values: dictionary slots 1..DICT_SLOTS, then the plain recompression.
DICT_SLOTS = 6
TIER_PLAIN = 7
TRIED = 1 << 20
IDLE_SHIFT = 21
IDLE_MASK = 0x7FF
# One idle tick, in seconds: fine enough for idle ages of minutes (zram's
# users pick 1-6 hours), coarse enough that 11 bits span 34 hours.
IDLE_TICK = 60
# Ages saturate here (half the stamp's range, 17 hours): the scan that sees
# an older page restamps it to this age, so it never wraps.
IDLE_CLAMP = 1024
HANDLE_SHIFT = 32
HANDLE_MASK = 0x7FFFFFFF
BACKED = 1 << 63
# Bits no entry uses: a rebuild that finds one set refuses the state.
UNUSED = 0
# The fields a page's contents depend on: an entry whose other bits (the
# idle stamp, tried) changed still names the same object.
CONTENT_MASK = ~(TRIED | IDLE_MASK << IDLE_SHIFT) & (1 << 64) - 1


def kind(entry: int) -> int:
    return entry & KIND_MASK


def algo(entry: int) -> int:
    return entry >> ALGO_SHIFT & ALGO_MASK


def length(entry: int) -> int:
    return entry >> LEN_SHIFT & LEN_MASK


def tier(entry: int) -> int:
    return entry >> TIER_SHIFT & TIER_MASK


def tried(entry: int) -> bool:
    return bool(entry & TRIED)


def idle(entry: int) -> int:
    return entry >> IDLE_SHIFT & IDLE_MASK


def handle(entry: int) -> int:
    return entry >> HANDLE_SHIFT & HANDLE_MASK


def backed(entry: int) -> bool:
    return bool(entry & BACKED)


def location(entry: int) -> int:
    """A backed entry's location in the backing file, in 16-byte units."""
    return entry >> HANDLE_SHIFT & HANDLE_MASK


def with_idle(entry: int, tick: int) -> int:
    return entry & ~(IDLE_MASK << IDLE_SHIFT) | (tick & IDLE_MASK) << IDLE_SHIFT


def age(entry: int, now: int) -> int:
    """Ticks since the page's last access, modulo the stamp's range."""
    return (now - idle(entry)) & IDLE_MASK


def tick_of(seconds: float) -> int:
    """The idle stamp of a CLOCK_MONOTONIC time."""
    return int(seconds // IDLE_TICK) & IDLE_MASK


def make(handle: int, kind: int, algo: int = 0, length: int = 0, tier: int = 0, stamp: int = 0) -> int:
    return (
        handle << HANDLE_SHIFT
        | (stamp & IDLE_MASK) << IDLE_SHIFT
        | tier << TIER_SHIFT
        | length << LEN_SHIFT
        | algo << ALGO_SHIFT
        | kind
    )


def make_backed(location: int, kind: int, algo: int, length: int, tier: int = 0, stamp: int = 0) -> int:
    return BACKED | make(location, kind, algo, length, tier, stamp)
