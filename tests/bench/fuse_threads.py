"""FUSE-file throughput against the number of native FUSE threads.

Mounts zswapd's FUSE layer (FuseFS over a native-engine Store) served by
FuseThreads with 1, 2 and 4 C threads, and runs fio on the file itself (no
loop device): 4 jobs of 128 KiB O_DIRECT psync writes, then reads, over
disjoint 64 MiB regions, with half-compressible buffers refilled per write.
The thread counts are alternated over ROUNDS rounds; medians are printed.

    python3 tests/bench/fuse_threads.py [ROUNDS]      # root, fio; default 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from zswapd.fuse import mount as fmount
from zswapd.fuse.protocol import FuseFS
from zswapd.fuse.threads import FuseThreads
from zswapd.store import Store

JOBS = 4
REGION = 64 << 20


def fio(path: str, rw: str) -> float:
    out = subprocess.run(
        ["fio", "--name=t", f"--filename={path}", f"--rw={rw}", "--bs=128k", "--direct=1", "--ioengine=psync",
         f"--numjobs={JOBS}", f"--size={REGION}", f"--offset_increment={REGION}", "--group_reporting",
         "--buffer_compress_percentage=50", "--refill_buffers", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(out.stdout)["jobs"][0]
    side = job["write" if rw == "write" else "read"]
    return float(side["bw_bytes"]) / 1e6


def one(threads: int) -> tuple[float, float]:
    store = Store(JOBS * REGION, engine="native")
    fs = FuseFS(store)
    fd = fmount.open_fuse()
    server = None
    clones: list[int] = []
    with tempfile.TemporaryDirectory() as mp:
        mounted = False
        try:
            fmount.mount(fd, mp)
            mounted = True
            clones = [fmount.clone_fuse(fd) for _ in range(threads)]  # as the supervisor makes them
            server = FuseThreads(fd, fs, store.engine, threads=threads, clones=clones)
            path = os.path.join(mp, "swap")
            return fio(path, "write"), fio(path, "read")
        finally:
            if mounted:
                fmount.unmount(mp)
            if server is not None:
                server.stop()
            for c in clones:
                os.close(c)
            os.close(fd)
            store.close()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    res: dict[int, list[tuple[float, float]]] = {1: [], 2: [], 4: []}
    for r in range(rounds):
        order = [1, 2, 4] if r % 2 == 0 else [4, 2, 1]
        for n in order:
            res[n].append(one(n))
    print(f"{JOBS} fio jobs, 128 KiB O_DIRECT psync, {rounds} rounds, {os.cpu_count()} CPUs")
    for n, runs in res.items():
        w = statistics.median(x[0] for x in runs)
        rd = statistics.median(x[1] for x in runs)
        print(f"{n} thread(s): write {w:7.0f} MB/s  read {rd:7.0f} MB/s")


if __name__ == "__main__":
    main()
