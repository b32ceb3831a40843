"""Page codecs: lz4 block, zstd, same-filled detection and the raw fallback.

Glossary: a *page* is 4096 bytes of the device; it is encoded as one of
  same-filled  every 8-byte word equal; kept as the fill word, no pool memory;
  compressed   an lz4 block (no size prefix) or a zstd frame, stored as an
               object in the pool;
  huge         compression did not get below the pool's huge threshold, so the
               raw page is stored (as zram does), avoiding a decompression.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import lz4.block
import zstandard

PAGE_SIZE = 4096

KIND_SAME = 1
KIND_COMPRESSED = 2
KIND_HUGE = 3

ALGORITHMS = ("lz4", "zstd")
ALGO_LZ4 = 0
ALGO_ZSTD = 1

Buffer = bytes | bytearray | memoryview


_ZERO = bytes(PAGE_SIZE)


def fill_word(page: Buffer) -> int | None:
    """The repeated 8-byte word if ``page`` is same-filled, else None."""
    # Compare as bytes: comparing a memoryview with bytes goes element by
    # element and costs 50 times more than the copy.
    data = page if isinstance(page, bytes) else bytes(page)
    if data == _ZERO:
        return 0
    head = data[:8]
    if data[-8:] != head or data != head * (PAGE_SIZE // 8):
        return None
    return int.from_bytes(head, "little")


def is_huge(compressed_len: int, huge_threshold: int) -> bool:
    """The huge rule, written once: a page that compresses to ``huge_threshold``
    bytes or more is stored raw (a whole frame, no decompression on read).
    The store passes the pool's threshold (pool.HUGE_THRESHOLD)."""
    return compressed_len >= huge_threshold


def fill_page(word: int) -> bytes:
    return word.to_bytes(8, "little") * (PAGE_SIZE // 8)


class Codec:
    """Compresses with one configured algorithm; decompresses any of them,
    because pages written before a runtime algorithm change stay readable."""

    def __init__(self, algorithm: str = "lz4", zstd_level: int = 1) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self.algo_id = ALGORITHMS.index(algorithm)
        self.zstd_level = zstd_level
        self._zc = zstandard.ZstdCompressor(
            level=zstd_level, write_content_size=False, write_checksum=False, write_dict_id=False
        )
        self._zd = zstandard.ZstdDecompressor()
        compress: Callable[[Buffer], bytes]
        if self.algo_id == ALGO_LZ4:
            compress = functools.partial(lz4.block.compress, store_size=False)
        else:
            compress = self._zc.compress
        self.compress = compress

    def encode(self, page: Buffer, huge_threshold: int) -> tuple[int, int, Buffer | int]:
        """(kind, algorithm id, payload); the payload of a same-filled page is
        its fill word."""
        # Same-filled pages repeat with period 8; two byte probes reject
        # nearly every other page before the full comparison.
        if page[0] == page[8] and page[-1] == page[-9]:
            word = fill_word(page)
            if word is not None:
                return KIND_SAME, 0, word
        data = self.compress(page)
        if is_huge(len(data), huge_threshold):
            return KIND_HUGE, 0, page
        return KIND_COMPRESSED, self.algo_id, data

    def decompress(self, algo_id: int, data: Buffer) -> bytes:
        if algo_id == ALGO_LZ4:
            out: bytes = lz4.block.decompress(data, uncompressed_size=PAGE_SIZE)
        else:
            out = self._zd.decompress(data, max_output_size=PAGE_SIZE)
        if len(out) != PAGE_SIZE:
            raise ValueError(f"corrupt object: decompressed to {len(out)} bytes")
        return out
