"""`zswapd bench` works end to end on a small corpus.  No timing is asserted.

Privilege: root (loop devices, zram, a FUSE mount).  Runs in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zswapd.bench import _describe, sample_pages


def test_bench_pool_prints_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zswapd", "bench", "pool", "--pages", "500", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    r = json.loads(out)
    assert {"lz4_store_MBps", "raw_lz4_compress_MBps", "store_vs_raw_lz4_compress", "lz4_metadata_B_per_page"} <= set(r)


def test_corpus_description_counts_same_filled(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    path.write_bytes(bytes(4096) * 3 + b"\x07" * 4096 + b"".join(sample_pages(4)))
    c = _describe(str(path))
    assert (c.pages, c.zero_pages, c.same_pages) == (8, 3, 4)


@pytest.mark.root
def test_bench_device_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "zswapd", "bench", "device", "--corpus-size", "8M", "--repeat", "1",
         "--latency-seconds", "1", "--json", "--algorithms", "lz4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["corpus"]["pages"] >= 1024
    for target in ("tmpfs-loop", "zswapd-lz4"):
        assert res[target]["verified"] == 1.0, target  # every byte read back equal
    z = res["zswapd-lz4"]
    assert z["ratio"] > 1 and 0 < z["frag_after_compact"] <= 1 and z["metadata_B_per_page"] > 0
    if "zram-lz4" in res:
        assert res["zram-lz4"]["verified"] == 1.0
        assert "zswapd-lz4/zram-lz4 ratio" in res["ratios"]
    # nothing left behind
    assert "zswapd" not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert Path("/sys/block/zram0/disksize").read_text().strip() == "0"
