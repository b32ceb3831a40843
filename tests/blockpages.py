"""Pages written to a file and read back byte for byte, with nothing kept
between the two but the arguments: each page is made again from its
number and the seed.

    python tests/blockpages.py write|check FILE FIRST COUNT SEED

Pages FIRST..FIRST+COUNT-1 (4 KiB each) of FILE: the page's number, then
900-2400 random bytes, then zeros (compressible, as a process's memory is,
and each one different).  `check` prints how many differ and exits 3 if any
does, 0 if none.  The standard library only: tests/test_systemd.py runs it
inside a container.
"""

from __future__ import annotations

import os
import random
import sys

PAGE = 4096
BATCH = 64  # pages per pwrite/pread: 256 KiB


def page(i: int, seed: int) -> bytes:
    rnd = random.Random(seed * 1_000_003 + i)
    n = rnd.randrange(900, 2400)
    return i.to_bytes(8, "little") + rnd.randbytes(n) + bytes(PAGE - 8 - n)


def main() -> int:
    mode, path, first, count, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    fd = os.open(path, os.O_RDWR if mode == "write" else os.O_RDONLY)
    bad: list[int] = []
    try:
        for at in range(first, first + count, BATCH):
            n = min(BATCH, first + count - at)
            want = b"".join(page(i, seed) for i in range(at, at + n))
            if mode == "write":
                if os.pwrite(fd, want, at * PAGE) != len(want):
                    raise OSError(f"short write at page {at}")
                continue
            got = os.pread(fd, len(want), at * PAGE)
            bad += [at + k for k in range(n) if got[k * PAGE : (k + 1) * PAGE] != want[k * PAGE : (k + 1) * PAGE]]
    finally:
        os.close(fd)
    if mode == "write":
        print(f"wrote {count} pages")
        return 0
    print(f"checked {count} pages: {len(bad)} bad" + (f", the first {bad[:8]}" if bad else ""))
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
