"""``zswapd bench recompress``: the recompression tier on one corpus of real
memory, in one run: zswapd's ratio after a full pass against zram with lz4
and against the per-page ceiling on the same pages (ceiling.py: same
level, a dictionary trained the daemon's way, the engine's keep rule); the
pass's pages per CPU-second; and the QD1 4 KiB read p99 of a recompressed
device against an lz4 one holding the same pages, measured in alternation.

Owns: that benchmark and the dictionary it trains for the ceiling.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

from ..codec import fill_word
from .corpus import MIB, PAGE, capture_corpus, describe_corpus, exit_on_signals, private_dir
from .device import fio_randread
from .report import failed, format_recompress
from .targets import Target, ZramTarget, ZswapdTarget, cannot_set_up, sh


def ceiling_dictionary(pages: list[bytes], size: int, samples: int = 4096) -> bytes:
    """A dictionary trained as the daemon trains its own (Store.training_
    samples, engine.train): on up to ``samples`` pages spread evenly over
    the device, those a write stored compressed (not same-filled, not huge
    under lz4), with ZDICT_trainFromBuffer (the C engine's, when built)."""
    from .. import engine as engine_mod
    from ..codec import is_huge
    from ..pool import HUGE_THRESHOLD
    from .ceiling import codec_for

    native = getattr(engine_mod, "_engine", None)

    compress, _ = codec_for("lz4")
    stored = [p for p in pages if fill_word(p) is None]
    stride = max(1, len(stored) // samples)
    chosen = [p for p in stored[::stride] if not is_huge(len(compress(p)), HUGE_THRESHOLD)][:samples]
    if native is not None:
        out: bytes = native.train_dictionary(b"".join(chosen), size)
        return out
    training: list[bytes | bytearray | memoryview] = list(chosen)
    return bytes(zstandard.train_dictionary(size, training).as_bytes())


def bench_recompress(
    corpus_size: int = 128 * MIB,
    corpus_file: str | None = None,
    repeat: int = 3,
    latency_seconds: int = 5,
    level: int = 8,
    threshold: int = 128,
    dictionary_size: int = 112 << 10,
    as_json: bool = False,
    budget_percent: float = 2.0,
    budget_seconds: float = 60.0,
) -> int:
    """The recompression tier on one corpus of real memory, in one run:
    zswapd's ratio (orig_data_size / mem_used_total) after a full pass, against
    zram with lz4 and against the per-page ceiling on the same pages (same
    level, a dictionary trained the daemon's way, the engine's keep rule);
    the pass's pages per CPU-second; and the QD1 4 KiB read p99 of a
    recompressed device against an lz4 one holding the same pages, the two
    measured in alternation; then the background policy's CPU against its
    budget over ``budget_seconds`` (0: skipped) on the lz4 device."""
    refused = cannot_set_up("zswapd bench recompress")
    if refused is not None:
        return refused
    try:
        with exit_on_signals(), private_dir() as private, private_dir(tempfile.gettempdir()) as workdir:
            results = _bench_recompress(
                corpus_size, corpus_file, repeat, latency_seconds, level, threshold, dictionary_size, workdir, private,
                budget_percent, budget_seconds,
            )  # fmt: skip
    except (OSError, subprocess.CalledProcessError, KeyboardInterrupt, RuntimeError) as e:
        return failed("zswapd bench recompress", e)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(format_recompress(results))
    return 0


def _bench_recompress(
    corpus_size: int,
    corpus_file: str | None,
    repeat: int,
    latency_seconds: int,
    level: int,
    threshold: int,
    dictionary_size: int,
    workdir: str,
    private: str,
    budget_percent: float = 2.0,
    budget_seconds: float = 60.0,
) -> dict[str, Any]:
    from ..control import request
    from .ceiling import ceiling, tier

    corpus = (
        describe_corpus(corpus_file) if corpus_file else capture_corpus(corpus_size, os.path.join(private, "corpus"))
    )
    size = -(-corpus.pages * PAGE // MIB) * MIB
    count = corpus.pages * PAGE // (128 * 1024)
    nbytes = count * 128 * 1024
    # Both zswapd devices with the background policy off: the pass is the
    # one `zswapd recompress` runs, timed and counted by its reply.
    extra = f"[recompress]\nenable = false\nlevel = {level}\nthreshold = {threshold}\n"
    extra += f"dictionary_size = {dictionary_size}\n"
    results: dict[str, Any] = {"corpus": {"pages": corpus.pages, "sources": corpus.sources}}
    with contextlib.ExitStack() as stack:
        targets: dict[str, Target] = {}
        for name in ("recompressed", "lz4"):
            sub = os.path.join(workdir, name)
            os.makedirs(sub, exist_ok=True)
            t: Target = ZswapdTarget(size, "lz4", sub, extra=extra)
            stack.callback(t.close)
            targets[name] = t
        has_zram = Path("/sys/block/zram0").exists() or Path("/sys/class/zram-control").exists()
        if has_zram:
            z = ZramTarget(size, "lz4")
            stack.callback(z.close)
            targets["zram-lz4"] = z
        for t in targets.values():
            sh("dd", f"if={corpus.path}", f"of={t.path}", "bs=128K", f"count={count}", "oflag=direct",
                "conv=notrunc", "status=none")  # fmt: skip
            t.compact()
        for name, t in targets.items():
            s = t.stats()
            results[name] = {"ratio_before": s["orig_data_size"] / max(1, s["mem_used_total"])}
        rec = targets["recompressed"]
        assert isinstance(rec, ZswapdTarget)
        reply = request(rec.sock, {"cmd": "recompress", "idle_age": 0}, timeout=3600)
        if not reply.get("ok"):
            raise RuntimeError(f"zswapd recompress failed: {reply.get('error')}")
        rec.compact()
        s = rec.stats()
        stats = request(rec.sock, {"cmd": "stats"})
        r = results["recompressed"]
        r.update(
            ratio=s["orig_data_size"] / max(1, s["mem_used_total"]),
            pages=reply["pages"],
            candidates=reply["candidates"],
            bytes_saved=reply["bytes_saved"],
            seconds=reply["seconds"],
            cpu_seconds=reply["cpu_seconds"],
            pages_per_cpu_second=reply["candidates"] / max(1e-9, reply["cpu_seconds"]),
            dictionary=stats["recompress"]["dictionaries"],
        )
        results["lz4"]["ratio"] = results["lz4"]["ratio_before"]
        if "zram-lz4" in targets:
            results["zram-lz4"]["ratio"] = results["zram-lz4"]["ratio_before"]
        verified = subprocess.run(["cmp", "-n", str(nbytes), corpus.path, rec.path], capture_output=True)
        r["verified"] = verified.returncode == 0
        # QD1 random 4 KiB reads, recompressed against lz4, alternated
        lat: dict[str, list[tuple[float, float, float]]] = {"recompressed": [], "lz4": []}
        for _ in range(repeat):
            for name in lat:
                lat[name].append(fio_randread(targets[name].path, nbytes, latency_seconds, workdir))
        for name, runs in lat.items():
            results[name]["randread_p50_us"] = statistics.median(x[0] for x in runs)
            results[name]["randread_p99_us"] = statistics.median(x[1] for x in runs)
        if budget_seconds:
            lz = targets["lz4"]
            assert isinstance(lz, ZswapdTarget)
            results["budget"] = _measure_budget(lz.sock, budget_percent, budget_seconds)
            results["interference"] = _measure_interference(lz.sock, lz.path, nbytes, workdir, repeat)
    # The ceiling on the same pages: lz4 as written, then zstd at the level
    # with a dictionary trained the daemon's way, kept by the engine's rule.
    data = Path(corpus.path).read_bytes()[:nbytes]
    pages = [data[i : i + PAGE] for i in range(0, len(data), PAGE)]
    dictionary = ceiling_dictionary(pages, dictionary_size) if dictionary_size else None
    primary = ceiling(pages, "lz4")
    secondary = ceiling(pages, "zstd", level, dictionary)
    best = tier(primary, secondary, threshold, engine_rule=True)
    results["ceiling"] = {"lz4": primary.ratio, "tier": best.ratio, "tier_packed": best.packed_ratio,
                          "recompressed": best.recompressed, "dictionary_bytes": len(dictionary or b"")}  # fmt: skip
    mine = results["recompressed"]
    ratios = {
        "recompressed/lz4 ratio": mine["ratio"] / results["lz4"]["ratio"],
        "recompressed/ceiling ratio": mine["ratio"] / best.ratio,
        "recompressed/lz4 randread_p99_us": mine["randread_p99_us"] / results["lz4"]["randread_p99_us"],
        "recompressed/lz4 randread_p50_us": mine["randread_p50_us"] / results["lz4"]["randread_p50_us"],
    }
    i = results.get("interference")
    if i:
        ratios["policy on/off randread_p50_us"] = i["on_p50_us"] / i["off_p50_us"]
        ratios["policy on/off randread_p99_us"] = i["on_p99_us"] / i["off_p99_us"]
    if "zram-lz4" in results:
        ratios["recompressed/zram-lz4 ratio"] = mine["ratio"] / results["zram-lz4"]["ratio"]
        ratios["lz4/zram-lz4 ratio"] = results["lz4"]["ratio"] / results["zram-lz4"]["ratio"]
    results["ratios"] = ratios
    return results


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure_budget(sock: str, percent: float, seconds: float) -> dict[str, float]:
    """The background policy on an idle device full of candidates: its CPU
    over ``seconds`` against ``percent`` of one core, by its own count
    (stats cpu_seconds, from the CPU clocks of the threads that ran it) and
    by the whole worker process's (/proc, which also holds the trio loop
    and the stats calls)."""
    from ..control import request

    for key, value in (("recompress_cpu_percent", percent), ("idle_age", 0), ("recompress", True)):
        reply = request(sock, {"cmd": "set", "key": key, "value": value})
        if not reply.get("ok"):
            raise RuntimeError(f"zswapd set {key}: {reply.get('error')}")

    def sample() -> tuple[float, float, float]:
        s = request(sock, {"cmd": "stats"})
        return time.monotonic(), float(s["recompress"]["cpu_seconds"]), _process_cpu(s["process"]["worker_pid"])

    deadline = time.monotonic() + 30
    while sample()[1] == 0.0:  # the policy's next round (every 10 s)
        if time.monotonic() > deadline:
            raise RuntimeError("the recompression policy did not start within 30 s")
        time.sleep(0.2)
    t0, own0, proc0 = sample()
    time.sleep(seconds)
    t1, own1, proc1 = sample()
    pages = request(sock, {"cmd": "stats"})["recompress"]["recompressed"]
    return {
        "percent": percent,
        "seconds": t1 - t0,
        "own_cpu_percent": 100 * (own1 - own0) / (t1 - t0),
        "process_cpu_percent": 100 * (proc1 - proc0) / (t1 - t0),
        "pages_recompressed": pages,
    }


def _measure_interference(sock: str, dev: str, nbytes: int, workdir: str, pairs: int) -> dict[str, float]:
    """QD1 4 KiB reads of the device whose pages the policy is recompressing,
    with it at the default budget and nearly off (0.1%), in alternating
    windows of INTERFERENCE_SECONDS: what the default costs the hot path.
    The budget applies from the policy's next step."""
    from ..config import RecompressConfig
    from ..control import request

    default = RecompressConfig().cpu_percent
    runs: dict[str, list[tuple[float, float, float]]] = {"on": [], "off": []}
    for _ in range(pairs):
        for state, percent in (("on", default), ("off", 0.1)):
            request(sock, {"cmd": "set", "key": "recompress_cpu_percent", "value": percent})
            runs[state].append(fio_randread(dev, nbytes, INTERFERENCE_SECONDS, workdir))
    out: dict[str, float] = {"percent": default}
    for state, r in runs.items():
        out[f"{state}_p50_us"] = statistics.median(x[0] for x in r)
        out[f"{state}_p99_us"] = statistics.median(x[1] for x in r)
    return out


# Seconds of each window of _measure_interference.
INTERFERENCE_SECONDS = 8
