"""What a benchmark prints: the tables of ``bench device``, ``bench app`` and
``bench recompress``, the bar chart of the ratios (``--plot``), and a failed
run said in one line with its exit status.  No measurement here: the results are dicts the
benchmarks made (their JSON is the same dict).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from .corpus import MIB, PAGE


def failed(name: str, e: BaseException) -> int:
    """A bench command's failure, said in one line: its exit status."""
    if isinstance(e, KeyboardInterrupt):
        print(f"{name}: interrupted; cleaned up", file=sys.stderr)
        return 130
    if isinstance(e, subprocess.CalledProcessError):
        tool = e.cmd[0] if isinstance(e.cmd, list) else e.cmd
        print(f"{name}: {tool} failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 1
    print(f"{name}: {e}", file=sys.stderr)
    return 1


def format_device(r: dict[str, Any]) -> str:
    c = r["corpus"]
    lines = [
        f"corpus: {c['pages']} pages ({c['pages'] * PAGE / MIB:.0f} MiB) of real process memory; "
        f"zero {c['zero_share']:.1%}, same-filled {c['same_filled_share']:.1%}; sources {c['sources']}",
        "codec ceiling (one core): " + ", ".join(f"{k} {v:.0f}" for k, v in r["codec_ceiling"].items()),
        "",
    ]
    targets = [k for k in r if k not in ("corpus", "codec_ceiling", "ratios", "serving", "engine_module")]
    cols = ["write_MBps", "read_MBps", "randread_p50_us", "randread_p99_us", "ratio", "frag_after_discard",
            "frag_after_compact", "metadata_B_per_page", "verified"]  # fmt: skip
    lines.append(f"{'target':14}" + "".join(f"{col:>21}" for col in cols))
    for t in targets:
        lines.append(f"{t:14}" + "".join(f"{r[t].get(col, float('nan')):>21.2f}" for col in cols))
    lines.append("")
    for name, how in r.get("serving", {}).items():
        lines.append(f"  {name} served by: {how}")
    if "engine_module" in r:
        lines.append(f"  engine module: {r['engine_module']}")
    for k, v in r["ratios"].items():
        lines.append(f"  {k:52} {v:8.2f}")
    return "\n".join(lines)


def plot_ratios(r: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'zswapd[plot]'", file=sys.stderr)
        return
    items = list(r["ratios"].items())
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("ratio")
    fig.tight_layout()
    fig.savefig(path)


def format_recompress(r: dict[str, Any]) -> str:
    mine, c = r["recompressed"], r["ceiling"]
    lines = [
        f"corpus: {r['corpus']['pages']} pages",
        f"ratio (orig_data_size / mem_used_total): zswapd lz4 {r['lz4']['ratio']:.3f}, recompressed "
        f"{mine['ratio']:.3f}" + (f", zram lz4 {r['zram-lz4']['ratio']:.3f}" if "zram-lz4" in r else ""),
        f"ceiling (per page, same level and dictionary, the engine's keep rule): {c['tier']:.3f} "
        f"(packed into full zspages {c['tier_packed']:.3f}; lz4 alone {c['lz4']:.3f})",
        f"pass: {mine['pages']} of {mine['candidates']} candidates recompressed, {mine['bytes_saved']} bytes saved, "
        f"{mine['cpu_seconds']:.2f} CPU-s ({mine['pages_per_cpu_second']:.0f} pages per CPU-second), "
        f"{mine['seconds']:.2f} s; verified {mine['verified']}",
        f"QD1 4 KiB read p50/p99 us: recompressed {mine['randread_p50_us']:.1f}/{mine['randread_p99_us']:.1f}, "
        f"lz4 {r['lz4']['randread_p50_us']:.1f}/{r['lz4']['randread_p99_us']:.1f}",
    ]
    b = r.get("budget")
    if b:
        lines.append(
            f"budget {b['percent']:g}% over {b['seconds']:.0f} s: its own CPU clock {b['own_cpu_percent']:.2f}%, "
            f"the worker process {b['process_cpu_percent']:.2f}% ({b['pages_recompressed']} pages recompressed)"
        )
    i = r.get("interference")
    if i:
        lines.append(
            f"QD1 4 KiB read p50/p99 us while the policy recompresses that device at {i['percent']:g}%: "
            f"{i['on_p50_us']:.1f}/{i['on_p99_us']:.1f}; at 0.1%: {i['off_p50_us']:.1f}/{i['off_p99_us']:.1f}"
        )
    lines += [f"  {k}: {v:.3f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def format_app(r: dict[str, Any]) -> str:
    lines = [
        f"{r['program']}: {' '.join(r['argv'])}",
        f"input {r['input_bytes'] / MIB:.0f} MiB; peak charge without a limit {r['peak_bytes'] / MIB:.0f} MiB "
        f"in {r['unlimited_wall_s']:.1f} s; limit {r['limit_bytes'] / MIB:.0f} MiB "
        f"(working set {r['working_set_over_limit']:.2f}x the limit)",
        f"zswapd served by: {r['zswapd_serving']}; engine module {r['engine_module']}",
        "",
        f"{'target':12}{'runs':>6}{'ok':>5}{'oom':>5}{'timeout':>9}{'wall s':>9}{'pswpin':>10}{'pswpout':>10}",
    ]
    for name, t in r["targets"].items():
        lines.append(
            f"{name:12}{t['runs']:>6}{t['ok']:>5}{t['oom_killed']:>5}{t['timeouts']:>9}"
            f"{t.get('wall_s', float('nan')):>9.2f}{t.get('pswpin', float('nan')):>10.0f}"
            f"{t.get('pswpout', float('nan')):>10.0f}"
            + (f"  other failures: {t['other_failures']}" if t["other_failures"] else "")
        )
    lines.append("")
    for run in r["runs"]:
        lines.append(f"  {run['target']:12} {run['status']:14} {run['wall_s']:8.2f} s  pswpin {run['pswpin']}")
    for k, v in r["ratios"].items():
        lines.append(f"  {k:58} {v:6.2f}")
    if r["wrong_output"]:
        lines.append(f"WRONG OUTPUT in {len(r['wrong_output'])} run(s): the program's output differed from the "
                     "run without swap")  # fmt: skip
    return "\n".join(lines)


def format_tiers(r: dict[str, Any]) -> str:
    s = r["sizes"]
    lines = [
        f"corpus: {r['corpus']['pages']} pages of real process memory, {r['corpus']['stored_pages']} not same-filled "
        f"(the workload's pages); zram lz4 ratio on them {s['zram_ratio']:.2f}",
        f"workload: cold {s['cold'] / MIB:.0f} MiB touched once, then {s['cycles']} cycles over hot "
        f"{s['hot'] / MIB:.0f} MiB (every page read, checked and written) in a {s['cgroup'] / MIB:.0f} MiB memory "
        "cgroup",
        f"compressed tier memory M = {s['tier'] / MIB:.0f} MiB: zswapd memory_limit; zram disksize "
        f"{s['zram_disksize'] / MIB:.0f} MiB (M x ratio); zswap max_pool_percent {s['zswap_percent']} "
        f"= {s['zswap_bytes'] / MIB:.0f} MiB, compressor {r['zswap_compressor'] or '-'}",
        f"disk: {r['disk']} (bytes written: its stat field 7 x 512, from the start of a run to the end of its hot "
        f"phase); zswap figures from {r['zswap_stats_source']}",
        "hot s, disk MiB, written back, to disk, disk space and tier MiB: medians over the runs whose hot phase "
        "finished (ok); B/page: medians over every run that sent pages to the disk, up to its end or failure",
        f"zswapd served by: {r['zswapd_serving']}",
        "",
        f"{'target':8}{'runs':>5}{'ok':>4}{'hot s':>8}{'disk MiB':>10}{'written back':>14}{'B/page wb':>11}"
        f"{'to disk':>10}{'B/page disk':>13}{'disk space MiB':>16}{'tier MiB':>10}",
    ]
    nan = float("nan")
    for name, t in r["targets"].items():
        lines.append(
            f"{name:8}{t['runs']:>5}{t['ok']:>4}{t.get('hot_s', nan):>8.2f}{t.get('disk_bytes', nan) / MIB:>10.1f}"
            f"{t.get('written_back', nan):>14.0f}{t.get('disk_bytes_per_page_written_back', nan):>11.0f}"
            f"{t.get('pages_to_disk', nan):>10.0f}{t.get('disk_bytes_per_page_to_disk', nan):>13.0f}"
            f"{t.get('disk_space', nan) / MIB:>16.1f}{t.get('tier_bytes', nan) / MIB:>10.1f}"
            + (f"  failures: {t['failures']}" if t["failures"] else "")
            + (f"  verification failed after the hot phase: {t['verify_failures']}" if t["verify_failures"] else "")
        )
    lines.append("")
    for run in r["runs"]:
        lines.append(
            f"  rep {run['rep']} {run['target']:7} {run['status']:10} verify {run['verify']:10} hot {run['hot_s']:7.2f} s "
            "(cycles "
            + " ".join(f"{c:.2f}" for c in run["cycle_s"])
            + f"), disk {run['disk_bytes'] / MIB:.1f} MiB, written back {run['written_back']}, to disk "
            f"{run['pages_to_disk']}, pswpin {run['pswpin']}, pswpout {run['pswpout']}, bad pages "
            f"{run['hot_bad']}+{run['verified_bad']}; s: setup {run['setup_s']:.1f}, to hot end {run['run_s']:.1f}, "
            f"verify {run['verify_s']:.1f}, all {run['wall_s']:.1f}; fill {run['fill_s']:.1f} s; {run['detail']}"
        )
    for k, v in r["ratios"].items():
        lines.append(f"  {k:58} {v:6.2f}")
    lat = r["latency"]
    if lat:
        b, d, rb = lat["zswapd-backed"], lat["disk-file"], lat["readback"]
        lines += [
            "",
            f"QD1 4 KiB O_DIRECT random reads, {lat['pages']} pages, all {lat['written_back']} written back "
            f"(verified {lat['verified']}): zswapd device p50/p99 {b['p50_us']:.1f}/{b['p99_us']:.1f} us, a file on the "
            f"same disk {d['p50_us']:.1f}/{d['p99_us']:.1f} us; p99 ratio {lat['p99 zswapd-backed/disk-file']:.2f}; "
            f"the daemon's own backed-read p99 bound {b['daemon_read_p99_us']} us",
            f"read-back policy: after reading every page once, pages in the file {rb['bd_count_before']} -> "
            f"{rb['bd_count_after']} ({rb['bd_reads']} backed reads), pool {rb['pool_bytes_before']} -> "
            f"{rb['pool_bytes_after']} bytes; after the fio runs {b['bd_count_after_fio']} in the file",
        ]
    return "\n".join(lines)
