"""A program for the writeback tests: fill N MiB with compressible pages
(pressure_worker's), verify them, then free every other 64 KiB (the kernel
frees their swap slots: discards, dead bytes in the backing file), rewrite
a quarter of what is left with new contents, and verify R rounds.  Run in
a small memory cgroup so the pages go to swap.  Exit 0 if every byte
verified, 3 on corruption."""

import mmap
import sys

from pressure_worker import corpus, page

CHUNK = 16  # pages: 64 KiB


def expected(c: bytes, i: int, freed: bool, gen: int) -> bytes:
    if freed:
        return bytes(4096)
    return page(c, i + gen * 10_000_000)


def main() -> int:
    mib, rounds = int(sys.argv[1]), int(sys.argv[2])
    c = corpus()
    n = mib * 256
    # Private: MADV_DONTNEED then frees the pages (and their swap slots) and
    # they read as zeros; a shared mapping would keep them.
    buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        buf[i * 4096 : (i + 1) * 4096] = page(c, i)
    print("filled", flush=True)

    def verify(r: int, freed: set[int], gen: dict[int, int]) -> bool:
        bad = 0
        for i in range(n):
            ch = i // CHUNK
            if buf[i * 4096 : (i + 1) * 4096] != expected(c, i, ch in freed, gen.get(ch, 0)):
                bad += 1
        print(f"round {r}: {bad} bad pages of {n}", flush=True)
        return bad == 0

    if not verify(0, set(), {}):
        return 3
    freed = set(range(0, n // CHUNK, 2))
    for ch in freed:
        buf.madvise(mmap.MADV_DONTNEED, ch * CHUNK * 4096, CHUNK * 4096)
    print("freed", flush=True)
    gen = {ch: 1 for ch in range(1, n // CHUNK, 8)}
    for ch in gen:
        for i in range(ch * CHUNK, (ch + 1) * CHUNK):
            buf[i * 4096 : (i + 1) * 4096] = page(c, i + 10_000_000)
    print("rewritten", flush=True)
    for r in range(1, rounds + 1):
        if not verify(r, freed, gen):
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
