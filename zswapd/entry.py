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
              holds its fill word and owns no frames)
  bit 63      unused, 0

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
# Bits no entry uses: a rebuild that finds one set refuses the state.
UNUSED = 1 << 63 | 0x7FFF << 17


def kind(entry: int) -> int:
    return entry & KIND_MASK


def algo(entry: int) -> int:
    return entry >> ALGO_SHIFT & ALGO_MASK


def length(entry: int) -> int:
    return entry >> LEN_SHIFT & LEN_MASK


def handle(entry: int) -> int:
    return entry >> HANDLE_SHIFT


def make(handle: int, kind: int, algo: int = 0, length: int = 0) -> int:
    return handle << HANDLE_SHIFT | length << LEN_SHIFT | algo << ALGO_SHIFT | kind
