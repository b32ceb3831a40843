"""Memory limit: compaction before full, ENOSPC only when truly full,
background compaction, runtime limit changes.

Privilege: root (a real FUSE mount of the daemon).  Runs in CI.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from pathlib import Path

import pytest
from conftest import PUNCH, Daemon, fallocate, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.parametrize("engine", ["native", "python"])]

MIB = 1 << 20
LIMIT = 64 * MIB
THRESHOLD = 2 * MIB  # the background compaction test's waste_threshold


def page(seed: int, incompressible: int) -> bytes:
    """A page whose lz4 size is about ``incompressible`` bytes."""
    rnd = random.Random(seed)
    head = seed.to_bytes(8, "little") + rnd.randbytes(incompressible - 8)
    return head + b"\x5a" * (4096 - len(head))


def fill(d: Daemon, fd: int, until: float, sizes: tuple[int, int], seed0: int) -> dict[int, bytes]:
    """Write 1 MiB batches of pages until mem_used_total reaches ``until``."""
    written: dict[int, bytes] = {}
    idx = 0
    rnd = random.Random(seed0)
    while int(d.stats()["mem_used_total"]) < until:  # type: ignore[call-overload]
        batch = [page(seed0 + idx + k, rnd.randint(*sizes)) for k in range(256)]
        os.pwrite(fd, b"".join(batch), idx * 4096)
        for k, p in enumerate(batch):
            written[idx + k] = p
        idx += 256
    return written


def verify(fd: int, pages: dict[int, bytes]) -> None:
    for idx, p in pages.items():
        assert os.pread(fd, 4096, idx * 4096) == p, f"page {idx} differs"


def test_compaction_makes_room_before_full_then_enospc(tmp_path: Path, engine: str) -> None:
    with run_daemon(
        tmp_path,
        device={"size": "512M"},
        pool={"memory_limit": "64M", "engine": engine},
        compaction={"background": False},
    ) as d:
        fd = os.open(d.file, os.O_RDWR)
        try:
            # 1. fill to ~90% of the limit with pages compressing to 1.4-2.4 KB
            pages = fill(d, fd, 0.9 * LIMIT, (1400, 2400), 1_000_000)
            s0 = d.stats()
            # 2. punch a random half, spread out, so zspages are half empty
            rnd = random.Random(5)
            holes = set(rnd.sample(sorted(pages), len(pages) // 2))
            for idx in holes:
                fallocate(fd, PUNCH, idx * 4096, 4096)
                del pages[idx]
            s1 = d.stats()
            used, compr = int(s1["mem_used_total"]), int(s1["compr_data_size"])  # type: ignore[call-overload]
            print(
                f"filled {len(pages) + len(holes)} pages: used {s0['mem_used_total']}, after holes used {used} compr {compr}"
            )
            assert used > 0.8 * LIMIT  # the holes freed few whole zspages
            # 3. new pages of a different size range (200-700 B), totalling
            #    more than limit - used but less than limit - compr
            target = ((LIMIT - used) + (LIMIT - compr)) // 2
            base = max(pages) + 1000
            new: dict[int, bytes] = {}
            total = 0
            rnd = random.Random(9)
            while total < target:
                size = rnd.randint(200, 700)
                idx = base + len(new)
                new[idx] = page(2_000_000 + idx, size)
                total += size
            items = sorted(new.items())
            for i in range(0, len(items), 64):
                chunk = items[i : i + 64]
                os.pwrite(fd, b"".join(p for _, p in chunk), chunk[0][0] * 4096)  # 4. every write succeeds
            s2 = d.stats()
            print(
                f"wrote {len(new)} small pages ({total} B; room without compaction {LIMIT - used} B): "
                f"pages_compacted {s2['pages_compacted']}, compactions {s2['compactions']}"
            )
            assert total > LIMIT - used
            assert s2["failed_writes"] == 0
            assert int(s2["pages_compacted"]) > 0  # type: ignore[call-overload]
            assert int(s2["mem_used_total"]) <= LIMIT  # type: ignore[call-overload]
            pages.update(new)
            verify(fd, pages)
            # 5. keep writing until truly full: ENOSPC, counted, nothing lost
            idx = max(pages) + 1
            with pytest.raises(OSError) as e:
                while True:
                    p = page(3_000_000 + idx, 1800)
                    os.pwrite(fd, p, idx * 4096)
                    pages[idx] = p
                    idx += 1
            assert e.value.errno == 28  # ENOSPC
            s3 = d.stats()
            assert s3["failed_writes"] == 1 and s3["full"] is True and int(s3["limit_hits"]) >= 1  # type: ignore[call-overload]
            verify(fd, pages)
            # statfs reports what is left under the limit
            st = os.statvfs(d.mountpoint)
            assert st.f_bsize == 4096 and st.f_bfree * 4096 < 2 * MIB
        finally:
            os.close(fd)


def test_runtime_limit_change_compacts_and_never_drops(tmp_path: Path, engine: str) -> None:
    with run_daemon(tmp_path, pool={"memory_limit": 0, "engine": engine}, compaction={"background": False}) as d:
        fd = os.open(d.file, os.O_RDWR)
        try:
            pages = fill(d, fd, 16 * MIB, (1400, 2400), 7)
            for idx in sorted(pages)[::2]:
                fallocate(fd, PUNCH, idx * 4096, 4096)
                del pages[idx]
            s = d.stats()
            used, compr = int(s["mem_used_total"]), int(s["compr_data_size"])  # type: ignore[call-overload]
            mid = (used + compr) // 2 // 4096 * 4096
            r = d.call("set", key="memory_limit", value=mid)
            assert r["ok"] and r["met"], r
            assert int(d.stats()["mem_used_total"]) <= mid  # type: ignore[call-overload]
            r = d.call("set", key="memory_limit", value=compr // 2)
            assert r["ok"] and not r["met"] and "cannot" in r["warning"]  # type: ignore[operator]
            verify(fd, pages)
        finally:
            os.close(fd)


def test_background_compaction_with_concurrent_reader(tmp_path: Path, engine: str) -> None:
    with run_daemon(
        tmp_path,
        pool={"memory_limit": "128M", "engine": engine},
        compaction={"background": True, "interval": 0.1, "waste_threshold": THRESHOLD},
    ) as d:
        fd = os.open(d.file, os.O_RDWR)
        try:
            pages = fill(d, fd, 40 * MIB, (1400, 2400), 11)
            rnd = random.Random(3)
            stop = threading.Event()
            lat: list[float] = []
            keys = sorted(pages)

            def reader() -> None:
                r = random.Random(1)
                while not stop.is_set():
                    idx = r.choice(keys)
                    t = time.perf_counter()
                    os.pread(fd, 4096, idx * 4096)
                    lat.append(time.perf_counter() - t)

            t = threading.Thread(target=reader)
            t.start()
            holes = rnd.sample(keys, len(keys) // 2)
            for idx in holes:
                fallocate(fd, PUNCH, idx * 4096, 4096)
                del pages[idx]
            # What background compaction promises (Store.compaction_wanted):
            # once the device is quiet, the waste is at most the threshold or
            # nothing is freeable.  Wait for that; the deadline is a hang
            # guard, not a timing assertion.
            start = time.monotonic()
            while True:
                s = d.stats()
                used, compr = int(s["mem_used_total"]), int(s["compr_data_size"])  # type: ignore[call-overload]
                freeable = int(s["freeable_bytes"])  # type: ignore[call-overload]
                if used - compr <= THRESHOLD or freeable == 0 or time.monotonic() - start > 300:
                    break
                time.sleep(0.1)
            took = time.monotonic() - start
            stop.set()
            t.join()
            lat.sort()
            print(
                f"background compaction settled in {took:.1f}s: waste {used - compr} B, freeable {freeable} B, "
                f"used/compr {used / compr:.3f}, pages_compacted {s['pages_compacted']}, "
                f"step p99 {s['compaction_step_p99_us']} us; reader p50 {statistics.median(lat) * 1e6:.0f} us "
                f"p99 {lat[int(len(lat) * 0.99)] * 1e6:.0f} us over {len(lat)} reads"
            )
            assert used - compr <= THRESHOLD or freeable == 0, "compaction left more waste than it promises"
            assert int(s["pages_compacted"]) > 0  # type: ignore[call-overload]
            verify(fd, pages)
        finally:
            os.close(fd)
