"""``zswapd bench app``: a real program that none of us wrote, with a working
set larger than its cgroup-v1 memory limit, run with zram, with zswapd and
with a loop device over a tmpfs file (the loop layer's floor) as the only
swap, the order rotating between repetitions; medians of wall time over the
runs that finished with the right output, and paired ratios.

``sort`` (GNU coreutils, one thread, an in-memory sort): it reads the whole
input into one buffer and merge-sorts line records whose comparisons
dereference the text at random, so every page of the buffer is touched
again and again in no order; measured here it swaps in about its whole
footprint at 1.5x.  ``xz -9`` (LZMA's bt4 match finder over a 64 MiB
dictionary) is random too, but on this kernel memcg v1 reclaim gives up on
it and the OOM killer fires even with zram at 1.3x, so it rarely finishes.

Owns: the program's input and command line, the memory cgroups (made and
removed whole: ``MemCgroup``, ``remove_cgroup``), the runs and their summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import MIB, PAGE, create_private, exit_on_signals, private_dir
from .report import failed, format_app
from .targets import Target, TmpfsLoopSwap, ZramSwap, ZswapdTarget, engine_module, swaps

CGROUP_V1 = Path("/sys/fs/cgroup/memory")

APP_PROGRAMS = ("sort", "xz")

APP_PRIORITY = 100


def make_app_input(path: str, size: int, seed: int = 13) -> None:
    """Deterministic text: lines of two words from a 50,000-word vocabulary
    and a 40-bit number, ``size`` bytes or a line more."""
    r = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(r.choices(alphabet, k=r.randint(2, 10))) for _ in range(50000)]
    with os.fdopen(create_private(path), "w") as f:
        n = 0
        while n < size:
            chunk = "".join(f"{r.choice(words)} {r.choice(words)} {r.getrandbits(40)}\n" for _ in range(20000))
            f.write(chunk)
            n += len(chunk)


def _app_argv(program: str, input_path: str, input_size: int, tmpdir: str) -> list[str]:
    if program == "sort":
        # A buffer well above what the input needs: one in-memory sort, no
        # temporary files (which on tmpfs would be charged to the cgroup).
        buf = 4 * input_size // MIB + 64
        return ["sort", "-S", f"{buf}M", "--parallel=1", "-T", tmpdir, input_path]
    return ["xz", "-9", "--threads=1", "-c", input_path]


class MemCgroup:
    """A fresh cgroup-v1 memory cgroup; close() kills what is left in it and
    removes it."""

    def __init__(self, name: str, limit: int | None = None) -> None:
        self.path = CGROUP_V1 / name
        self.path.mkdir()
        try:
            if limit is not None:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except BaseException:
            self.close()
            raise

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so that the process joins this cgroup before it
        execs, so all its memory is charged here."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def close(self) -> None:
        remove_cgroup(self.path)


def remove_cgroup(path: Path) -> None:
    """SIGKILL what is left in the cgroup at ``path``, wait until it is
    empty (up to 10 s), then remove it (already gone is fine)."""
    procs = path / "cgroup.procs"
    for _ in range(100):
        pids = [int(p) for p in procs.read_text().split()] if procs.exists() else []
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def _vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


@dataclass
class AppRun:
    rep: int
    target: str
    status: str  # "ok", "oom-killed", "timeout", "output differs", "exit N"
    wall_s: float
    pswpin: int
    pswpout: int
    oom_kills: int
    max_usage: int
    sha256: str


def _run_app(argv: list[str], cg: MemCgroup, timeout: float, errlog: str) -> tuple[int, float, str, bool]:
    """Run ``argv`` inside ``cg`` (it joins the cgroup before exec, so all its
    memory is charged there), hashing its stdout.  Returns (exit status,
    wall seconds, sha256 of stdout, timed out)."""
    env = dict(os.environ, LC_ALL="C")
    h = hashlib.sha256()
    timed_out = False
    with open(errlog, "ab") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cg.argv(argv), stdout=subprocess.PIPE, stderr=err, env=env)
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    proc.kill()
                    break
                if select.select([fd], [], [], min(left, 1.0))[0]:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        wall = time.perf_counter() - t0
    return rc, wall, h.hexdigest(), timed_out


def bench_app(
    program: str = "sort",
    input_size: int = 192 * MIB,
    limit_ratio: float = 1.5,
    repeat: int = 3,
    algorithm: str = "lz4",
    timeout: float = 1800,
    as_json: bool = False,
    fuse_threads: int | None = None,
    recompress: bool = False,
) -> int:
    """``program`` on a deterministic input, in a memory cgroup whose limit
    is its measured peak / ``limit_ratio``, with zram, zswapd and a
    tmpfs-backed loop device each as the only swap in turn (the order
    rotating between repetitions); medians of wall time over the runs that
    finished with the right output.  ``recompress``: instead of the tmpfs
    loop device, zswapd with its recompression policy on every page at once
    (idle_age 0, the default budget), against zswapd with it off."""
    name = "zswapd bench app"
    if os.geteuid() != 0:
        print(f"{name}: needs root (memory cgroup, zram, swap, FUSE)", file=sys.stderr)
        return 2
    if not CGROUP_V1.is_dir():
        print(f"{name}: no cgroup-v1 memory controller at {CGROUP_V1}", file=sys.stderr)
        return 2
    for tool in (program, "mkswap", "swapon", "swapoff", "losetup"):
        if shutil.which(tool) is None:
            print(f"{name}: {tool} not found", file=sys.stderr)
            return 2
    zram_algos = Path("/sys/block/zram0/comp_algorithm")
    if not zram_algos.exists() or algorithm not in zram_algos.read_text().replace("[", " ").replace("]", " ").split():
        print(f"{name}: zram0 with {algorithm} is needed as the baseline", file=sys.stderr)
        return 2
    if swaps():
        print(
            f"{name}: swap is already on ({', '.join(swaps())}); turn it off first: each run needs its "
            "target as the only swap",
            file=sys.stderr,
        )
        return 2
    try:
        with exit_on_signals(), private_dir() as private, private_dir(tempfile.gettempdir()) as workdir:
            print(f"{name}: input in {private}, daemons run in {workdir}", file=sys.stderr, flush=True)
            results = _bench_app(
                program, input_size, limit_ratio, repeat, algorithm, timeout, private, workdir, fuse_threads,
                recompress,
            )  # fmt: skip
    except (OSError, subprocess.CalledProcessError, RuntimeError, KeyboardInterrupt) as e:
        return failed(name, e)
    print(json.dumps(results, indent=2) if as_json else format_app(results))
    # Wrong output from a run that finished is data corruption: fail loudly.
    return 1 if results["wrong_output"] else 0


def _bench_app(
    program: str,
    input_size: int,
    limit_ratio: float,
    repeat: int,
    algorithm: str,
    timeout: float,
    private: str,
    workdir: str,
    fuse_threads: int | None = None,
    recompress: bool = False,
) -> dict[str, Any]:
    input_path = os.path.join(private, "input")
    make_app_input(input_path, input_size)
    argv = _app_argv(program, input_path, input_size, private)
    errlog = os.path.join(workdir, "program.err")
    tag = f"zswapd-bench-app-{os.getpid()}"

    # Reference: no limit, no swap.  Gives the working set (the cgroup's
    # peak charge), the expected output and the time without swapping.
    cg = MemCgroup(f"{tag}-ref")
    try:
        rc, ref_wall, ref_hash, _ = _run_app(argv, cg, timeout, errlog)
        peak = cg.max_usage()
    finally:
        cg.close()
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} failed without a limit (exit {rc}); see its stderr:\n"
                           + Path(errlog).read_text(errors="replace")[-2000:])  # fmt: skip
    limit = int(peak / limit_ratio) // PAGE * PAGE
    swap_size = -(-2 * peak // MIB) * MIB
    names = {"zram": f"zram-{algorithm}", "zswapd": f"zswapd-{algorithm}", "tmpfs": "tmpfs-loop"}
    if recompress:
        names = {"zram": f"zram-{algorithm}", "zswapd": f"zswapd-{algorithm}",
                 "recompress": f"zswapd-{algorithm}-recompress"}  # fmt: skip
    runs: list[AppRun] = []
    serving = ""
    kinds = list(names)
    for i in range(repeat):
        # The order rotates, so that no target always runs first or always
        # follows the same other target's teardown.
        for kind in kinds[i % 3 :] + kinds[: i % 3]:
            with contextlib.ExitStack() as stack:
                t = _app_swap(
                    kind, swap_size, algorithm, os.path.join(workdir, f"{kind}-{i}"), private, fuse_threads,
                    recompress_off=recompress,
                )  # fmt: skip
                t.name = names[kind]
                stack.callback(t.close)
                if swaps() != [t.path]:
                    raise RuntimeError(f"expected {t.path} as the only swap, /proc/swaps has {swaps()}")
                if isinstance(t, ZswapdTarget):
                    serving = t.serving()
                cg = MemCgroup(f"{tag}-{i}-{kind}", limit)
                stack.callback(cg.close)
                before = _vmstat()
                rc, wall, digest, timed_out = _run_app(argv, cg, timeout, errlog)
                after = _vmstat()
                ooms = cg.oom_kills()
                if timed_out:
                    status = "timeout"
                elif ooms and rc != 0:
                    status = "oom-killed"
                elif rc != 0:
                    status = f"exit {rc}"
                elif digest != ref_hash:
                    status = "output differs"
                else:
                    status = "ok"
                runs.append(AppRun(i, t.name, status, wall, after["pswpin"] - before["pswpin"],
                                   after["pswpout"] - before["pswpout"], ooms, cg.max_usage(), digest))  # fmt: skip
    order = list(names.values())
    if recompress:  # the ratios: recompress/zram, zswapd/zram, recompress/zswapd
        order = [names["zram"], names["recompress"], names["zswapd"]]
    res = _summarise_app(program, argv, input_size, peak, limit, ref_wall, runs, order, serving)
    res["reference_sha256"] = ref_hash
    return res


def _app_swap(
    kind: str,
    size: int,
    algorithm: str,
    workdir: str,
    private: str,
    fuse_threads: int | None = None,
    recompress_off: bool = False,
) -> Target:
    """One swap target, on: zram, zswapd (which turns on its own swap; with
    ``recompress_off``, without its recompression policy), zswapd
    recompressing every page as soon as it can ("recompress"), or a loop
    device over a tmpfs file (the loop layer's floor: no compression, the
    same block path as zswapd's)."""
    if kind == "zram":
        return ZramSwap(size, algorithm, APP_PRIORITY)
    if kind in ("zswapd", "recompress"):
        os.makedirs(workdir)
        extra = "[recompress]\nidle_age = 0\n" if kind == "recompress" else ""
        if kind == "zswapd" and recompress_off:
            extra = "[recompress]\nenable = false\n"
        return ZswapdTarget(
            size, algorithm, workdir, swap_priority=APP_PRIORITY, fuse_threads=fuse_threads, extra=extra
        )
    return TmpfsLoopSwap(size, private, APP_PRIORITY)


def _summarise_app(
    program: str,
    argv: list[str],
    input_size: int,
    peak: int,
    limit: int,
    ref_wall: float,
    runs: list[AppRun],
    names: list[str],
    serving: str,
) -> dict[str, Any]:
    zname, sname, fname = names
    targets: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in runs if r.target == name]
        ok = [r for r in mine if r.status == "ok"]
        t: dict[str, Any] = {
            "runs": len(mine),
            "ok": len(ok),
            "oom_killed": sum(r.status == "oom-killed" for r in mine),
            "timeouts": sum(r.status == "timeout" for r in mine),
            "other_failures": [r.status for r in mine if r.status not in ("ok", "oom-killed", "timeout")],
        }
        if ok:
            t["wall_s"] = statistics.median(r.wall_s for r in ok)
            t["pswpin"] = statistics.median(r.pswpin for r in ok)
            t["pswpout"] = statistics.median(r.pswpout for r in ok)
        targets[name] = t
    ratios: dict[str, float] = {}
    for a, b in ((sname, zname), (fname, zname), (sname, fname)):
        if "wall_s" not in targets[a] or "wall_s" not in targets[b]:
            continue
        label = f"wall {a}/{b}"
        ratios[f"{label} (ratio of medians)"] = targets[a]["wall_s"] / targets[b]["wall_s"]
        # Within a repetition the targets ran back to back: a ratio within
        # it cancels the machine's drift between repetitions.
        walls = {(r.rep, r.target): r.wall_s for r in runs if r.status == "ok"}
        reps = sorted({r.rep for r in runs})
        paired = [walls[(i, a)] / walls[(i, b)] for i in reps if (i, a) in walls and (i, b) in walls]
        if paired:
            ratios[f"{label} (median of paired ratios)"] = statistics.median(paired)
    return {
        "program": program,
        "argv": argv,
        "input_bytes": input_size,
        "peak_bytes": peak,
        "limit_bytes": limit,
        "working_set_over_limit": peak / limit,
        "unlimited_wall_s": ref_wall,
        "zswapd_serving": serving,
        "engine_module": engine_module(),
        "targets": targets,
        "ratios": ratios,
        "runs": [r.__dict__ for r in runs],
        "wrong_output": [r.__dict__ for r in runs if r.status == "output differs"],
    }
