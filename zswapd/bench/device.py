"""``zswapd bench device``: the same corpus of real memory pages through
(a) zswapd via a loop device on its file, (b) the kernel's zram with the
same algorithm, (c) a loop device on a tmpfs file (the cost of the loop
layer alone) and, with ``--baseline-src``, (d) another zswapd build; the
same tools (dd, fio) for all, the targets alternated within each
repetition, medians kept, ratios against the baselines of the same run.

Owns: the measurements (sequential write and read, QD1 random-read
latency, ratio, fragmentation after discard and after compaction), the
codec's own ceiling on the corpus, and the ratios between targets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lz4.block
import zstandard

from .corpus import MIB, PAGE, Corpus, capture_corpus, describe_corpus, exit_on_signals, private_dir
from .pool import median_rate
from .report import failed, format_device, plot_ratios
from .targets import (
    Target,
    TmpfsLoopTarget,
    ZramTarget,
    ZswapdTarget,
    cannot_set_up,
    engine_module,
    pyfuse3_available,
    sh,
)

BLKDISCARD = 0x1277


def _dd_rate(args: list[str], nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return nbytes / (time.perf_counter() - t) / 1e6


def fio_randread(dev: str, size: int, seconds: int, workdir: str) -> tuple[float, float, float]:
    # fio may leave state files (*-verify.state) in its working directory.
    out = sh(
        "fio", "--name=lat", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
        f"--size={size}", f"--runtime={seconds}", "--time_based", "--output-format=json",
        "--percentile_list=50:99", cwd=workdir,
    )  # fmt: skip
    job = json.loads(out)["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000, job["iops"]


def _discard_random_half(dev: str, pages: int, seed: int = 1) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        for idx in random.Random(seed).sample(range(pages), pages // 2):
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", idx * PAGE, PAGE))
    finally:
        os.close(fd)


def run_targets(
    targets: list[Target], corpus: Corpus, repeat: int, latency_seconds: int, workdir: str
) -> dict[str, dict[str, float]]:
    """Measure every target, alternating between them within each repetition
    so that drift in the machine's speed falls on all of them alike."""
    size = corpus.pages * PAGE
    count = size // (128 * 1024)
    nbytes = count * 128 * 1024
    res: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    writes: dict[str, list[float]] = {t.name: [] for t in targets}
    reads: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(repeat):
        for t in targets:
            writes[t.name].append(
                _dd_rate([f"if={corpus.path}", f"of={t.path}", "bs=128K", f"count={count}", "oflag=direct",
                          "conv=notrunc"], nbytes)
            )  # fmt: skip
    for _ in range(repeat):
        for t in targets:
            reads[t.name].append(
                _dd_rate([f"if={t.path}", "of=/dev/null", "bs=128K", f"count={count}", "iflag=direct"], nbytes)
            )
    for t in targets:
        r = res[t.name]
        r["write_MBps"] = statistics.median(writes[t.name])
        r["read_MBps"] = statistics.median(reads[t.name])
        back = subprocess.run(["cmp", "-n", str(nbytes), corpus.path, t.path], capture_output=True)
        r["verified"] = float(back.returncode == 0)
    # Latency too is measured in alternation, ``repeat`` times, and the
    # medians kept: one run per target would put one noisy minute on it.
    lat: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in targets}
    for _ in range(repeat):
        for t in targets:
            lat[t.name].append(fio_randread(t.path, size, latency_seconds, workdir))
    for t in targets:
        r = res[t.name]
        runs = lat[t.name]
        r["randread_p50_us"] = statistics.median(x[0] for x in runs)
        r["randread_p99_us"] = statistics.median(x[1] for x in runs)
        r["randread_iops"] = statistics.median(x[2] for x in runs)
    for t in targets:
        r = res[t.name]
        s = t.stats()
        if not s:
            continue
        r["ratio"] = s["orig_data_size"] / max(1, s["mem_used_total"])
        r["metadata_B_per_page"] = s["metadata_bytes"] / max(1, s["pages"])
        try:
            _discard_random_half(t.path, corpus.pages)
        except OSError:
            continue  # a backend without discard (pyfuse3): no fragmentation figures
        s = t.stats()
        r["frag_after_discard"] = s["compr_data_size"] / max(1, s["mem_used_total"])
        t.compact()
        s = t.stats()
        r["frag_after_compact"] = s["compr_data_size"] / max(1, s["mem_used_total"])
    return res


def codec_ceiling(corpus: Corpus) -> dict[str, float]:
    data = Path(corpus.path).read_bytes()
    pages = [data[i * PAGE : (i + 1) * PAGE] for i in range(min(corpus.pages, 32768))]
    nbytes = len(pages) * PAGE
    zc = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False, write_dict_id=False)
    zd = zstandard.ZstdDecompressor()
    lz = [lz4.block.compress(p, store_size=False) for p in pages]
    zs = [zc.compress(p) for p in pages]
    return {
        "lz4_compress_MBps": median_rate(lambda: [lz4.block.compress(p, store_size=False) for p in pages], nbytes, 3),
        "lz4_decompress_MBps": median_rate(
            lambda: [lz4.block.decompress(c, uncompressed_size=PAGE) for c in lz], nbytes, 3
        ),
        "zstd_compress_MBps": median_rate(lambda: [zc.compress(p) for p in pages], nbytes, 3),
        "zstd_decompress_MBps": median_rate(lambda: [zd.decompress(c, max_output_size=PAGE) for c in zs], nbytes, 3),
    }


def _make_target(
    kind: str,
    size: int,
    algorithm: str,
    workdir: str,
    private: str,
    baseline_src: str | None = None,
    fuse_threads: int | None = None,
) -> Target:
    if kind == "zswapd":
        t: Target = ZswapdTarget(size, algorithm, workdir, fuse_threads=fuse_threads)
    elif kind == "baseline":
        t = ZswapdTarget(size, algorithm, workdir, src=baseline_src, fuse_threads=fuse_threads)
    elif kind == "pyfuse3":
        t = ZswapdTarget(size, algorithm, workdir, backend="pyfuse3")
    elif kind == "zram":
        t = ZramTarget(size, algorithm)
    else:
        t = TmpfsLoopTarget(size, private)
    t.name = f"{t.name}-{algorithm}" if kind != "tmpfs" else t.name
    return t


def bench_device(
    corpus_size: int = 128 * MIB,
    corpus_file: str | None = None,
    algorithms: tuple[str, ...] = ("lz4", "zstd"),
    repeat: int = 3,
    latency_seconds: int = 5,
    as_json: bool = False,
    plot: str | None = None,
    baseline_src: str | None = None,
    fuse_threads: int | None = None,
) -> int:
    refused = cannot_set_up("zswapd bench device")
    if refused is not None:
        return refused
    try:
        with exit_on_signals(), private_dir() as private, private_dir(tempfile.gettempdir()) as workdir:
            print(
                f"zswapd bench: captured memory is kept in {private} (mode 0700) and removed at exit; "
                f"daemons run in {workdir}",
                file=sys.stderr,
                flush=True,
            )
            results = _bench_device(
                corpus_size,
                corpus_file,
                algorithms,
                repeat,
                latency_seconds,
                workdir=workdir,
                private=private,
                baseline_src=baseline_src,
                fuse_threads=fuse_threads,
            )
    except (OSError, subprocess.CalledProcessError, KeyboardInterrupt) as e:
        return failed("zswapd bench device", e)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(format_device(results))
    if plot:
        plot_ratios(results, plot)
    return 0


def _bench_device(
    corpus_size: int,
    corpus_file: str | None,
    algorithms: tuple[str, ...],
    repeat: int,
    latency_seconds: int,
    workdir: str,
    private: str,
    baseline_src: str | None = None,
    fuse_threads: int | None = None,
) -> dict[str, Any]:
    if corpus_file:
        corpus = describe_corpus(corpus_file)
    else:
        corpus = capture_corpus(corpus_size, os.path.join(private, "corpus"))
    size = -(-corpus.pages * PAGE // MIB) * MIB
    results: dict[str, Any] = {
        "corpus": {"pages": corpus.pages, "zero_share": corpus.zero_pages / max(1, corpus.pages),
                   "same_filled_share": corpus.same_pages / max(1, corpus.pages), "sources": corpus.sources},
        "codec_ceiling": codec_ceiling(corpus),
    }  # fmt: skip
    has_zram = Path("/sys/block/zram0").exists() or Path("/sys/class/zram-control").exists()
    zram_algos = Path("/sys/block/zram0/comp_algorithm").read_text() if has_zram else ""
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []

        def add(kind: str, algo: str) -> None:
            sub = os.path.join(workdir, f"{kind}-{algo}")
            os.makedirs(sub, exist_ok=True)
            t = _make_target(kind, size, algo, sub, private, baseline_src, fuse_threads)
            stack.callback(t.close)
            targets.append(t)

        add("tmpfs", "none")
        for algo in algorithms:
            add("zswapd", algo)
            if has_zram and algo in zram_algos:
                add("zram", algo)
        if pyfuse3_available():
            add("pyfuse3", algorithms[0])
        if baseline_src:
            add("baseline", algorithms[0])
        results.update(run_targets(targets, corpus, repeat, latency_seconds, workdir))
        results["serving"] = {t.name: t.serving() for t in targets if isinstance(t, ZswapdTarget)}
        results["engine_module"] = engine_module()
    ratios: dict[str, float] = {}
    z = results.get("zram-lz4")
    if z:
        for algo in algorithms:
            mine = results[f"zswapd-{algo}"]
            for key in ("write_MBps", "read_MBps", "ratio", "frag_after_compact", "randread_p99_us",
                        "metadata_B_per_page"):  # fmt: skip
                ratios[f"zswapd-{algo}/zram-lz4 {key}"] = mine[key] / z[key]
    p3 = results.get(f"zswapd-pyfuse3-{algorithms[0]}")
    if p3:
        builtin = results[f"zswapd-{algorithms[0]}"]
        ratios[f"zswapd-{algorithms[0]} builtin/pyfuse3 write_MBps"] = builtin["write_MBps"] / p3["write_MBps"]
        ratios[f"zswapd-{algorithms[0]} builtin/pyfuse3 read_MBps"] = builtin["read_MBps"] / p3["read_MBps"]
    for algo in algorithms:
        mine = results[f"zswapd-{algo}"]
        ratios[f"zswapd-{algo}/tmpfs-loop write_MBps"] = mine["write_MBps"] / results["tmpfs-loop"]["write_MBps"]
        ratios[f"zswapd-{algo}/tmpfs-loop read_MBps"] = mine["read_MBps"] / results["tmpfs-loop"]["read_MBps"]
        # The latency target is against the loop layer's own floor, measured
        # in the same run: absolute microseconds swing 5x on this VM.
        for key in ("randread_p50_us", "randread_p99_us"):
            ratios[f"zswapd-{algo}/tmpfs-loop {key}"] = mine[key] / results["tmpfs-loop"][key]
    base = results.get(f"baseline-{algorithms[0]}")
    if base:
        mine = results[f"zswapd-{algorithms[0]}"]
        for key in ("write_MBps", "read_MBps", "randread_p50_us", "randread_p99_us"):
            ratios[f"zswapd-{algorithms[0]}/baseline {key}"] = mine[key] / base[key]
    results["ratios"] = ratios
    return results
