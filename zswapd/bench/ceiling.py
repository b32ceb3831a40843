"""Per-page ceiling: what a codec, level and dictionary would store for a set
of pages, page by page, with no pool around it.

The daemon's ratio (orig_data_size / mem_used_total) pays for packing and
metadata; the ceiling prices the same pages one by one with nothing but the
codec.  The recompression benchmark holds the daemon to a share of it on the
same pages with the same level and dictionary; ``ceiling()`` and ``tier()``
are what it imports.

Glossary:
  cost        what one page occupies: 0 if same-filled (codec.fill_word), a
              whole page if codec.is_huge says so at the pool's threshold,
              else its compressed length;
  packed      the same page priced at what the pool spends on it with every
              zspage full: its size class's frames per object (the object
              carries the pool's slot header);
  ratio       pages * 4096 / the sum of their costs (or packed costs);
  tier        pages kept with the primary codec, each replaced by the
              secondary one only if that saves at least ``threshold`` bytes
              (the recompression rule of the issue); ``zram_rule`` applies
              zram's instead (see ``tier``);
  samples     the pages a dictionary is trained on: never same-filled
              pages, which are never recompressed.

Speeds are one core through the Python bindings (lz4, python-zstandard), so
they include a per-call overhead the C engine does not pay; python-zstandard
also bundles its own libzstd, which need not be the system one the C engine
links (``libzstd_version`` says which).  Training goes through
``zstandard.train_dictionary``, which always calls
ZDICT_optimizeTrainFromBuffer_fastCover; with no ``steps``/``threads`` it
uses d=8, steps=4 and level 3, the parameters ZDICT_trainFromBuffer uses.

    python -m zswapd.bench.ceiling CORPUS [--levels 1,3,8] [--dict-kib 64] ...

CORPUS is a file of raw pages (``corpus.capture_corpus`` makes one);
``--capture SIZE`` captures one instead, under the bench's privacy rules.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lz4.block
import zstandard

from ..codec import PAGE_SIZE, fill_word, is_huge
from ..pool import _CLASS_OF, CLASSES, FRAME_SIZE, HEADER, HUGE_THRESHOLD

MIB = 1 << 20
libzstd_version = ".".join(map(str, zstandard.ZSTD_VERSION))


def packed_cost(cost: int) -> float:
    """Bytes of frames the pool spends on an object of ``cost`` bytes when its
    class's zspages are full (a huge page owns a frame; same-filled, none)."""
    if cost == 0 or cost == PAGE_SIZE:
        return float(cost)
    c = CLASSES[_CLASS_OF[cost + HEADER]]
    return c.frames_per_zspage * FRAME_SIZE / c.objs_per_zspage


@dataclass
class Ceiling:
    """One codec configuration over one set of pages."""

    method: str
    level: int
    dict_bytes: int
    pages: int
    same_pages: int
    huge_pages: int
    stored_bytes: int
    packed_bytes: float
    ratio: float
    packed_ratio: float
    # One core, Python; over the pages that are compressed (not same-filled)
    # and, for decompression, the pages stored compressed (not huge).
    compress_MBps: float
    decompress_MBps: float
    decompress_us_per_page: float
    costs: array[int] = field(repr=False)


def codec_for(
    method: str, level: int = 0, dictionary: bytes | None = None
) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """(compress, decompress) as the engine calls them: lz4 blocks without a
    size prefix; zstd frames with no content size, checksum or dictionary id
    (the entry's codec tag names the dictionary)."""
    if method == "lz4":
        return (
            lambda p: lz4.block.compress(p, store_size=False),
            lambda c: lz4.block.decompress(c, uncompressed_size=PAGE_SIZE),
        )
    if method != "zstd":
        raise ValueError(f"unknown method {method!r}; expected lz4 or zstd")
    d = None
    if dictionary is not None:
        d = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_FULLDICT)
        d.precompute_compress(level=level)  # one CDict shared by every call, as the engine will
    zc = zstandard.ZstdCompressor(
        level=level, dict_data=d, write_content_size=False, write_checksum=False, write_dict_id=False
    )
    zd = zstandard.ZstdDecompressor(dict_data=d)
    return zc.compress, lambda c: zd.decompress(c, max_output_size=PAGE_SIZE)


def ceiling(
    pages: Sequence[bytes],
    method: str,
    level: int = 0,
    dictionary: bytes | None = None,
    huge_threshold: int = HUGE_THRESHOLD,
) -> Ceiling:
    """Price every page with one codec configuration; every compressed page
    is decompressed again and compared, so a figure is never of lost bytes."""
    compress, decompress = codec_for(method, level, dictionary)
    work = [p for p in pages if fill_word(p) is None]
    t0 = time.perf_counter()
    out = [compress(p) for p in work]
    t_comp = time.perf_counter() - t0
    kept = [(p, c) for p, c in zip(work, out) if not is_huge(len(c), huge_threshold)]
    t0 = time.perf_counter()
    back = [decompress(c) for _, c in kept]
    t_dec = time.perf_counter() - t0
    if any(b != p for b, (p, _) in zip(back, kept)):
        raise RuntimeError(f"{method} level {level}: a page did not decompress to itself")
    costs = array("i", [0] * (len(pages) - len(work)))
    costs.extend(PAGE_SIZE if is_huge(len(c), huge_threshold) else len(c) for c in out)
    stored = sum(costs)
    packed = sum(packed_cost(c) for c in costs)
    orig = len(pages) * PAGE_SIZE
    return Ceiling(
        method=method,
        level=level,
        dict_bytes=len(dictionary or b""),
        pages=len(pages),
        same_pages=len(pages) - len(work),
        huge_pages=len(work) - len(kept),
        stored_bytes=stored,
        packed_bytes=packed,
        ratio=orig / max(1, stored),
        packed_ratio=orig / max(1.0, packed),
        compress_MBps=len(work) * PAGE_SIZE / max(t_comp, 1e-9) / 1e6,
        decompress_MBps=len(kept) * PAGE_SIZE / max(t_dec, 1e-9) / 1e6,
        decompress_us_per_page=t_dec / max(1, len(kept)) * 1e6,
        costs=costs,
    )


@dataclass
class Tier:
    """Primary-codec pages of which the secondary codec replaced some."""

    threshold: int
    rule: str
    candidates: int  # pages tried: all but same-filled ones
    recompressed: int
    bytes_saved: int
    ratio: float
    packed_ratio: float


def tier(
    primary: Ceiling, secondary: Ceiling, threshold: int, zram_rule: bool = False, engine_rule: bool = False
) -> Tier:
    """The pool after one recompression pass over every page (both Ceilings
    over the same pages, in the same order).  Our rule keeps the new object
    if it saves at least ``threshold`` bytes; the engine's (engine/tier.c,
    ``engine_rule``) also wants it in a smaller size class.  zram's
    (recompress_slot) skips objects under ``threshold`` bytes and keeps a
    new one only if it falls in a smaller size class and, with a threshold,
    under it."""
    if primary.pages != secondary.pages:
        raise ValueError("the two ceilings are not over the same pages")
    total = 0
    packed = 0.0
    n = saved = cand = 0
    for old, new in zip(primary.costs, secondary.costs):
        keep = False
        if old:
            cand += 1
            if zram_rule:
                smaller = _CLASS_OF[min(new + HEADER, PAGE_SIZE)] < _CLASS_OF[min(old + HEADER, PAGE_SIZE)]
                keep = old >= threshold and smaller and not (threshold and new >= threshold)
            elif engine_rule:
                old_cls = len(CLASSES) if old == PAGE_SIZE else _CLASS_OF[old + HEADER]
                keep = new < PAGE_SIZE and old - new >= threshold and _CLASS_OF[new + HEADER] < old_cls
            else:
                keep = old - new >= max(threshold, 1)
        if keep:
            n += 1
            saved += old - new
        cost = new if keep else old
        total += cost
        packed += packed_cost(cost)
    orig = primary.pages * PAGE_SIZE
    rule = "zram" if zram_rule else "engine" if engine_rule else "saved"
    return Tier(threshold, rule, cand, n, saved, orig / max(1, total),
                orig / max(1.0, packed))  # fmt: skip


@dataclass
class Trained:
    dictionary: bytes
    dict_id: int
    samples: int
    seconds: float  # wall
    cpu_seconds: float  # this process, all threads
    # Bytes the resident set peaked above its start (-1: not measurable).  A
    # lower bound: the trainer may reuse memory the process freed before;
    # tests/bench/ceiling_c.c measures it in a fresh process.
    peak_rss_growth: int


def _rss_fields() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def train(samples: Sequence[bytes], dict_size: int, dict_id: int = 0, **params: int) -> Trained:
    """Train with ZDICT (fastCover, see the module doc); ``params`` go to
    zstandard.train_dictionary (k, d, f, steps, threads, level, accel)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux)
        before = _rss_fields()["VmRSS"]
    except OSError:
        before = -1
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    d = zstandard.train_dictionary(dict_size, list(samples), dict_id=dict_id, **params)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    growth = _rss_fields()["VmHWM"] - before if before >= 0 else -1
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return Trained(d.as_bytes(), d.dict_id(), len(samples), wall, cpu, growth)


@dataclass
class Split:
    """A test set and two disjoint ways to pick training samples for it."""

    test: list[bytes]
    other: list[bytes]  # samples from pages the test set does not hold
    same: list[bytes]  # samples from the test set's own pages (the daemon trains on its idle pages)


def split(pages: Sequence[bytes], test_pages: int, train_pages: int, seed: int = 1) -> Split:
    rng = random.Random(seed)
    order = list(range(len(pages)))
    rng.shuffle(order)
    test_idx = sorted(order[:test_pages])
    rest = [pages[i] for i in order[test_pages:] if fill_word(pages[i]) is None]
    test = [pages[i] for i in test_idx]
    own = [p for p in test if fill_word(p) is None]
    return Split(test, rest[:train_pages], rng.sample(own, min(train_pages, len(own))))


def load_pages(path: str, limit: int = 0, start: int = 0) -> list[bytes]:
    """Pages ``start``.. of a raw page file, at most ``limit`` (0: all)."""
    with open(path, "rb") as f:
        f.seek(start * PAGE_SIZE)
        data = f.read(limit * PAGE_SIZE if limit else -1)
    return [data[i : i + PAGE_SIZE] for i in range(0, len(data) // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE)]


def sweep(
    s: Split, levels: Sequence[int], dict_kib: Sequence[int], modes: Sequence[str] = ("other", "same")
) -> tuple[list[Ceiling], list[Trained]]:
    """lz4, then each zstd level without a dictionary and with each size of
    dictionary trained on each mode's samples."""
    rows = [ceiling(s.test, "lz4")]
    trained: list[Trained] = []
    dicts: list[tuple[str, Trained]] = []
    for kib in dict_kib:
        for mode in modes:
            t = train(getattr(s, mode), kib * 1024)
            trained.append(t)
            dicts.append((mode, t))
    for level in levels:
        rows.append(ceiling(s.test, "zstd", level))
        for mode, t in dicts:
            row = ceiling(s.test, "zstd", level, t.dictionary)
            row.method = f"zstd+dict({mode})"
            rows.append(row)
    return rows, trained


def format_rows(rows: Sequence[Ceiling]) -> str:
    lines = [
        f"{'codec':18}{'level':>6}{'dict KiB':>9}{'ratio':>8}{'packed':>8}{'huge':>7}"
        f"{'comp MB/s':>11}{'dec MB/s':>10}{'dec us/pg':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r.method:18}{r.level:>6}{r.dict_bytes // 1024:>9}{r.ratio:>8.3f}{r.packed_ratio:>8.3f}"
            f"{r.huge_pages:>7}{r.compress_MBps:>11.1f}{r.decompress_MBps:>10.1f}{r.decompress_us_per_page:>10.2f}"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zswapd.bench.ceiling", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", help="file of raw 4 KiB pages")
    ap.add_argument("--capture", metavar="MiB", type=int, help="capture this much real memory instead")
    ap.add_argument("--test-pages", type=int, default=16384)
    ap.add_argument("--train-pages", type=int, default=4096)
    ap.add_argument("--levels", type=_ints, default=[1, 3, 5, 8, 12, 19])
    ap.add_argument("--dict-kib", type=_ints, default=[16, 32, 64, 112])
    ap.add_argument("--thresholds", type=_ints, default=[32, 64, 128, 256, 512, 1024])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if (a.corpus is None) == (a.capture is None):
        ap.error("give either CORPUS or --capture MiB")
    if a.capture is not None:
        from .corpus import capture_corpus, exit_on_signals, private_dir

        with exit_on_signals(), private_dir() as private:
            corpus = capture_corpus(a.capture * MIB, os.path.join(private, "corpus"))
            pages = load_pages(corpus.path)
    else:
        pages = load_pages(a.corpus)
    s = split(pages, min(a.test_pages, len(pages) // 2), a.train_pages)
    del pages
    rows, trained = sweep(s, a.levels, a.dict_kib)
    # lz4 then one recompression pass, with the largest dictionary trained on the pages themselves
    biggest = max(a.dict_kib, default=0) * 1024
    tiers = [
        (r, tier(rows[0], r, t, z))
        for r in rows[1:]
        if r.dict_bytes == 0 or (r.method.endswith("(same)") and r.dict_bytes >= biggest)
        for t in a.thresholds
        for z in (False, True)
    ]
    if a.json:
        out: dict[str, Any] = {
            "libzstd": libzstd_version,
            "huge_threshold": HUGE_THRESHOLD,
            "ceilings": [{k: v for k, v in asdict(r).items() if k != "costs"} for r in rows],
            "training": [{k: v for k, v in asdict(tr).items() if k != "dictionary"} for tr in trained],
            "tiers": [
                {"method": r.method, "level": r.level, "dict_bytes": r.dict_bytes, **asdict(t)} for r, t in tiers
            ],
        }
        print(json.dumps(out, indent=1))
        return 0
    print(f"{len(s.test)} test pages, {len(s.other)} training samples; python-zstandard's libzstd {libzstd_version}")
    print(format_rows(rows))
    for tr in trained:
        print(f"trained {len(tr.dictionary)} B on {tr.samples} pages: {tr.seconds:.2f} s, "
              f"at least {tr.peak_rss_growth / MIB:.0f} MiB peak growth")  # fmt: skip
    print("\nlz4, then recompressed where it saves >= threshold bytes (zram's rule: objects >= threshold, to below it)")
    print(
        f"{'secondary':18}{'level':>6}{'dict KiB':>9}{'threshold':>10}{'rule':>6}{'recompressed':>13}{'ratio':>8}{'packed':>8}"
    )
    for r, t in tiers:
        print(f"{r.method:18}{r.level:>6}{r.dict_bytes // 1024:>9}{t.threshold:>10}{t.rule:>6}"
              f"{t.recompressed / max(1, t.candidates):>13.1%}{t.ratio:>8.3f}{t.packed_ratio:>8.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
