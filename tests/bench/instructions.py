"""Instructions per 4 KiB page for the write and read paths, under callgrind.

Deterministic where wall-clock time on a shared VM is not.  Feeds 8 MiB of a
corpus of raw pages through FuseFS.handle in 128 KiB requests; the count per
page is (run with 2 passes - run with 0 passes) / pages, so setup cancels.

    python3 tests/bench/instructions.py CORPUS      # needs valgrind

Runs each engine in turn (python, then native when it is built).

A corpus can be made with zswapd.bench.capture_corpus (what `zswapd bench`
captures), or be any file of raw pages.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys

CHUNK = 128 * 1024
SIZE = 8 << 20


def run_passes(corpus: str, mode: str, passes: int, engine: str) -> None:
    from zswapd.fuse import protocol as p
    from zswapd.store import Store

    data = open(corpus, "rb").read()[:SIZE]
    fs = p.FuseFS(Store(len(data), engine=engine))
    fs.handle(p.pack_request(p.INIT, 1, 0, struct.pack("<IIII", 7, 45, 131072, 0xFFFFFFFF) + bytes(48)))
    head = struct.Struct("<QQIIQII")
    writes = [
        p.pack_request(p.WRITE, 2, p.FILE_ID, head.pack(1, off, CHUNK, 0, 0, 0, 0) + data[off : off + CHUNK])
        for off in range(0, len(data), CHUNK)
    ]
    reads = [
        p.pack_request(p.READ, 3, p.FILE_ID, head.pack(1, off, CHUNK, 0, 0, 0, 0)) for off in range(0, len(data), CHUNK)
    ]
    for req in writes:
        fs.handle(req)
    for _ in range(passes):
        for req in writes if mode == "write" else reads:
            fs.handle(req)


def count(corpus: str, mode: str, passes: int, engine: str) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--passes", corpus, mode, str(passes), engine],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    return int(re.search(r"Collected : (\d+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    if sys.argv[1] == "--passes":
        run_passes(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    from zswapd.engine import native_error

    corpus = sys.argv[1]
    pages = min(SIZE, len(open(corpus, "rb").read())) // 4096
    for engine in ("python", "native"):
        if engine == "native" and native_error():
            print(f"native: not built ({native_error()})")
            continue
        for mode in ("write", "read"):
            per_page = (count(corpus, mode, 2, engine) - count(corpus, mode, 0, engine)) / (2 * pages)
            print(f"{engine} {mode}: {per_page:,.0f} instructions per page")


if __name__ == "__main__":
    main()
