"""``zswapd bench tiers``: writeback against the kernel's two ways of putting
a disk behind compressed memory, on an LRU-inversion workload, in one run.

The workload (tiers_workload.py) runs in a cgroup-v1 memory cgroup: it
touches a cold set once, then cycles over a hot set; cold plus hot is more
than the cgroup and the compressed tier hold together, hot alone fits in
them.  Each target gives the compressed tier the same memory M and puts
the same disk (the filesystem of ``--disk-dir``, ext4 on the VM's disk
here) behind it:

``zswapd``  zswapd with [pool] memory_limit = M and writeback to a backing
            file in the disk directory (the daemon's defaults otherwise);
``zram``    zram lz4 whose disksize holds about M of compressed memory
            (the corpus's own ratio on zram, measured first), swap at a
            higher priority than a swap file in the disk directory;
``zswap``   the kernel's zswap (shrinker on, max_pool_percent for M, the
            crypto API's lzo-rle or lzo) in front of that swap file.

Only one is swap at a time; whatever swap was on at the start is turned off
first and back on at the end.  The targets rotate within each repetition;
medians over the runs.  Per run: the hot phase's wall time (the program's
own clock), bytes written to the disk (its /sys/dev/block stat, field 7,
over the run up to the end of the hot phase), pages written back (zswapd
bd_writes, zswap written_back_pages or vmstat zswpwb), disk space used,
compressed memory, and every page compared after the hot phase.  Then, in
the same command: QD1 4 KiB O_DIRECT random reads of a zswapd device whose
pages are all written back, against the same reads of a file on the same
disk, alternated; and whether those reads brought pages back to the pool.

Fail closed: every way out (return, exception, Ctrl-C, SIGTERM, SIGHUP)
kills the workload, removes its cgroup, turns the swap off, resets zram,
puts zswap's parameters back, stops the daemons and removes the files.

Owns: that benchmark, its sizes and its summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import libc
from ..codec import fill_word
from .app import CGROUP_V1, MemCgroup
from .corpus import MIB, PAGE, capture_corpus, create_private, describe_corpus, exit_on_signals, private_dir
from .device import fio_randread
from .report import failed, format_tiers
from .targets import (
    DiskSwapFile,
    KernelZswap,
    ZramSwap,
    ZramTarget,
    ZswapdTarget,
    cannot_set_up,
    sh,
    swap_used,
    swaps,
)

WORKLOAD = str(Path(__file__).with_name("tiers_workload.py"))
TARGETS = ("zswapd", "zram", "zswap")
# The compressed tier's swap priority, and the disk swap file's below it.
TIER_PRIORITY = 100
FILE_PRIORITY = 10
# Headroom of the swap areas over twice the workload's pages: other
# processes' pages (this VM's DAMON pages out anyone's cold memory into any
# swap).  Twice, so swap stays under half full: past that (vm_swap_full)
# the kernel frees a slot at every swap-in, and each target would be
# measured in the kernel's other regime.
SWAP_SLACK = 128 * MIB
# Seconds one run may take before it counts as timed out.
RUN_TIMEOUT = 900.0


def _disk_stat_path(directory: str) -> Path:
    """The block layer's stat file of the disk ``directory`` lives on."""
    st = os.stat(directory)
    return Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")


def _sectors_written(stat: Path) -> int:
    return int(stat.read_text().split()[6])  # field 7: sectors (512 B) written


def _vmstat(*keys: str) -> dict[str, int]:
    lines = Path("/proc/vmstat").read_text().splitlines()
    return {k: int(v) for k, v in (line.split() for line in lines) if k in keys}


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


@contextlib.contextmanager
def _others_swap_off() -> Iterator[list[tuple[str, int]]]:
    """Turn off the swap areas on at the start (each run needs its target
    as the only swap) and turn them back on, with their priorities, on
    every way out."""
    found = []
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        parts = line.split()
        found.append((parts[0], int(parts[4])))
    off: list[tuple[str, int]] = []
    try:
        for path, prio in found:
            sh("swapoff", path)
            off.append((path, prio))
        yield found
    finally:
        for path, prio in off:
            subprocess.run(["swapon", "--priority", str(prio), path], capture_output=True)


def _pages_file(corpus_path: str, out: str) -> int:
    """The corpus without its same-filled pages (which no tier stores as
    data: zero pages never reach swap here, and a tag would make any fill
    compress to nothing), as the workload's pages; returns their number."""
    data = Path(corpus_path).read_bytes()
    n = 0
    with os.fdopen(create_private(out), "wb") as f:
        for i in range(len(data) // PAGE):
            page = data[i * PAGE : (i + 1) * PAGE]
            if fill_word(page) is None:
                f.write(page)
                n += 1
    return n


def _zram_ratio(pages_path: str, pages: int) -> float:
    """orig_data_size / mem_used_total of zram lz4 holding the pages (up to
    64 MiB of them): how much data a zram of M bytes of memory holds."""
    n = min(pages, 64 * MIB // PAGE)
    z = ZramTarget(-(-n * PAGE // MIB) * MIB, "lz4")
    try:
        sh("dd", f"if={pages_path}", f"of={z.path}", "bs=4K", f"count={n}", "oflag=direct", "status=none")
        s = z.stats()
        return s["orig_data_size"] / max(1, s["mem_used_total"])
    finally:
        z.close()


@contextlib.contextmanager
def _pinned(path: str) -> Iterator[None]:
    """The pages file locked in memory while the bench runs.  It lives on
    tmpfs (the corpus never reaches a disk); unlocked, reclaim or this VM's
    DAMON could swap its pages out between runs, and the workload's reads
    would then swap them in charged to its own cgroup."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = libc.mmap(size, libc.PROT_READ, libc.MAP_SHARED, fd)
    finally:
        os.close(fd)
    try:
        libc.mlock(addr, size)
        yield
    finally:
        libc.munmap(addr, size)


@dataclass
class Sizes:
    cold: int
    hot: int
    cgroup: int
    tier: int  # M: the compressed tier's memory, every target
    zswap_percent: int  # max_pool_percent giving zswap about M
    zswap_bytes: int  # what that percent is
    zram_disksize: int
    zram_ratio: float
    swap: int  # the swap file, zswapd's device and its backing file
    cycles: int


@dataclass
class TierRun:
    rep: int
    target: str
    status: str  # the hot phase: "ok", "bad pages", "oom-killed", "timeout", "exit N"
    # every page compared after the hot phase: "ok", "bad pages", "oom-killed",
    # "timeout", "exit N", "not reached" (the hot phase failed)
    verify: str = "not reached"
    hot_s: float = 0.0
    fill_s: float = 0.0
    cycle_s: list[float] = field(default_factory=list)
    disk_bytes: int = 0
    written_back: int | None = None  # pages, zswapd and zswap
    pages_to_disk: int = 0
    disk_space: int = 0
    tier_bytes: int = 0
    hot_bad: int = 0
    verified_bad: int = -1
    pswpin: int = 0
    pswpout: int = 0
    # wall seconds: target and cgroup set up; start to the end of the hot
    # phase; the verification; the whole run, teardown included
    setup_s: float = 0.0
    run_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class _Lines:
    """Lines from a child's stdout, each awaited up to a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, deadline: float) -> str | None:
        """The next line, or None at end of file or past the deadline."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def bench_tiers(
    cold: int = 768 * MIB,
    hot: int = 512 * MIB,
    cgroup_limit: int = 128 * MIB,
    tier_memory: int = 0,
    cycles: int = 3,
    repeat: int = 3,
    latency_seconds: int = 5,
    latency_size: int = 64 * MIB,
    corpus_size: int = 128 * MIB,
    corpus_file: str | None = None,
    disk_dir: str = "/var/tmp",
    targets: tuple[str, ...] = TARGETS,
    as_json: bool = False,
) -> int:
    """The LRU-inversion workload on each target in turn, ``repeat`` times,
    then the read latency of written-back pages; prints the table (or
    JSON).  ``tier_memory`` 0: 1% of RAM, the least zswap's
    max_pool_percent can give."""
    name = "zswapd bench tiers"
    refused = cannot_set_up(name)
    if refused is not None:
        return refused
    for tool in ("mkswap", "swapon", "swapoff"):
        if shutil.which(tool) is None:
            print(f"{name}: {tool} not found", file=sys.stderr)
            return 2
    if not CGROUP_V1.is_dir():
        print(f"{name}: no cgroup-v1 memory controller at {CGROUP_V1}", file=sys.stderr)
        return 2
    if "zswap" in targets and not KernelZswap.available():
        print(f"{name}: the kernel has no zswap (/sys/module/zswap/parameters)", file=sys.stderr)
        return 2
    zram_algos = Path("/sys/block/zram0/comp_algorithm")
    if "zram" in targets and (not zram_algos.exists() or "lz4" not in zram_algos.read_text()):
        print(f"{name}: zram with lz4 is needed for the zram target", file=sys.stderr)
        return 2
    from ..backing import _MEMORY_FS, fs_type

    try:
        fd = os.open(disk_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            kind = _MEMORY_FS.get(fs_type(fd))
        finally:
            os.close(fd)
    except OSError as e:
        print(f"{name}: --disk-dir {disk_dir}: {e.strerror}", file=sys.stderr)
        return 2
    if kind:
        print(f"{name}: --disk-dir {disk_dir} is on {kind}; the disk tier needs a disk filesystem", file=sys.stderr)
        return 2
    mem_total = _mem_total()
    tier = tier_memory or mem_total // 100 // MIB * MIB
    percent = max(1, round(tier * 100 / mem_total))
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(exit_on_signals())
            private = stack.enter_context(private_dir())
            workdir = stack.enter_context(private_dir(tempfile.gettempdir()))
            diskdir = stack.enter_context(private_dir(disk_dir))
            print(f"{name}: pages in {private}, daemons run in {workdir}, disk files in {diskdir}",
                  file=sys.stderr, flush=True)  # fmt: skip
            found = stack.enter_context(_others_swap_off())
            if found:
                print(f"{name}: swap was on ({', '.join(p for p, _ in found)}): off for the bench, back on at "
                      "its end", file=sys.stderr, flush=True)  # fmt: skip
            results = _bench_tiers(
                stack, cold, hot, cgroup_limit, tier, percent, mem_total, cycles, repeat, latency_seconds,
                latency_size, corpus_size, corpus_file, private, workdir, diskdir, targets,
            )  # fmt: skip
    except (OSError, subprocess.CalledProcessError, RuntimeError, KeyboardInterrupt) as e:
        return failed(name, e)
    print(json.dumps(results, indent=2) if as_json else format_tiers(results))
    bad = [r for r in results["runs"] if "bad pages" in (r["status"], r["verify"])]
    return 1 if bad or not results["latency"].get("verified", True) else 0


def _bench_tiers(
    stack: contextlib.ExitStack,
    cold: int,
    hot: int,
    cgroup_limit: int,
    tier: int,
    percent: int,
    mem_total: int,
    cycles: int,
    repeat: int,
    latency_seconds: int,
    latency_size: int,
    corpus_size: int,
    corpus_file: str | None,
    private: str,
    workdir: str,
    diskdir: str,
    targets: tuple[str, ...],
) -> dict[str, Any]:
    corpus = describe_corpus(corpus_file) if corpus_file else capture_corpus(corpus_size, f"{private}/corpus")
    pages_path = os.path.join(private, "pages")
    npages = _pages_file(corpus.path, pages_path)
    if npages < 256:
        raise RuntimeError(f"the corpus has {npages} pages that are not same-filled; 256 or more are needed")
    stack.enter_context(_pinned(pages_path))
    ratio = _zram_ratio(pages_path, npages)
    swap_size = -(-(2 * (cold + hot) + SWAP_SLACK) // MIB) * MIB
    sizes = Sizes(cold // PAGE * PAGE, hot // PAGE * PAGE, cgroup_limit, tier, percent, mem_total * percent // 100,
                  int(tier * ratio) // PAGE * PAGE, ratio, swap_size, cycles)  # fmt: skip
    swapfile = DiskSwapFile(diskdir, swap_size)
    stack.callback(swapfile.close)
    zswap = KernelZswap()
    stack.callback(zswap.restore)  # also if a run's own restore failed
    disk_stat = _disk_stat_path(diskdir)
    runs: list[TierRun] = []
    serving = ""
    for rep in range(repeat):
        # Rotating, so no target always runs first or after the same other.
        for kind in targets[rep % len(targets) :] + targets[: rep % len(targets)]:
            t0 = time.monotonic()
            run, how = _one_run(kind, rep, sizes, pages_path, swapfile, zswap, disk_stat, workdir, diskdir)
            run.wall_s = time.monotonic() - t0
            serving = how or serving
            runs.append(run)
            print(f"  {kind:7} rep {rep}: {run.status}, verify {run.verify}, hot {run.hot_s:.2f} s, disk "
                  f"{run.disk_bytes / MIB:.0f} MiB, written back {run.written_back}; seconds: setup {run.setup_s:.1f}, "
                  f"to the end of the hot phase {run.run_s:.1f}, verify {run.verify_s:.1f}, in all {run.wall_s:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    latency = _latency(pages_path, npages, latency_size, latency_seconds, repeat, workdir, diskdir, disk_stat)
    res = _summarise(sizes, runs, targets)
    res.update(
        corpus={"pages": corpus.pages, "stored_pages": npages, "sources": corpus.sources},
        zswapd_serving=serving,
        zswap_compressor=zswap.compressor,
        zswap_stats_source=KernelZswap.stats()["source"],
        disk=str(disk_stat.parent.name),
        latency=latency,
        runs=[r.__dict__ for r in runs],
    )
    return res


def _one_run(
    kind: str,
    rep: int,
    sizes: Sizes,
    pages_path: str,
    swapfile: DiskSwapFile,
    zswap: KernelZswap,
    disk_stat: Path,
    workdir: str,
    diskdir: str,
) -> tuple[TierRun, str]:
    """One target, set up, the workload run on it, torn down."""
    serving = ""
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        expected: list[str] = []
        zswapd: ZswapdTarget | None = None
        zram: ZramSwap | None = None
        if kind == "zswapd":
            sub = os.path.join(workdir, f"zswapd-{rep}")
            os.makedirs(sub)
            backing = os.path.join(diskdir, "backing")
            zswapd = ZswapdTarget(
                sizes.swap, "lz4", sub, swap_priority=TIER_PRIORITY, memory_limit=sizes.tier, background=True,
                extra=f'[writeback]\nenable = true\nfile = "{backing}"\nsize = {sizes.swap}\n',
            )  # fmt: skip
            stack.callback(zswapd.close)
            expected = [zswapd.path]
            serving = zswapd.serving()
        elif kind == "zram":
            zram = ZramSwap(sizes.zram_disksize, "lz4", TIER_PRIORITY)
            stack.callback(zram.close)
            swapfile.on(FILE_PRIORITY)
            stack.callback(swapfile.off)
            expected = [zram.path, swapfile.path]
        else:
            stack.callback(zswap.restore)
            zswap.enable(sizes.zswap_percent)
            swapfile.on(FILE_PRIORITY)
            stack.callback(swapfile.off)
            expected = [swapfile.path]
        if sorted(swaps()) != sorted(expected):
            raise RuntimeError(f"expected {expected} as the only swap, /proc/swaps has {swaps()}")
        cg = MemCgroup(f"zswapd-bench-tiers-{os.getpid()}-{rep}-{kind}", sizes.cgroup)
        stack.callback(cg.close)
        run = TierRun(rep, kind, "ok")
        run.setup_s = time.monotonic() - t0
        t0 = time.monotonic()
        zram_dev = Path(f"/sys/block/{os.path.basename(zram.path)}") if zram else None
        sectors0 = _sectors_written(disk_stat)
        vm0 = _vmstat("pswpin", "pswpout", "zswpwb")
        zs0 = KernelZswap.stats() if kind == "zswap" else {}
        argv = [sys.executable, "-I", WORKLOAD, pages_path, str(sizes.cold // PAGE), str(sizes.hot // PAGE),
                str(sizes.cycles), str(rep)]  # fmt: skip
        proc = subprocess.Popen(cg.argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        stack.callback(_reap, proc)
        lines = _Lines(proc)
        deadline = time.monotonic() + RUN_TIMEOUT
        hot_line = None
        while (line := lines.next(deadline)) is not None:
            word, *rest = line.split()
            if word == "filled":
                run.fill_s = float(rest[0]) + float(rest[1])
            elif word == "cycle":
                run.cycle_s.append(float(rest[1]))
            elif word == "hot":
                hot_line = rest
                break

        def sample() -> None:
            """The counters now, into ``run`` (also when the hot phase failed:
            bytes and pages sent to the disk so far still count per page)."""
            run.disk_bytes = (_sectors_written(disk_stat) - sectors0) * 512
            vm1 = _vmstat("pswpin", "pswpout", "zswpwb")
            run.pswpin, run.pswpout = vm1["pswpin"] - vm0["pswpin"], vm1["pswpout"] - vm0["pswpout"]
            if zswapd is not None:
                s = zswapd._request(zswapd.sock, {"cmd": "stats"})
                wb = s["writeback"]
                run.written_back = run.pages_to_disk = int(s["bd_writes"])
                run.disk_space = int(wb["segments_used"]) * (256 << 10)
                run.tier_bytes = int(s["mem_used_total"])
                run.detail = {"bd_count": s["bd_count"], "bd_reads": s["bd_reads"], "live_bytes": wb["live_bytes"],
                              "dead_bytes": wb["dead_bytes"], "segments_cleaned": wb["segments_cleaned"],
                              "backing_bytes_written": wb.get("bytes_written"), "mem_used_max": s["mem_used_max"],
                              "failed_writes": s["failed_writes"], "orig_data_size": s["orig_data_size"],
                              "read_latency_p99_us": wb["read_latency_p99_us"]}  # fmt: skip
            elif zram is not None and zram_dev is not None:
                mm = (zram_dev / "mm_stat").read_text().split()
                zram_writes = int((zram_dev / "stat").read_text().split()[6]) // 8
                run.tier_bytes = int(mm[2])
                run.pages_to_disk = max(0, run.pswpout - zram_writes)
                run.disk_space = swapfile.used()
                run.detail = {"zram_orig_data_size": int(mm[0]), "zram_mem_used_max": int(mm[4]),
                              "zram_pages_written": zram_writes, "zram_used": swap_used(zram.path)}  # fmt: skip
            else:
                zs1 = KernelZswap.stats()
                run.written_back = zs1["written_back"] - zs0["written_back"]
                run.pages_to_disk = run.pswpout
                # A page zswap holds has a slot on the file too, never written:
                # the disk space used is the rest.
                run.disk_space = max(0, swapfile.used() - zs1["pool_pages"] * PAGE)
                run.tier_bytes = zs1["pool_bytes"]
                run.detail = {k: v - zs0.get(k, 0) for k, v in zs1.items() if k == "pool_limit_hit"}

        run.run_s = time.monotonic() - t0
        if hot_line is None:
            sample()
            run.status = _ended(proc, cg, deadline)
            return run, serving
        # The end of the hot phase: every page is still where the kernel put it.
        run.hot_s, run.hot_bad = float(hot_line[0]), int(hot_line[1])
        if run.hot_bad:
            run.status = "bad pages"
        sample()
        assert proc.stdin is not None
        proc.stdin.write(b"verify\n")
        proc.stdin.flush()
        t0 = time.monotonic()
        deadline = t0 + RUN_TIMEOUT
        line = lines.next(deadline)
        if line is not None and line.startswith("verified"):
            run.verified_bad = int(line.split()[2])
            rc = proc.wait(60)
            run.verify = "bad pages" if run.verified_bad else (f"exit {rc}" if rc else "ok")
        else:
            run.verify = _ended(proc, cg, deadline)
        run.verify_s = time.monotonic() - t0
    return run, serving


def _ended(proc: subprocess.Popen[bytes], cg: MemCgroup, deadline: float) -> str:
    """Why the workload said no more: killed if it still runs."""
    timed_out = proc.poll() is None and time.monotonic() >= deadline
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    return "timeout" if timed_out else ("oom-killed" if cg.oom_kills() else f"exit {rc}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _latency(
    pages_path: str,
    npages: int,
    size: int,
    seconds: int,
    repeat: int,
    workdir: str,
    diskdir: str,
    disk_stat: Path,
) -> dict[str, Any]:
    """QD1 4 KiB O_DIRECT random reads of a zswapd device whose every page
    is written back (`zswapd writeback`), against the same reads of a file
    of the same size on the same disk, alternated ``repeat`` times; and the
    read-back policy as it stands: pool memory and pages in the file before
    and after every page was read once."""
    n = min(npages, size // PAGE)
    nbytes = n * PAGE
    dev_size = -(-nbytes // MIB) * MIB
    backing_size = max(2 * (256 << 10), -(-dev_size // (256 << 10)) * (256 << 10) * 2)
    out: dict[str, Any] = {"pages": n}
    disk_file = os.path.join(diskdir, "disk-file")
    with contextlib.ExitStack() as stack:
        sub = os.path.join(workdir, "latency")
        os.makedirs(sub)
        backing = os.path.join(diskdir, "latency-backing")
        t = ZswapdTarget(dev_size, "lz4", sub,
                         extra=f'[writeback]\nenable = true\nfile = "{backing}"\nsize = {backing_size}\n')  # fmt: skip
        stack.callback(t.close)
        stack.callback(lambda: Path(disk_file).unlink(missing_ok=True))
        sh("dd", f"if={pages_path}", f"of={t.path}", "bs=4K", f"count={n}", "oflag=direct", "status=none")
        reply = t._request(t.sock, {"cmd": "writeback"}, timeout=600)
        if not reply.get("ok", True) or "pages" not in reply:
            raise RuntimeError(f"zswapd writeback failed: {reply.get('error', reply)}")
        s0 = t._request(t.sock, {"cmd": "stats"})
        sh("dd", f"if={pages_path}", f"of={disk_file}", "bs=1M", f"count={-(-nbytes // MIB)}", "oflag=direct",
           "status=none")  # fmt: skip
        cmp = subprocess.run(["cmp", "-n", str(nbytes), pages_path, t.path], capture_output=True)
        s1 = t._request(t.sock, {"cmd": "stats"})
        out.update(
            written_back=int(reply["pages"]),
            verified=cmp.returncode == 0,
            readback={"bd_count_before": s0["bd_count"], "bd_count_after": s1["bd_count"],
                      "bd_reads": s1["bd_reads"] - s0["bd_reads"],
                      "pool_bytes_before": s0["mem_used_total"], "pool_bytes_after": s1["mem_used_total"]},
        )  # fmt: skip
        lat: dict[str, list[tuple[float, float, float]]] = {"zswapd-backed": [], "disk-file": []}
        for _ in range(repeat):
            lat["zswapd-backed"].append(fio_randread(t.path, nbytes, seconds, sub))
            lat["disk-file"].append(fio_randread(disk_file, nbytes, seconds, sub))
        for name, runs in lat.items():
            out[name] = {"p50_us": statistics.median(x[0] for x in runs),
                         "p99_us": statistics.median(x[1] for x in runs)}  # fmt: skip
        s2 = t._request(t.sock, {"cmd": "stats"})
        out["zswapd-backed"]["bd_count_after_fio"] = s2["bd_count"]
        out["zswapd-backed"]["daemon_read_p99_us"] = s2["writeback"]["read_latency_p99_us"]
        out["p99 zswapd-backed/disk-file"] = out["zswapd-backed"]["p99_us"] / out["disk-file"]["p99_us"]
    return out


def _summarise(sizes: Sizes, runs: list[TierRun], targets: tuple[str, ...]) -> dict[str, Any]:
    keys = ("hot_s", "disk_bytes", "written_back", "pages_to_disk", "disk_space", "tier_bytes")
    per: dict[str, dict[str, Any]] = {}
    for name in targets:
        its = [r for r in runs if r.target == name]
        ok = [r for r in its if r.status == "ok"]
        t: dict[str, Any] = {"runs": len(its), "ok": len(ok),
                             "failures": [r.status for r in its if r.status != "ok"],
                             "verify_failures": [r.verify for r in ok if r.verify != "ok"]}  # fmt: skip
        for k in keys:
            values = [getattr(r, k) for r in ok if getattr(r, k) is not None]
            if values:
                t[k] = statistics.median(values)
        # Disk bytes per page written back, and per page sent to the disk
        # at all (zswap also writes the pages its full pool rejects; zram
        # writes whatever does not fit its slots), run by run: every run,
        # also one whose hot phase failed, up to where it was sampled.
        per_wb = [r.disk_bytes / r.written_back for r in its if r.written_back]
        if per_wb:
            t["disk_bytes_per_page_written_back"] = statistics.median(per_wb)
        per_page = [r.disk_bytes / r.pages_to_disk for r in its if r.pages_to_disk]
        if per_page:
            t["disk_bytes_per_page_to_disk"] = statistics.median(per_page)
        per[name] = t
    ratios: dict[str, float] = {}
    mine = per.get("zswapd", {})
    others = [per[n] for n in targets if n != "zswapd" and "hot_s" in per[n]]
    if "hot_s" in mine and others:
        best = min(others, key=lambda o: o["hot_s"])
        best_name = next(n for n in targets if per[n] is best)
        ratios[f"hot_s zswapd / best of the others ({best_name})"] = mine["hot_s"] / best["hot_s"]
        for n in targets:
            if n != "zswapd" and "hot_s" in per[n]:
                ratios[f"hot_s zswapd/{n}"] = mine["hot_s"] / per[n]["hot_s"]
    zs = per.get("zswap", {})
    # Per page sent to the disk is the like-for-like figure: zswap writes a
    # page its full pool rejects exactly as one its shrinker writes back
    # (4 KiB, uncompressed), and zswpwb counts only the latter.
    for k in ("disk_bytes_per_page_to_disk", "disk_bytes_per_page_written_back", "disk_bytes", "disk_space"):
        if mine.get(k) and zs.get(k):
            ratios[f"{k} zswapd/zswap"] = mine[k] / zs[k]
    zr = per.get("zram", {})
    for k in ("disk_bytes_per_page_to_disk", "disk_bytes", "disk_space"):
        if mine.get(k) and zr.get(k):
            ratios[f"{k} zswapd/zram"] = mine[k] / zr[k]
    return {"sizes": sizes.__dict__, "targets": per, "ratios": ratios}
