"""The tail of 4 KiB random-read latency through the loop device, by target.

`zswapd bench device` reports p50 and p99; a tail at a fixed latency (a
spin that holds a CPU, a wakeup that lands behind it) shows up first at
p99.5 and p99.9, so this prints those too.  Each target is a 128 MiB device
filled with half-compressible pages, read by fio (psync, O_DIRECT, queue
depth 1) for 5 s; the targets alternate within each round.

    python3 tests/bench/latency_tail.py tmpfs,t1,t2 [ROUNDS]   # root, fio; default 2

``tmpfs`` is a loop device over a tmpfs file (the loop layer's own floor);
``tN`` is zswapd (the checkout on PYTHONPATH, or the installed one) with
``[fuse] threads = N``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile

from zswapd.bench import Target, TmpfsLoopTarget, ZswapdTarget, private_dir

SIZE = 128 << 20
PERCENTILES = "50:90:99:99.5:99.9"


def fill(dev: str) -> None:
    rnd = random.Random(1)
    # 64 distinct pages, each a random 64-byte pattern repeated: lz4 takes
    # them to about a quarter, like typical anonymous memory.
    pages = [bytes(rnd.randrange(256) for _ in range(64)) * 64 for _ in range(64)]
    buf = b"".join(pages[i % 64] for i in range(256))
    fd = os.open(dev, os.O_WRONLY)
    try:
        for off in range(0, SIZE, len(buf)):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def fio(dev: str, seconds: int = 5) -> list[float]:
    out = subprocess.run(
        ["fio", "--name=lat", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
         f"--size={SIZE}", f"--runtime={seconds}", "--time_based", "--output-format=json",
         f"--percentile_list={PERCENTILES}"],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return [round(pct[k] / 1000, 1) for k in sorted(pct, key=float)] + [int(job["iops"])]


def main() -> None:
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["tmpfs", "t1", "t2"]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    print(f"target: p{PERCENTILES.replace(':', ' p')} (us), iops")
    with tempfile.TemporaryDirectory() as wd, private_dir() as priv:
        for r in range(rounds):
            for kind in kinds:
                sub = os.path.join(wd, f"{kind}-{r}")
                os.makedirs(sub)
                t: Target
                if kind == "tmpfs":
                    t = TmpfsLoopTarget(SIZE, priv)
                else:
                    t = ZswapdTarget(SIZE, "lz4", sub, fuse_threads=int(kind[1:]))
                try:
                    fill(t.path)
                    print(kind, fio(t.path), flush=True)
                finally:
                    t.close()


if __name__ == "__main__":
    main()
