"""The page-table entry: one packed 64-bit word per device page, in the
state's "page" table (part of the state's persistent format: a change here
is a change of state.LAYOUT_VERSION).

  bits 0-1    kind: 0 empty (reads as zeros), 1 same-filled, 2 compressed,
              3 huge (a raw page); codec.py's KIND_* values
  bits 2-3    algorithm of a compressed page (codec.ALGORITHMS, whose order
              the state header records)
  bits 4-16   payload length in bytes
  bits 17-31  unused, 0
  bits 32-62  handle in the pool (of a same-filled page: the handle that
              holds its fill word and owns no frames); when bit 63 is set,
              the object's location in the backing file instead, in
              backing.OBJ_ALIGN (16-byte) units: 31 bits address 32 GiB
  bit 63      BACKED: the payload lives in the backing file (backing.py);
              kind, algorithm and length still describe it, so a read
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
HANDLE_SHIFT = 32
HANDLE_MASK = 0x7FFFFFFF
BACKED = 1 << 63
# Bits no entry uses: a rebuild that finds one set refuses the state.
UNUSED = 0x7FFF << 17


def kind(entry: int) -> int:
    return entry & KIND_MASK


def algo(entry: int) -> int:
    return entry >> ALGO_SHIFT & ALGO_MASK


def length(entry: int) -> int:
    return entry >> LEN_SHIFT & LEN_MASK


def handle(entry: int) -> int:
    return entry >> HANDLE_SHIFT & HANDLE_MASK


def backed(entry: int) -> bool:
    return bool(entry & BACKED)


def location(entry: int) -> int:
    """A backed entry's location in the backing file, in 16-byte units."""
    return entry >> HANDLE_SHIFT & HANDLE_MASK


def make(handle: int, kind: int, algo: int = 0, length: int = 0) -> int:
    return handle << HANDLE_SHIFT | length << LEN_SHIFT | algo << ALGO_SHIFT | kind


def make_backed(location: int, kind: int, algo: int, length: int) -> int:
    return BACKED | location << HANDLE_SHIFT | length << LEN_SHIFT | algo << ALGO_SHIFT | kind
