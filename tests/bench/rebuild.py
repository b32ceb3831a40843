"""Takeover cost: attach + rebuild + check_invariants per stored page, for each engine.

A new worker attaches the state, rebuilds the volatile indexes and checks the
invariants before it serves; meanwhile every swap-in on the machine waits.
This fills a store with PAGES pages (varied text pages, about 3 KiB each compressed,
with 5% same-filled and 3% incompressible ones, then a fifth discarded so
zspages are partly used), then times, in a fresh process per run as a real
takeover is, ``State.attach`` and ``Store(state=...)`` (which runs rebuild
and check_invariants), and then rebuild and check once more each, warm.

    python3 tests/bench/rebuild.py [PAGES] [REPEAT]     # default 100000 5

Prints one line per engine: medians in ms and ns per stored page.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

PAGE = 4096

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from zswapd.codec import Codec
from zswapd.state import State
from zswapd.store import Store
size, meta, arena, engine = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t1 = time.perf_counter()
state = State.attach((meta, arena))
t2 = time.perf_counter()
store = Store(size, Codec("lz4"), state=state, engine=engine)
t3 = time.perf_counter()
store.rebuild()
t4 = time.perf_counter()
store.check_invariants()
t5 = time.perf_counter()
assert store.stats()["engine"] == engine
print(json.dumps({"attach": t2 - t1, "takeover": t3 - t1, "rebuild": t4 - t3, "check": t5 - t4,
                  "stored": store.c.pages_stored}))
"""


def fill(pages: int) -> object:
    from zswapd.bench import sample_pages
    from zswapd.codec import Codec
    from zswapd.store import Store

    npages = pages + pages // 4 + 64
    store = Store(npages * PAGE, Codec("lz4"), engine="auto")
    base = sample_pages(4096)
    rnd = bytearray(os.urandom(PAGE))
    written = 0
    idx = 0
    while written < pages + pages // 5:
        pick = written % 100
        if pick < 5:
            data = bytes([written % 251]) * PAGE
        elif pick < 8:
            rnd[:8] = written.to_bytes(8, "little")
            data = bytes(rnd)
        else:
            data = written.to_bytes(8, "little") + base[written % len(base)][8:]
        store.write(idx * PAGE, data)
        idx += 1
        written += 1
    # discard every fifth page: partly used zspages, free slots to rethread
    for i in range(0, idx, 5):
        store.discard(i * PAGE, PAGE)
    return store


def main() -> None:
    pages = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    store = fill(pages)
    size = store.size  # type: ignore[attr-defined]
    stored = store.c.pages_stored  # type: ignore[attr-defined]
    meta, arena = store.state.fds()  # type: ignore[attr-defined]
    print(f"{stored} pages stored, {store.engine.mem_used_total >> 20} MiB pool, device {size >> 20} MiB")  # type: ignore[attr-defined]
    for engine in ("python", "native"):
        runs = []
        for _ in range(repeat if engine == "native" else max(1, repeat // 2)):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(size), str(meta), str(arena), engine],
                cwd=root, pass_fds=(meta, arena), capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs.append(json.loads(out.stdout))
        med = {k: statistics.median(r[k] for r in runs) for k in ("attach", "takeover", "rebuild", "check")}
        per = med["takeover"] / stored * 1e9
        print(
            f"{engine:7} attach+rebuild+check {med['takeover'] * 1e3:8.1f} ms = {per:7.0f} ns/stored page "
            f"(attach {med['attach'] * 1e3:.1f} ms; warm: rebuild {med['rebuild'] * 1e3:.1f} ms, "
            f"check {med['check'] * 1e3:.1f} ms; {len(runs)} runs)"
        )
    time.sleep(0)


if __name__ == "__main__":
    main()
