"""Command line: `zswapd run` starts the daemon; the rest talk to it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from . import __version__
from .config import DEFAULT_PATH, LOG_LEVELS, ConfigError, control_socket, load
from .pool import FULLNESS_LABELS

# The commands that only read from the daemon: they work with a config file
# that does not load (a typo the running daemon refused at SIGHUP), warning
# about it, since all they need from it is the control socket's path.
READ_ONLY_COMMANDS = ("stats", "top", "status")


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return str(n)


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.command in READ_ONLY_COMMANDS:
        path, warning = control_socket(args.config)
        if warning:
            print(f"zswapd: warning: {warning}", file=sys.stderr)
        return path
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"zswapd: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg.control.socket


class CallError(Exception):
    """A request that got no answer, or an error for one.  ``why`` is
    "not running" (no socket, or nobody listening), "denied", "no reply"
    (connected, but no answer in time), "refused" (the daemon's error
    reply) or "error" (anything else)."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def call(path: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request to the daemon at control socket ``path``; its reply.
    Raises CallError, with a message for the user, and nothing else."""
    from .control import request

    try:
        reply = request(path, req, timeout)
    except FileNotFoundError:
        raise CallError(f"the daemon is not running (no control socket at {path})", "not running") from None
    except ConnectionRefusedError:
        raise CallError(f"the daemon is not running (nothing listens on {path})", "not running") from None
    except PermissionError:
        raise CallError(
            f"permission denied on {path} (run as root or as a member of [control] group)", "denied"
        ) from None
    except TimeoutError:
        raise CallError(f"control socket {path}: no reply within {timeout:g} s", "no reply") from None
    except (OSError, ValueError) as e:
        raise CallError(f"control socket {path}: {e}", "error") from None
    if not isinstance(reply, dict):
        raise CallError(f"control socket {path}: not a reply: {str(reply)[:80]}", "error")
    if not reply.get("ok"):
        raise CallError(str(reply.get("error", "unknown error")), "refused")
    return reply


def _call(args: argparse.Namespace, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    try:
        return call(_socket_path(args), req, timeout)
    except CallError as e:
        print(f"zswapd: {e}", file=sys.stderr)
        sys.exit(1)


# A manual recompression pass answers when it is done: a million idle pages
# at zstd level 8 take a few CPU-minutes.
RECOMPRESS_TIMEOUT = 3600.0


def _idle_arg(text: str) -> int:
    from .config import check_value

    try:
        out: int = check_value("--idle-age", "recompress", "idle_age", int(text) if text.isdigit() else text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return out


def _count_arg(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-negative integer")
    return int(text)


def _set_value(text: str) -> object:
    """A `zswapd set` value as JSON would carry it: an integer, true/false,
    a decimal number, or else the string."""
    if text.isdigit():
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def recompress_result(r: dict[str, Any]) -> str:
    """What `zswapd recompress` says about its reply."""
    d = r.get("dictionary")
    return (
        f"recompressed {r['pages']} pages of {r['candidates']} candidates, saved {_human(r['bytes_saved'])} "
        f"({r['bytes_saved']} bytes) in {r['seconds']:.3f}s, {r['cpu_seconds']:.3f} CPU-s; "
        + (f"dictionary {d}" if d else "no dictionary")
    )


def compact_result(r: dict[str, Any]) -> str:
    """What `zswapd compact` (and top's `c`) says about a compact reply."""
    freed = r["frames_freed"]
    return f"freed {freed} frames ({_human(freed * 4096)}), moved {r['objects_moved']} objects in {r['seconds']:.3f}s"


def format_stats(s: dict[str, Any], classes: bool = False) -> str:
    dev = s.get("device", {})
    used, data, compr = s["mem_used_total"], s["orig_data_size"], s["compr_data_size"]
    limit = s["mem_limit"]
    ratio = data / used if used else 0.0
    fill = f"{100 * used / limit:.1f}%" if limit else "-"
    head = ("NAME", "DISKSIZE", "DATA", "COMPR", "TOTAL", "RATIO", "LIMIT", "FILL", "ALGORITHM")
    row = (
        dev.get("loop") or dev.get("path", "?"),
        _human(dev.get("size", 0)),
        _human(data),
        _human(compr),
        _human(used),
        f"{ratio:.2f}",
        _human(limit) if limit else "none",
        fill,
        s["algorithm"],
    )
    widths = [max(len(a), len(b)) for a, b in zip(head, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join(r.ljust(w) for r, w in zip(row, widths))]
    lines.append(
        f"pages {s['pages_stored']} (same {s['same_pages']}, huge {s['huge_pages']}); "
        f"freed by discard {s['notify_free']}; compacted {s['pages_compacted']} frames; "
        f"failed writes {s['failed_writes']}; metadata {_human(s['metadata_bytes'])}"
        + ("; FULL" if s.get("full") else "")
    )
    wb = s.get("writeback")
    if isinstance(wb, dict):
        lat = wb.get("read_latency_p99_us")
        limit = wb["daily_limit"]
        lines.append(
            f"writeback {wb['file']} ({_human(wb['size'])}): {s.get('bd_count', 0)} pages, live "
            f"{_human(wb['live_bytes'])}, dead {_human(wb['dead_bytes'])}; read {s.get('bd_reads', 0)}, written "
            f"{s.get('bd_writes', 0)} pages; segments cleaned {wb['segments_cleaned']}; today "
            f"{_human(wb['written_today'])}"
            + (f" of {_human(limit)}" if limit else "")
            + (f"; read p99 <= {lat} us" if lat is not None else "")
        )
    proc = s.get("process")
    if proc:
        rec = proc.get("last_recovery_ms")
        lines.append(
            f"engine {s.get('engine', '?')}; supervisor {proc['supervisor_pid']}, worker {proc['worker_pid']}, "
            f"worker restarts {proc['worker_restarts']}"
            + (f" (last took {rec:.0f} ms)" if rec is not None else "")
            + (
                f"; supervisor restarts {proc['supervisor_restarts']} (this one: {proc.get('supervisor_start', '?')})"
                if "supervisor_restarts" in proc
                else ""
            )
        )
    lines += _tier_lines(s)
    if classes:
        cols = (
            "size",
            "frames_per_zspage",
            "objs_per_zspage",
            "obj_allocated",
            "obj_used",
            "zspages",
            "frames_used",
            "freeable",
        )
        # Zspages by fullness after the size, as the kernel's zsmalloc
        # classes file has them (a daemon that does not report them: none).
        groups = FULLNESS_LABELS if all("fullness" in c for c in s["classes"]) else ()
        lines.append("")
        lines.append(f"{cols[0]:>6}" + "".join(f" {g:>5}" for g in groups) + "".join(f" {c:>17}" for c in cols[1:]))
        for c in s["classes"]:
            if c["zspages"]:
                lines.append(
                    f"{c[cols[0]]:>6}"
                    + "".join(f" {n:>5}" for n in (c["fullness"] if groups else ()))
                    + "".join(f" {c[k]:>17}" for k in cols[1:])
                )
    return "\n".join(lines)


def _tier_lines(s: dict[str, Any]) -> list[str]:
    """The recompression tier: a line of its counters, the per-codec table
    and the idle histogram."""
    r = s.get("recompress")
    if not isinstance(r, dict):
        return []
    lines = [
        f"recompressed {r['pages']} pages now, saved {_human(r['bytes_saved'])}; skipped {r['skipped']}, "
        f"incompressible {r['incompressible']}; cpu {r['cpu_seconds']:.1f} s; "
        + (", ".join(f"dictionary {d['id']}: {_human(d['bytes'])}, {d['pages']} pages" for d in r["dictionaries"])
           or "no dictionary")
    ]  # fmt: skip
    codecs = s.get("codecs") or []
    if codecs:
        lines.append("")
        lines.append(f"{'CODEC':<8} {'TIER':<13} {'DICT':>4} {'PAGES':>10} {'BYTES':>10} {'AVG':>6}")
        for c in codecs:
            avg = f"{c['bytes'] / c['pages']:.0f}" if c["pages"] and c["codec"] != "same" else "-"
            lines.append(
                f"{c['codec']:<8} {c['tier']:<13} {c['dictionary'] or '-':>4} {c['pages']:>10} "
                f"{_human(c['bytes']):>10} {avg:>6}"
            )
    idle = s.get("idle") or []
    if idle:
        lines.append("idle: " + ", ".join(f">={_age(b['min_age_seconds'])} {b['pages']}" for b in idle))
    return lines


def _age(seconds: int) -> str:
    """An idle age, rounded down to the largest unit that fits."""
    for unit, n in (("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `zswapd stats | head`: the reader left; exit quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Every command and option; zswapd/manpage.py writes zswapd(8) from it."""
    parser = argparse.ArgumentParser(prog="zswapd", description="userspace compressed swap daemon")
    parser.add_argument("--version", action="version", version=f"zswapd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help=f"config file (default {DEFAULT_PATH} if present)")
        p.add_argument("--socket", metavar="PATH", help="control socket path (overrides the config)")

    p_run = sub.add_parser("run", help="run the daemon in the foreground")
    p_run.add_argument(
        "--config", metavar="FILE", help=f"config file (default {DEFAULT_PATH} if present, else built-in defaults)"
    )
    p_run.add_argument("-v", "--verbose", action="store_true", help="log at debug level, whatever [log] level says")
    # Internal: a worker whose supervisor died starts a new one with the
    # socket its fds come on (supervisor.py, "who restarts whom").
    p_run.add_argument("--adopt", metavar="FD", type=int, help=argparse.SUPPRESS)
    p_stats = sub.add_parser("stats", help="show compression and memory statistics")
    with_target(p_stats)
    p_stats.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p_stats.add_argument("--classes", action="store_true", help="add the per-class table")
    p_stats.add_argument("--prometheus", action="store_true", help="print Prometheus text-format metrics")
    p_compact = sub.add_parser("compact", help="run a full compaction now")
    with_target(p_compact)
    p_recompress = sub.add_parser(
        "recompress", help="recompress idle pages now (zram's recompress), with the current dictionary"
    )
    with_target(p_recompress)
    p_recompress.add_argument(
        "--idle-age",
        metavar="S",
        type=_idle_arg,
        help='only pages idle at least this long: seconds, or "90s", "30m", "2h" (default [recompress] idle_age)',
    )
    p_recompress.add_argument(
        "--max-pages", metavar="N", type=_count_arg, help="compress at most N candidate pages (default: all)"
    )
    p_recompress.add_argument(
        "--threshold",
        metavar="B",
        type=_count_arg,
        help="keep a page only if it shrinks by B bytes, 0..4096 (default [recompress] threshold)",
    )
    p_wb = sub.add_parser(
        "writeback", help="write pool pages back to the backing file now, as zram's writeback; returns when done"
    )
    with_target(p_wb)
    p_wb.add_argument(
        "--idle-age",
        metavar="S",
        type=_idle_arg,
        help='only pages idle at least this long: seconds, or "90s", "30m", "2h" (default: every page, oldest first)',
    )
    p_wb.add_argument("--max-pages", metavar="N", type=_count_arg, help="write back at most N pages (default: all)")
    p_set = sub.add_parser("set", help="change a runtime setting, e.g. memory_limit=1G")
    with_target(p_set)
    p_set.add_argument("assignment", help="KEY=VALUE")
    p_reload = sub.add_parser(
        "reload", help="replace the worker with one running the code installed now (an upgrade without swapoff)"
    )
    with_target(p_reload)
    p_reset = sub.add_parser("reset-max", help="reset mem_used_max")
    with_target(p_reset)
    p_check = sub.add_parser("check-config", help="validate a config file and print the result")
    p_check.add_argument("--config", metavar="FILE", help=f"the file to check (default {DEFAULT_PATH} if present)")
    p_bench = sub.add_parser("bench", help="benchmarks against baselines in the same run (docs/benchmarks.md)")
    p_bench.add_argument(
        "what",
        nargs="?",
        default="device",
        choices=["device", "pool", "app", "recompress", "tiers"],
        help="device: real memory pages through zswapd, zram and a tmpfs loop device; pool: the store against bare "
        "lz4; app: a program swapping in a memory cgroup; recompress: the recompression tier's ratio against zram "
        "lz4 and the per-page ceiling, its CPU and its read latency; tiers: zswapd's writeback against zram with a "
        "swap file and the kernel's zswap, on an LRU-inversion workload (default: device)",
    )
    p_bench.add_argument("--pages", type=int, default=20000, help="pool: pages to store")
    p_bench.add_argument("--corpus", help="device, recompress: a file of raw 4 KiB pages instead of captured memory")
    p_bench.add_argument("--corpus-size", default="128M", help="device, recompress: how much process memory to capture")
    p_bench.add_argument("--algorithms", default="lz4,zstd", help="device: comma-separated")
    p_bench.add_argument(
        "--repeat", type=int, default=3, help="device, recompress: runs per figure (the median is reported)"
    )
    p_bench.add_argument(
        "--latency-seconds",
        type=int,
        default=5,
        help="device, recompress: seconds of each QD1 random-read latency run",
    )
    p_bench.add_argument("--json", action="store_true", help="print the results as JSON")
    p_bench.add_argument(
        "--baseline-src",
        help="device: also run the zswapd of this source tree (e.g. a worktree of the previous commit)",
    )
    p_bench.add_argument("--plot", help="device: write a bar chart of the ratios (needs matplotlib)")
    p_bench.add_argument(
        "--budget-percent", type=float, default=2.0, help="recompress: the CPU budget whose keeping is measured"
    )
    p_bench.add_argument(
        "--budget-seconds", type=float, default=60.0, help="recompress: how long it is measured (0: not at all)"
    )
    p_bench.add_argument(
        "--recompress",
        action="store_true",
        help="app: zswapd with its recompression on every page (idle_age 0) against it off, instead of tmpfs",
    )
    p_bench.add_argument("--program", default="sort", choices=["sort", "xz"], help="app: the program to run")
    p_bench.add_argument("--input-size", default="192M", help="app: size of the program's generated input")
    p_bench.add_argument(
        "--limit-ratio", type=float, default=1.5, help="app: working set / memory limit (1.3 to 2 is the target range)"
    )
    p_bench.add_argument(
        "--fuse-threads",
        type=int,
        help="device, app: [fuse] threads of zswapd and of the --baseline-src build (default: each one's own default)",
    )
    p_bench.add_argument("--timeout", type=float, default=1800, help="app: seconds before a run counts as timed out")
    p_bench.add_argument("--cold", default="768M", help="tiers: the cold set, touched once")
    p_bench.add_argument("--hot", default="512M", help="tiers: the hot set, cycled over")
    p_bench.add_argument("--cgroup-limit", default="128M", help="tiers: the workload's memory cgroup limit")
    p_bench.add_argument(
        "--tier-memory",
        help="tiers: memory of the compressed tier, every target (default: 1%% of RAM, the least zswap's "
        "max_pool_percent gives; zswap gets the nearest whole percent)",
    )
    p_bench.add_argument("--cycles", type=int, default=3, help="tiers: passes over the hot set")
    p_bench.add_argument("--latency-size", default="64M", help="tiers: pages written back for the read latency")
    p_bench.add_argument(
        "--disk-dir", default="/var/tmp", help="tiers: where the backing file and the swap file go (a disk filesystem)"
    )
    p_bench.add_argument(
        "--targets", default="zswapd,zram,zswap", help="tiers: comma-separated, from zswapd,zram,zswap"
    )
    p_top = sub.add_parser("top", help="live view of memory, rates, tiers and size classes (keys: q, c, s)")
    with_target(p_top)
    p_top.add_argument(
        "-d", "--delay", type=float, default=1.0, metavar="SECONDS", help="seconds between updates (default 1)"
    )
    p_top.add_argument(
        "-n", "--iterations", type=int, metavar="N", help="stop after N updates (default: until q or Ctrl-C)"
    )
    p_status = sub.add_parser(
        "status", help="one line; exit 0 serving, 1 degraded, 3 not running, 4 unknown (as systemctl is-active)"
    )
    with_target(p_status)
    for choice in sub._choices_actions:  # each command's --help opens with its line in the list
        sub.choices[choice.dest].description = choice.help
    return parser


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        # Internal: a worker started by the supervisor (zswapd reload).
        from .worker import main_exec

        return main_exec()
    args = parser.parse_args(argv)

    if args.command == "run":
        from .process import setup_logging
        from .run import main_run

        setup_logging(args.verbose)
        # Absolute before the supervisor leaves this directory: a reload's
        # worker reads the file again from /.
        config = os.path.abspath(args.config) if args.config else None
        try:
            cfg = load(config, strict=True)
        except ConfigError as e:
            print(f"zswapd: {e}", file=sys.stderr)
            return 2
        if not args.verbose:  # -v means debug, whatever [log] level says
            logging.getLogger("zswapd").setLevel(LOG_LEVELS[cfg.log.level])
        return main_run(cfg, config, args.adopt)
    if args.command == "check-config":
        try:
            cfg = load(args.config, strict=True)
        except ConfigError as e:
            print(f"zswapd: {e}", file=sys.stderr)
            return 2
        from dataclasses import asdict

        print(json.dumps(asdict(cfg), indent=2))
        return 0
    if args.command == "stats":
        s = _call(args, {"cmd": "stats"})
        if args.json:
            print(json.dumps(s, indent=2))
        elif args.prometheus:
            from .control import prometheus

            sys.stdout.write(prometheus(s))
        else:
            print(format_stats(s, args.classes))
        return 0
    if args.command == "compact":
        print(compact_result(_call(args, {"cmd": "compact"})))
        return 0
    if args.command == "recompress":
        req: dict[str, Any] = {"cmd": "recompress"}
        for key in ("idle_age", "max_pages", "threshold"):
            if getattr(args, key) is not None:
                req[key] = getattr(args, key)
        # a pass over a large pool takes a while: it answers when done
        print(recompress_result(_call(args, req, RECOMPRESS_TIMEOUT)))
        return 0
    if args.command == "writeback":
        wreq: dict[str, Any] = {"cmd": "writeback"}
        if args.idle_age is not None:
            wreq["idle_age"] = args.idle_age
        if args.max_pages is not None:
            wreq["max_pages"] = args.max_pages
        r = _call(args, wreq, RECOMPRESS_TIMEOUT)
        print(
            f"wrote back {r['pages']} pages ({_human(r['bytes'])} in the file) in {r['seconds']:.3f}s"
            + (f"; stopped: {r['stopped']}" if r.get("stopped") else "")
        )
        return 0
    if args.command == "set":
        key, sep, value = args.assignment.partition("=")
        if not sep:
            print("zswapd: expected KEY=VALUE, e.g. memory_limit=1G", file=sys.stderr)
            return 2
        val: Any = _set_value(value)
        r = _call(args, {"cmd": "set", "key": key.strip(), "value": val})
        print(f"{r['key']} = {r['value']}")
        if r.get("warning"):
            print(f"warning: {r['warning']}", file=sys.stderr)
        return 0
    if args.command == "reload":
        process = _call(args, {"cmd": "stats"}).get("process")
        if not isinstance(process, dict):
            print("zswapd: this daemon has no supervisor to replace its worker; restart it instead", file=sys.stderr)
            return 1
        before = process["worker_pid"]
        _call(args, {"cmd": "reload"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                now = _call(args, {"cmd": "stats"})["process"]
            except SystemExit:
                continue
            if now["worker_pid"] != before:
                took = now["last_recovery_ms"]
                # The recovery time is known once a FUSE request has been served.
                print(f"worker {before} replaced by {now['worker_pid']}" + (f" in {took} ms" if took else ""))
                return 0
        print(f"zswapd: worker {before} was not replaced within 60 s; see the daemon's log", file=sys.stderr)
        return 1
    if args.command == "top":
        from .top import MAX_DELAY, MIN_DELAY, run_top

        if not MIN_DELAY <= args.delay <= MAX_DELAY or (args.iterations is not None and args.iterations < 1):
            print(f"zswapd top: -d: expected {MIN_DELAY:g} to {MAX_DELAY:g} seconds; -n: expected 1 or more",
                  file=sys.stderr)  # fmt: skip
            return 2
        return run_top(_socket_path(args), args.delay, args.iterations)
    if args.command == "status":
        return _status(_socket_path(args))
    if args.command == "reset-max":
        r = _call(args, {"cmd": "reset_max"})
        print(f"mem_used_max = {r['mem_used_max']}")
        return 0
    if args.command == "bench":
        from .bench import bench_app, bench_device, bench_pool, bench_recompress, bench_tiers
        from .config import parse_size

        algorithms = tuple(a for a in args.algorithms.split(",") if a)
        for name, value in (
            ("--pages", args.pages),
            ("--repeat", args.repeat),
            ("--latency-seconds", args.latency_seconds),
        ):
            if value < 1:
                print(f"zswapd bench: {name} {value}: expected a positive number", file=sys.stderr)
                return 2
        if not algorithms or not set(algorithms) <= {"lz4", "zstd"}:
            print(f"zswapd bench: --algorithms {args.algorithms!r}: expected lz4, zstd or lz4,zstd", file=sys.stderr)
            return 2
        if args.fuse_threads is not None and args.fuse_threads < 0:
            print(
                f"zswapd bench: --fuse-threads {args.fuse_threads}: expected 0 (one per CPU) or more", file=sys.stderr
            )
            return 2
        if args.what == "pool":
            return bench_pool(args.pages, args.json)
        if args.what == "recompress":
            try:
                corpus_size = parse_size(args.corpus_size)
                if corpus_size < 1 << 20:
                    raise ValueError("too small")
            except ValueError:
                print(f"zswapd bench: --corpus-size {args.corpus_size!r}: expected a size of 1M or more, e.g. 128M",
                      file=sys.stderr)  # fmt: skip
                return 2
            if not 0.1 <= args.budget_percent <= 100 or args.budget_seconds < 0:
                print("zswapd bench: --budget-percent: expected 0.1 to 100; --budget-seconds: expected >= 0",
                      file=sys.stderr)  # fmt: skip
                return 2
            return bench_recompress(corpus_size, args.corpus, args.repeat, args.latency_seconds, as_json=args.json,
                                    budget_percent=args.budget_percent, budget_seconds=args.budget_seconds)  # fmt: skip
        if args.what == "tiers":
            sizes: dict[str, int] = {}
            for opt, text in (("--cold", args.cold), ("--hot", args.hot), ("--cgroup-limit", args.cgroup_limit),
                              ("--tier-memory", args.tier_memory or "0"), ("--latency-size", args.latency_size),
                              ("--corpus-size", args.corpus_size)):  # fmt: skip
                try:
                    sizes[opt] = parse_size(text)
                except ValueError:
                    sizes[opt] = -1
                if sizes[opt] < (0 if opt == "--tier-memory" else 1 << 20):
                    print(f"zswapd bench: {opt} {text!r}: expected a size of 1M or more, e.g. 128M", file=sys.stderr)
                    return 2
            targets = tuple(t for t in args.targets.split(",") if t)
            if not targets or not set(targets) <= {"zswapd", "zram", "zswap"} or len(set(targets)) != len(targets):
                print(f"zswapd bench: --targets {args.targets!r}: expected some of zswapd,zram,zswap", file=sys.stderr)
                return 2
            if args.cycles < 1:
                print(f"zswapd bench: --cycles {args.cycles}: expected a positive number", file=sys.stderr)
                return 2
            return bench_tiers(sizes["--cold"], sizes["--hot"], sizes["--cgroup-limit"], sizes["--tier-memory"],
                               args.cycles, args.repeat, args.latency_seconds, sizes["--latency-size"],
                               sizes["--corpus-size"], args.corpus, args.disk_dir, targets, args.json)  # fmt: skip
        if args.what == "app":
            try:
                input_size = parse_size(args.input_size)
                if input_size < 1 << 20:
                    raise ValueError("too small")
            except ValueError:
                print(f"zswapd bench: --input-size {args.input_size!r}: expected a size of 1M or more, e.g. 192M",
                      file=sys.stderr)  # fmt: skip
                return 2
            if not 1.0 <= args.limit_ratio <= 10.0 or not args.timeout > 0:
                print("zswapd bench: --limit-ratio: expected 1 to 10; --timeout: expected > 0", file=sys.stderr)
                return 2
            return bench_app(args.program, input_size, args.limit_ratio, args.repeat, algorithms[0], args.timeout,
                             args.json, args.fuse_threads, args.recompress)  # fmt: skip
        try:
            corpus_size = parse_size(args.corpus_size)
            if corpus_size < 1 << 20:
                raise ValueError("too small")
        except ValueError:
            print(
                f"zswapd bench: --corpus-size {args.corpus_size!r}: expected a size of 1M or more, e.g. 128M",
                file=sys.stderr,
            )
            return 2
        return bench_device(
            corpus_size=corpus_size,
            corpus_file=args.corpus,
            algorithms=algorithms,
            repeat=args.repeat,
            latency_seconds=args.latency_seconds,
            as_json=args.json,
            plot=args.plot,
            baseline_src=args.baseline_src,
            fuse_threads=args.fuse_threads,
        )
    return 2


# `zswapd status` gives up waiting for a reply after this long: a daemon
# that answers nothing for 5 s is not serving well (a worker starting, or
# stuck), and a monitoring script must not hang.
STATUS_TIMEOUT = 5.0


def _status(path: str) -> int:
    from .health import DEGRADED, NOT_RUNNING, UNKNOWN, summary

    try:
        s = call(path, {"cmd": "stats"}, STATUS_TIMEOUT)
    except CallError as e:
        code = {"not running": NOT_RUNNING, "no reply": DEGRADED}.get(e.why, UNKNOWN)
        # The one line on stdout, as systemctl is-active prints "inactive".
        print(str(e) if code == NOT_RUNNING else f"{'degraded' if code == DEGRADED else 'unknown'}: {e}")
        return code
    code, line = summary(s)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
