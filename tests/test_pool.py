"""The zsmalloc-style pool: classes, handles, straddling objects, compaction."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from conftest import rss_kib

from zswapd.bench import sample_pages
from zswapd.codec import Codec
from zswapd.engine import Engine, open_pool
from zswapd.pool import (
    CLASSES,
    FRAME_SIZE,
    FULLNESS_LABELS,
    HUGE_THRESHOLD,
    MAX_FRAMES_PER_ZSPAGE,
    MOVE_RESERVE,
    PoolError,
    PoolFull,
    build_classes,
)

# Every test but the class-table one runs against both engines: the Python
# reference (pool.py) and the native one (zswapd/engine/).
ENGINES = ["python", "native"]


def _straddles(pool: Engine, h: int, n: int) -> bool:
    """Whether object ``h`` crosses a frame boundary (read off the state's tables)."""
    loc = pool.state.view("handle")[h]
    if loc >> 63:
        return False
    size = CLASSES[pool.state.view("zs_class")[loc >> 16]].size
    return bool((loc & 0xFFFF) * size % FRAME_SIZE + 4 + n > FRAME_SIZE)


@pytest.fixture(params=ENGINES)
def make_pool(request: pytest.FixtureRequest) -> Any:
    def make(max_frames: int, max_handles: int, frame_limit: int = 0, reserve_frames: int = 64) -> Engine:
        return open_pool(request.param, max_frames, max_handles, frame_limit, reserve_frames)

    return make


def test_class_table_like_zsmalloc() -> None:
    classes, lookup, huge = build_classes()
    sizes = [c.size for c in classes]
    assert sizes == sorted(sizes) and sizes[0] == 32 and sizes[-1] == 4096
    assert all(s % 16 == 0 for s in sizes)
    for c in classes:
        assert 1 <= c.frames_per_zspage <= MAX_FRAMES_PER_ZSPAGE
        assert c.objs_per_zspage == c.frames_per_zspage * FRAME_SIZE // c.size
        if c.size & (c.size - 1) == 0:
            assert c.frames_per_zspage == 1  # powers of two waste nothing in one frame
    # merged classes are unique in (frames, objs)
    shapes = [(c.frames_per_zspage, c.objs_per_zspage) for c in classes]
    assert len(shapes) == len(set(shapes))
    # every size maps to the smallest class that holds it
    for n in range(1, FRAME_SIZE + 1):
        c = classes[lookup[n]]
        assert c.size >= n
        if lookup[n] > 0:
            assert classes[lookup[n] - 1].size < n
    assert huge == HUGE_THRESHOLD + 4
    assert classes[lookup[huge]].objs_per_zspage == 1


def test_store_load_free_roundtrip_including_straddlers(make_pool: Any) -> None:
    pool = make_pool(4096, 8192, reserve_frames=0)
    rnd = random.Random(1)
    items = []
    for _ in range(3000):
        n = rnd.choice([1, 17, 300, 1000, 2049, 3000, HUGE_THRESHOLD - 1, FRAME_SIZE])
        data = rnd.randbytes(n)
        items.append((pool.store(data), data))
    straddles = 0
    for h, data in items:
        assert bytes(pool.load(h, len(data))) == data
        straddles += _straddles(pool, h, len(data))
    assert straddles > 0  # some objects really cross a frame boundary
    for h, data in items:
        pool.free(h, len(data))
    assert pool.frames_used == 0 and pool.obj_bytes == 0 and pool.handles_used == 0


def test_class_fullness_histogram_like_zsmalloc_debugfs(make_pool: Any) -> None:
    """stats' per-class "fullness": zspages by fullness group, then the full
    ones, counted from the pool's own lists; it sums to the class's zspages."""
    pool = make_pool(4096, 8192, reserve_frames=0)
    rnd = random.Random(2)
    handles = [pool.store(rnd.randbytes(1000)) for _ in range(400)]  # one class, 4 to a zspage
    for h in handles[:200:3] + handles[1:200:12]:  # the second half stays full
        pool.free(h, 1000)
    stats = pool.class_stats()
    (row,) = [c for c in stats[:-1] if c["zspages"]]
    assert len(row["fullness"]) == len(FULLNESS_LABELS) and sum(row["fullness"]) == row["zspages"]
    objs = row["objs_per_zspage"]
    ref = pool.reference()
    cls = next(i for i, c in enumerate(ref.classes) if c.size == row["size"])
    want = [0] * len(FULLNESS_LABELS)
    for z in range(1, len(ref.zs_class)):
        if ref.zs_class[z] == cls and ref.zs_inuse[z]:
            inuse = ref.zs_inuse[z]
            want[-1 if inuse == objs else -(-inuse * 10 // objs) - 1] += 1
    assert row["fullness"] == want and want[-1] and any(want[:-1])
    assert stats[-1]["fullness"][-1] == stats[-1]["zspages"]  # huge objects: a full frame each


def test_bad_input_is_a_clear_exception(make_pool: Any) -> None:
    pool = make_pool(64, 64)
    with pytest.raises(PoolError, match="larger than a frame"):
        pool.store(bytes(FRAME_SIZE + 1))
    with pytest.raises(PoolError, match="empty"):
        pool.store(b"")
    with pytest.raises(PoolError, match="raw page"):
        pool.store(bytes(FRAME_SIZE - 2))
    with pytest.raises(PoolError, match="unknown handle"):
        pool.free(12345, 10)


def test_limit_raises_pool_full_and_keeps_data(make_pool: Any) -> None:
    pool = make_pool(1024, 1024, frame_limit=16, reserve_frames=0)
    stored = []
    with pytest.raises(PoolFull):
        for i in range(1000):
            data = bytes([i % 251 + 1]) * 1000
            stored.append((pool.store(data), data))
    assert pool.frames_used <= 16
    for h, data in stored:
        assert bytes(pool.load(h, len(data))) == data


def test_a_move_takes_at_most_the_move_reserve_past_the_limit(make_pool: Any) -> None:
    """A write's store stops at the limit; a background move's (``over``)
    may take frames past it, never more than MOVE_RESERVE, whatever the
    class (huge objects one frame each, zspages of up to 8 frames), and an
    ``over`` beyond the reserve is refused.  Frees give the frames back."""
    limit = 16
    pool = make_pool(1024, 1024, frame_limit=limit, reserve_frames=0)
    hs = [pool.store(bytes([i + 1]) * FRAME_SIZE) for i in range(limit)]
    assert pool.frames_used == limit
    with pytest.raises(PoolFull):
        pool.store(b"\1" * 100)  # a write's: not one frame past the limit
    with pytest.raises(PoolError, match="at most"):
        pool.store(b"\1" * 100, MOVE_RESERVE + 1)
    rnd = random.Random(3)
    moved = []
    with pytest.raises(PoolFull):
        for _ in range(10_000):
            n = rnd.choice([FRAME_SIZE, rnd.randrange(1, HUGE_THRESHOLD)])
            data = rnd.randbytes(n)
            moved.append((pool.store(data, MOVE_RESERVE), data))
            assert pool.frames_used <= limit + MOVE_RESERVE
    assert limit < pool.frames_used <= limit + MOVE_RESERVE
    assert pool.frame_room() < 0 and pool.frame_room(MOVE_RESERVE) >= 0
    for h, data in moved:
        assert bytes(pool.load(h, len(data))) == data
    for h in hs:
        pool.free(h, FRAME_SIZE)
    assert pool.frames_used <= limit


def test_allocation_prefers_fullest_zspage(make_pool: Any) -> None:
    pool = make_pool(1024, 4096, reserve_frames=0)
    cls = 5  # any small class
    size = CLASSES[cls].size - 4
    hs = [pool.store(bytes(size)) for _ in range(CLASSES[cls].objs_per_zspage * 3)]
    assert pool.cls_zspages[cls] == 3
    # free 1 from the first zspage and most of the second
    per = CLASSES[cls].objs_per_zspage
    pool.free(hs[0], size)
    for h in hs[per : 2 * per - 1]:
        pool.free(h, size)
    h = pool.store(bytes(size))
    z = pool.handles[h] >> 16
    assert z == pool.handles[hs[1]] >> 16  # went into the fuller zspage


def test_fragmentation_after_random_free_and_compact(make_pool: Any) -> None:
    """The zsmalloc "decouple handle and object" scenario: free a random 60%
    of realistic pages; compaction brings compr/total back above 0.95 and the
    freed frames leave RSS."""
    codec = Codec("lz4")
    pages = sample_pages(12000)
    pool = make_pool(20000, 20000, reserve_frames=0)
    objs = []
    for p in pages:
        c = codec.compress(p)
        objs.append((pool.store(c), len(c), c))
    rnd = random.Random(7)
    rnd.shuffle(objs)
    cut = len(objs) * 60 // 100
    for h, n, _ in objs[:cut]:
        pool.free(h, n)
    keep = objs[cut:]
    before = pool.obj_bytes / pool.mem_used_total
    frames_before = pool.frames_used
    rss_before = rss_kib()
    moved = pool.compact()
    after = pool.obj_bytes / pool.mem_used_total
    freed = frames_before - pool.frames_used
    rss_after = rss_kib()
    print(f"fragmentation: compr/total {before:.3f} -> {after:.3f}; {moved} moved; {freed} frames freed")
    print(f"RSS {rss_before} KiB -> {rss_after} KiB (freed frames {freed * 4} KiB)")
    assert before < 0.8
    assert after >= 0.95
    assert pool.pages_compacted == freed
    assert all(pool.freeable(i) == 0 for i in range(len(CLASSES)))
    # The frames went back to the kernel: RSS fell by at least 80% of them.
    assert rss_before - rss_after >= freed * 4 * 0.8
    for h, n, c in keep:
        assert bytes(pool.load(h, n)) == c


def test_compact_in_bounded_steps(make_pool: Any) -> None:
    pool = make_pool(4096, 8192, reserve_frames=0)
    objs = [(pool.store(os.urandom(700)), 700) for _ in range(3000)]
    data = {h: bytes(pool.load(h, n)) for h, n in objs}
    for h, n in objs[::2]:
        pool.free(h, n)
        del data[h]
    steps = 0
    while True:
        moved = pool.compact(max_moves=7)
        assert moved <= 7
        steps += 1
        for h, d in data.items():
            assert bytes(pool.load(h, len(d))) == d
        if not moved:
            break
    assert steps > 3
    assert pool.freeable_frames() == 0


def test_freed_frames_stay_hot_until_trim_then_leave_rss(make_pool: Any) -> None:
    pool = make_pool(4096, 4096, reserve_frames=4)
    hs = [pool.store(bytes([7]) * FRAME_SIZE) for _ in range(2000)]
    for h in hs:
        pool.free(h, FRAME_SIZE)
    assert pool.frames_used == 0 and pool.reserve_bytes == 2000 * FRAME_SIZE
    rss = rss_kib()
    assert pool.trim() == 1996
    assert pool.reserve_bytes == 4 * FRAME_SIZE
    assert rss - rss_kib() >= 1996 * 4 * 0.8
    # reuse: hot frames first, then dropped ones, then fresh
    hs = [pool.store(bytes([9]) * FRAME_SIZE) for _ in range(12)]
    assert pool.frames_used == 12 and pool.reserve_bytes == 0
    assert pool.refill_reserve() == 4
