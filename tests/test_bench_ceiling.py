"""The per-page ceiling prices pages by the codec's own rules."""

from __future__ import annotations

import os

import lz4.block

from zswapd.bench import sample_pages
from zswapd.bench.ceiling import ceiling, packed_cost, split, tier, train
from zswapd.codec import PAGE_SIZE
from zswapd.pool import CLASSES, HUGE_THRESHOLD


def test_same_filled_cost_nothing_and_huge_a_page() -> None:
    text = sample_pages(1)[0]
    pages = [bytes(PAGE_SIZE), b"\x07" * PAGE_SIZE, os.urandom(PAGE_SIZE), text]
    c = ceiling(pages, "lz4")
    n = len(lz4.block.compress(text, store_size=False))
    assert list(c.costs) == [0, 0, PAGE_SIZE, n]
    assert (c.same_pages, c.huge_pages) == (2, 1)
    assert c.ratio == 4 * PAGE_SIZE / (PAGE_SIZE + n)
    # The huge rule is codec.is_huge's: a length equal to the threshold is huge.
    assert list(ceiling([text], "lz4", huge_threshold=n).costs) == [PAGE_SIZE]
    assert list(ceiling([text], "lz4", huge_threshold=n + 1).costs) == [n]
    assert ceiling(pages, "lz4").stored_bytes == ceiling(pages, "lz4", huge_threshold=HUGE_THRESHOLD).stored_bytes


def test_packed_cost_is_a_class_share_of_frames() -> None:
    assert packed_cost(0) == 0 and packed_cost(PAGE_SIZE) == PAGE_SIZE
    smallest = CLASSES[0]
    assert packed_cost(1) == smallest.frames_per_zspage * PAGE_SIZE / smallest.objs_per_zspage
    assert all(packed_cost(n) >= n + 4 for n in range(1, HUGE_THRESHOLD))


def test_dictionary_trained_on_other_pages_round_trips() -> None:
    s = split(sample_pages(600), test_pages=200, train_pages=300)
    assert not set(s.test) & set(s.other)
    assert set(s.same) <= set(s.test)
    t = train(s.other, 16 * 1024)
    assert 0 < len(t.dictionary) <= 16 * 1024 and t.samples == 300
    plain = ceiling(s.test, "zstd", 3)
    with_dict = ceiling(s.test, "zstd", 3, t.dictionary)  # raises if a page does not come back
    assert with_dict.dict_bytes == len(t.dictionary)
    assert with_dict.stored_bytes < plain.stored_bytes


def test_tier_rules() -> None:
    text = sample_pages(4)
    primary = ceiling(text, "lz4")
    secondary = ceiling(text, "zstd", 19)
    gains = [a - b for a, b in zip(primary.costs, secondary.costs)]
    # Ours: kept when it saves at least the threshold.
    t = tier(primary, secondary, min(gains))
    assert t.recompressed == 4 and t.bytes_saved == sum(gains) and t.ratio == secondary.ratio
    assert tier(primary, secondary, max(gains) + 1).recompressed == 0
    # zram's: only objects of at least the threshold, only to below it.
    big = max(primary.costs)
    assert tier(primary, secondary, big + 1, zram_rule=True).recompressed == 0
    assert tier(primary, secondary, min(secondary.costs), zram_rule=True).recompressed == 0
