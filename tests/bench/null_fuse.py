"""The FUSE transport's own ceiling: our FUSE layer over a device that stores
nothing, behind a loop device, measured with dd at queue depth 1.

    python3 tests/bench/null_fuse.py [BLOCK_SIZE]     # root; default 128K

Prints median MB/s of 7 dd runs each way and the time per request; what a
real store adds on top is per-page work.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile

import trio

from zswapd.fuse import mount as fmount
from zswapd.fuse.protocol import FuseFS
from zswapd.fuse.session import serve

SIZE = 512 << 20
DATA = 100 << 20


class NullDevice:
    size = SIZE

    def readinto(self, offset: int, out: memoryview) -> int:
        return len(out)

    def write(self, offset: int, data: memoryview) -> int:
        return len(data)

    def discard(self, offset: int, length: int) -> int:
        return 0

    def zero_range(self, offset: int, length: int) -> int:
        return 0

    def free_bytes_estimate(self) -> int:
        return SIZE


def dd(args: list[str]) -> float:
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    return float(re.search(r"copied, ([\d.]+) s", out).group(1))  # type: ignore[union-attr]


def measure(mountpoint: str, bs: int, results: dict[str, float]) -> None:
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", f"{mountpoint}/swap"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        count = DATA // bs
        w = [dd(["if=/dev/zero", f"of={loop}", f"bs={bs}", f"count={count}", "oflag=direct"]) for _ in range(7)]
        r = [dd([f"if={loop}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"]) for _ in range(7)]
        results["write"], results["read"] = statistics.median(w), statistics.median(r)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def main() -> None:
    bs = int(sys.argv[1].rstrip("Kk")) * 1024 if len(sys.argv) > 1 else 128 * 1024
    mountpoint = tempfile.mkdtemp(prefix="zswapd-null-")
    fd = fmount.open_fuse()
    fmount.mount(fd, mountpoint)
    results: dict[str, float] = {}
    try:

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, fd, FuseFS(NullDevice()))
                # dd blocks, so it runs beside the trio loop that answers it.
                await trio.to_thread.run_sync(measure, mountpoint, bs, results)
                nursery.cancel_scope.cancel()

        trio.run(run)
    finally:
        fmount.unmount(mountpoint)
        os.close(fd)
        os.rmdir(mountpoint)
    for way in ("write", "read"):
        secs = results[way]
        print(f"{way}: {DATA / secs / 1e6:.0f} MB/s, {secs / (DATA // bs) * 1e6:.0f} us per {bs // 1024} KiB request")


if __name__ == "__main__":
    main()
