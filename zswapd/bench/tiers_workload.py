"""The LRU-inversion workload of ``zswapd bench tiers``, run by the bench as
a program of its own inside a memory cgroup: it touches a large cold set
once, then cycles over a hot set, and says on stdout what it did.

Standard library only, run by path with ``python -I``, so that its own
memory in the cgroup is the interpreter's and its two sets, nothing of
zswapd's imports.

Page ``k`` (cold pages first, then hot ones) is page ``k mod N`` of the
pages file (real process memory, bench/corpus.py; mapped read-only and
shared, so it is charged to the bench, not to this cgroup) with its first
16 bytes replaced by a tag: ``k`` and a generation, both 64-bit.  Each
visit of a hot page checks the tag and raises the generation (so every
visit dirties the page: each eviction is a real write to swap, as a
program that works on its data would make).  After the hot phase the
program waits for a line on stdin (the bench samples the tiers while every
page is still where the kernel put it), then compares every page, all 4096
bytes, with what it wrote.

Protocol (one line each): ``filled COLD_S HOT_S``; ``cycle I SECONDS``
per cycle; ``hot SECONDS BAD`` (BAD: tags found wrong during the hot
phase); then, after any line on stdin, ``verified PAGES BAD``.
Usage: tiers_workload.py PAGES_FILE COLD_PAGES HOT_PAGES CYCLES SEED
"""

from __future__ import annotations

import mmap
import random
import struct
import sys
import time

PAGE = 4096
TAG = struct.Struct("<QQ")
GEN = struct.Struct("<Q")


def main(argv: list[str]) -> int:
    path = argv[0]
    cold_pages, hot_pages, cycles, seed = (int(a) for a in argv[1:5])
    with open(path, "rb") as f:
        corpus = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    n = len(corpus) // PAGE
    cold = mmap.mmap(-1, cold_pages * PAGE)
    hot = mmap.mmap(-1, hot_pages * PAGE)

    def fill(m: mmap.mmap, first: int, count: int) -> float:
        t = time.perf_counter()
        for i in range(count):
            off, src = i * PAGE, (first + i) % n * PAGE
            m[off : off + PAGE] = corpus[src : src + PAGE]
            TAG.pack_into(m, off, first + i, 0)
        return time.perf_counter() - t

    cold_s = fill(cold, 0, cold_pages)
    hot_s = fill(hot, cold_pages, hot_pages)
    print(f"filled {cold_s:.3f} {hot_s:.3f}", flush=True)

    order = list(range(hot_pages))
    random.Random(seed).shuffle(order)
    bad = 0
    t0 = time.perf_counter()
    for cycle in range(cycles):
        t = time.perf_counter()
        for i in order:
            off = i * PAGE
            k, gen = TAG.unpack_from(hot, off)
            if k != cold_pages + i or gen != cycle:
                bad += 1
            GEN.pack_into(hot, off + 8, cycle + 1)
        print(f"cycle {cycle} {time.perf_counter() - t:.3f}", flush=True)
    print(f"hot {time.perf_counter() - t0:.3f} {bad}", flush=True)

    sys.stdin.readline()
    bad = 0
    for m, first, count, gen in ((cold, 0, cold_pages, 0), (hot, cold_pages, hot_pages, cycles)):
        for i in range(count):
            off, src = i * PAGE, (first + i) % n * PAGE
            if TAG.unpack_from(m, off) != (first + i, gen) or m[off + 16 : off + PAGE] != corpus[src + 16 : src + PAGE]:
                bad += 1
    print(f"verified {cold_pages + hot_pages} {bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
