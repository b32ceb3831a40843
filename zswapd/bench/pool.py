"""``zswapd bench pool``: store and load through the store (codec + pool +
page table) against bare ``lz4.block`` on the same synthetic pages, in this
process, median of 5 runs.  Also the synthetic pages themselves
(``sample_pages``) and the median-rate timer other benchmarks use.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import lz4.block

from ..codec import Codec
from ..store import Store
from .corpus import PAGE


def sample_pages(n: int) -> list[bytes]:
    """Compressible, varied, non-zero pages (text-like records with numbers)."""
    words = [b"swap", b"page", b"kernel", b"memory", b"zsmalloc", b"handle", b"frame", b"object", b"\x00\x01", b"\xff"]
    pages = []
    x = 1
    for i in range(n):
        out = bytearray(i.to_bytes(8, "little"))
        while len(out) < PAGE:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out += words[x % len(words)] + str(x % 100000).encode() + b" "
        pages.append(bytes(out[:PAGE]))
    return pages


def median_rate(fn: Callable[[], object], nbytes: int, repeat: int = 5) -> float:
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
    return statistics.median(rates)


def bench_pool(npages: int = 20000, as_json: bool = False, engine: str = "auto") -> int:
    pages = sample_pages(npages)
    nbytes = npages * PAGE
    results: dict[str, float] = {}
    served_by = ""
    for algo in ("lz4", "zstd"):
        store = Store(npages * PAGE, Codec(algo), engine=engine)
        served_by = str(store.stats()["engine"])

        def store_all(store: Store = store) -> None:
            for i, p in enumerate(pages):
                store.write(i * PAGE, p)

        def load_all(store: Store = store) -> None:
            for i in range(npages):
                store.read(i * PAGE, PAGE)

        results[f"{algo}_store_MBps"] = median_rate(store_all, nbytes)
        results[f"{algo}_load_MBps"] = median_rate(load_all, nbytes)
        s = store.stats()
        results[f"{algo}_ratio"] = s["orig_data_size"] / s["mem_used_total"]  # type: ignore[operator]
        results[f"{algo}_metadata_B_per_page"] = s["metadata_bytes"] / npages  # type: ignore[operator]
    comp = [lz4.block.compress(p, store_size=False) for p in pages]
    results["raw_lz4_compress_MBps"] = median_rate(
        lambda: [lz4.block.compress(p, store_size=False) for p in pages], nbytes
    )
    results["raw_lz4_decompress_MBps"] = median_rate(
        lambda: [lz4.block.decompress(c, uncompressed_size=PAGE) for c in comp], nbytes
    )
    results["store_vs_raw_lz4_compress"] = results["lz4_store_MBps"] / results["raw_lz4_compress_MBps"]
    results["load_vs_raw_lz4_decompress"] = results["lz4_load_MBps"] / results["raw_lz4_decompress_MBps"]
    if as_json:
        print(json.dumps({"engine": served_by, **results}, indent=2))
    else:
        print(f"pool benchmark: {npages} pages of 4 KiB, median of 5 runs, {served_by} engine")
        for k, v in results.items():
            print(f"  {k:32} {v:10.2f}")
    return 0
