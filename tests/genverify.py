"""A block-device verifier that catches lost writes.

    python tests/genverify.py DEVICE SECONDS [THREADS [BLOCKS]]

Each thread owns a disjoint region of DEVICE (of its first BLOCKS blocks,
if given: the rest is left alone, for another checker) and, with O_DIRECT, writes
random runs of 4 KiB to 512 KiB, discards random runs (BLKDISCARD), and reads
random runs back.  Every 4 KiB block it writes carries its block number and a
generation number that grows with every write of that block, so a block that
reads back stale (an earlier pass's data, which a checksum alone would
accept, as fio's crc32c verify does) or zero where data was written is caught.
A discarded block must read as zeros.  At the end every block is read back.

Prints one summary line and exits 0 if every block matched, 3 otherwise.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import struct
import sys
import threading
import time

BLOCK = 4096
MAX_RUN = 128  # blocks: 512 KiB
BLKDISCARD = 0x1277
BLKGETSIZE64 = 0x80081272
HEAD = struct.Struct("<8sQQQ")  # magic, block, generation, thread
MAGIC = b"GENVRFY1"


def block_bytes(block: int, gen: int, tid: int) -> bytes:
    head = HEAD.pack(MAGIC, block, gen, tid)
    # Compressible but block-specific filler, so the store compresses it.
    fill = (b"%016x" % (block * 1000003 + gen)) * ((BLOCK - HEAD.size) // 16 + 1)
    return (head + fill)[:BLOCK]


class Region(threading.Thread):
    def __init__(self, fd: int, tid: int, first: int, count: int, until: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.tid, self.first, self.count, self.until = fd, tid, first, count, until
        self.rng = random.Random(seed)
        self.gen = [0] * count  # 0: never written or discarded (reads as zeros)
        self.next_gen = 1
        self.buf = mmap.mmap(-1, MAX_RUN * BLOCK)  # page aligned, as O_DIRECT needs
        self.writes = self.discards = self.reads = self.bad = 0
        self.errors: list[str] = []

    def check(self, start: int, n: int) -> None:
        view = memoryview(self.buf)[: n * BLOCK]
        got = os.preadv(self.fd, [view], (self.first + start) * BLOCK)
        if got != n * BLOCK:
            self.fail(f"short read {got} at block {self.first + start}")
            return
        for i in range(n):
            b = self.first + start + i
            want_gen = self.gen[start + i]
            data = view[i * BLOCK : (i + 1) * BLOCK]
            if want_gen == 0:
                ok = data == bytes(BLOCK)
            else:
                ok = data == block_bytes(b, want_gen, self.tid)
            if not ok:
                magic, blk, gen, tid = HEAD.unpack_from(data, 0)
                found = f"block {blk} gen {gen}" if magic == MAGIC else "no tag"
                self.fail(f"block {b}: expected gen {want_gen}, found {found}")
        self.reads += n

    def fail(self, msg: str) -> None:
        self.bad += 1
        if len(self.errors) < 20:
            self.errors.append(msg)

    def run(self) -> None:
        try:
            while time.monotonic() < self.until:
                n = self.rng.randint(1, MAX_RUN)
                start = self.rng.randrange(0, self.count - n + 1)
                op = self.rng.random()
                if op < 0.6:
                    for i in range(n):
                        g = self.next_gen
                        self.next_gen += 1
                        self.buf[i * BLOCK : (i + 1) * BLOCK] = block_bytes(self.first + start + i, g, self.tid)
                        self.gen[start + i] = g
                    done = os.pwritev(self.fd, [memoryview(self.buf)[: n * BLOCK]], (self.first + start) * BLOCK)
                    if done != n * BLOCK:
                        self.fail(f"short write {done} at block {self.first + start}")
                    self.writes += n
                elif op < 0.75:
                    rng = struct.pack("QQ", (self.first + start) * BLOCK, n * BLOCK)
                    fcntl.ioctl(self.fd, BLKDISCARD, rng)
                    for i in range(n):
                        self.gen[start + i] = 0
                    self.discards += n
                else:
                    self.check(start, n)
            for start in range(0, self.count, MAX_RUN):
                self.check(start, min(MAX_RUN, self.count - start))
        except OSError as e:
            self.fail(f"I/O error: {e}")


def main() -> int:
    device, seconds = sys.argv[1], float(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    blocks = size // BLOCK
    if len(sys.argv) > 4:
        blocks = min(blocks, int(sys.argv[4]))
    per = blocks // threads
    # Start from a known state: every block discarded (zeros).
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 0, per * threads * BLOCK))
    until = time.monotonic() + seconds
    regions = [Region(fd, t, t * per, per, until, seed=1000 + t) for t in range(threads)]
    print("started", flush=True)
    for r in regions:
        r.start()
    for r in regions:
        r.join()
    bad = sum(r.bad for r in regions)
    print(
        f"writes {sum(r.writes for r in regions)} discards {sum(r.discards for r in regions)} "
        f"reads {sum(r.reads for r in regions)} bad {bad}",
        flush=True,
    )
    for r in regions:
        for e in r.errors:
            print(f"  thread {r.tid}: {e}")
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
