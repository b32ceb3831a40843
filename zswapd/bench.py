"""`zswapd bench`: figures as ratios against a baseline measured in the same run.

``bench pool``    store/load through the store (codec + pool + page table)
                  against bare ``lz4.block`` on the same pages.
``bench device``  the same corpus of real memory pages through (a) zswapd via a
                  loop device on its file, (b) the kernel's zram with the same
                  algorithm, and (c) a loop device on a tmpfs file (the cost of
                  the loop layer alone); the same tools (dd, fio) for all.

The corpus is other processes' memory, secrets included.  It and the
tmpfs-loop file (which receives a copy) live only in a private directory
(mode 0700) on tmpfs, in files created O_EXCL|O_NOFOLLOW with mode 0600, and
the directory is removed on every way out: return, exception, Ctrl-C, and
SIGTERM or SIGHUP, which raise SystemExit while the benchmark runs so that
the ``finally`` clauses run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import lz4.block
import zstandard

from .codec import Codec, fill_word
from .store import Store

PAGE = 4096
MIB = 1 << 20
BLKDISCARD = 0x1277
# tmpfs, so captured memory never reaches a disk.
SHM = "/dev/shm"


@contextlib.contextmanager
def private_dir(parent: str = SHM) -> Iterator[str]:
    """A fresh directory only root can enter, removed with its contents at exit."""
    path = tempfile.mkdtemp(prefix="zswapd-bench-", dir=parent)  # mode 0700, unpredictable name
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def create_private(path: str) -> int:
    """Open a new file for writing, mode 0600.  Fails rather than reuse or
    follow whatever already sits at ``path``."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def exit_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn the first of these signals into SystemExit(128 + signal), so that
    clean-up runs; later ones are ignored so they cannot cut the clean-up short."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise SystemExit(128 + signum)

    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


def _loops_of(path: str) -> list[str]:
    out = subprocess.run(["losetup", "-j", path], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


def _detach_loops_of(path: str) -> None:
    """Detach every loop device backed by ``path``; also catches one attached
    by a losetup that was interrupted before it printed its name."""
    for loop in _loops_of(path):
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def sample_pages(n: int) -> list[bytes]:
    """Compressible, varied, non-zero pages (text-like records with numbers)."""
    words = [b"swap", b"page", b"kernel", b"memory", b"zsmalloc", b"handle", b"frame", b"object", b"\x00\x01", b"\xff"]
    pages = []
    x = 1
    for i in range(n):
        out = bytearray(i.to_bytes(8, "little"))
        while len(out) < PAGE:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out += words[x % len(words)] + str(x % 100000).encode() + b" "
        pages.append(bytes(out[:PAGE]))
    return pages


def _median_rate(fn: Callable[[], object], nbytes: int, repeat: int = 5) -> float:
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
    return statistics.median(rates)


def bench_pool(npages: int = 20000, as_json: bool = False, engine: str = "auto") -> int:
    pages = sample_pages(npages)
    nbytes = npages * PAGE
    results: dict[str, float] = {}
    served_by = ""
    for algo in ("lz4", "zstd"):
        store = Store(npages * PAGE, Codec(algo), engine=engine)
        served_by = str(store.stats()["engine"])

        def store_all(store: Store = store) -> None:
            for i, p in enumerate(pages):
                store.write(i * PAGE, p)

        def load_all(store: Store = store) -> None:
            for i in range(npages):
                store.read(i * PAGE, PAGE)

        results[f"{algo}_store_MBps"] = _median_rate(store_all, nbytes)
        results[f"{algo}_load_MBps"] = _median_rate(load_all, nbytes)
        s = store.stats()
        results[f"{algo}_ratio"] = s["orig_data_size"] / s["mem_used_total"]  # type: ignore[operator]
        results[f"{algo}_metadata_B_per_page"] = s["metadata_bytes"] / npages  # type: ignore[operator]
    comp = [lz4.block.compress(p, store_size=False) for p in pages]
    results["raw_lz4_compress_MBps"] = _median_rate(
        lambda: [lz4.block.compress(p, store_size=False) for p in pages], nbytes
    )
    results["raw_lz4_decompress_MBps"] = _median_rate(
        lambda: [lz4.block.decompress(c, uncompressed_size=PAGE) for c in comp], nbytes
    )
    results["store_vs_raw_lz4_compress"] = results["lz4_store_MBps"] / results["raw_lz4_compress_MBps"]
    results["load_vs_raw_lz4_decompress"] = results["lz4_load_MBps"] / results["raw_lz4_decompress_MBps"]
    if as_json:
        print(json.dumps({"engine": served_by, **results}, indent=2))
    else:
        print(f"pool benchmark: {npages} pages of 4 KiB, median of 5 runs, {served_by} engine")
        for k, v in results.items():
            print(f"  {k:32} {v:10.2f}")
    return 0


# -- corpus of real memory ------------------------------------------------------

_WORKLOADS = {
    "python-dicts": (
        "import sys, time\n"
        "d = {f'key{i}': ('value %d ' % i) * (i % 40 + 1) for i in range(300000)}\n"
        "l = [str(i) * 3 for i in range(600000)]\n"
        "objs = [{'id': i, 'name': 'user%d' % i, 'tags': ['a', 'b', str(i % 7)]} for i in range(150000)]\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
    "sqlite": (
        "import sqlite3, time\n"
        "db = sqlite3.connect(':memory:')\n"
        "db.execute('create table t (id integer primary key, name text, email text, score real, body text)')\n"
        "db.executemany('insert into t values (?, ?, ?, ?, ?)', ((i, 'name%d' % i, 'u%d@example.org' % i,"
        " i * 0.37, 'lorem ipsum dolor sit amet %d ' % (i % 1000) * 4) for i in range(200000)))\n"
        "db.execute('create index ix on t (name)'); db.commit()\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
    "numpy": (
        "import time\n"
        "import numpy as np\n"
        "rng = np.random.default_rng(1)\n"
        "a = rng.normal(size=3_000_000)\n"
        "b = np.arange(4_000_000, dtype=np.int64) % 1000\n"
        "c = np.zeros((2000, 2000)); c[::17, ::13] = 1.5\n"
        "d = (rng.random(2_000_000) * 100).astype(np.float32)\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
}


@dataclass
class Corpus:
    path: str
    pages: int
    zero_pages: int = 0
    same_pages: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def _anon_regions(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            perms = parts[1]
            name = parts[5] if len(parts) > 5 else ""
            if not perms.startswith("rw") or name not in ("", "[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            yield start, end


def _capture(pid: int, limit: int, out: Any) -> int:
    taken = 0
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return 0
    try:
        for start, end in _anon_regions(pid):
            pos = start
            while pos < end and taken < limit:
                n = min(MIB, end - pos, limit - taken)
                try:
                    chunk = os.pread(fd, n, pos)
                except OSError:
                    break
                chunk = chunk[: len(chunk) // PAGE * PAGE]
                out.write(chunk)
                taken += len(chunk)
                pos += n
            if taken >= limit:
                break
    except OSError:
        pass
    finally:
        os.close(fd)
    return taken


def capture_corpus(size: int, path: str, also: Mapping[str, int] | None = None) -> Corpus:
    """Anonymous pages of real processes: our workloads, then ``also`` (name
    -> pid of a program the caller runs, e.g. a database), each with the same
    share, then the rest of the machine's processes, until ``size`` bytes."""
    also = dict(also or {})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, code in _WORKLOADS.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/"
            )
        ready = {}
        for name, p in procs.items():
            assert p.stdout is not None
            ready[name] = p.stdout.readline().strip() == b"ready"
        corpus = Corpus(path, 0)
        share = size // (len(procs) + len(also) + 1)
        with os.fdopen(create_private(path), "wb") as out:
            for name, p in procs.items():
                if ready[name]:
                    corpus.sources[name] = _capture(p.pid, share, out) // PAGE
            for name, pid in also.items():
                corpus.sources[name] = _capture(pid, share, out) // PAGE
            others = size - sum(corpus.sources.values()) * PAGE
            mine = {os.getpid(), *[p.pid for p in procs.values()], *also.values()}
            taken = 0
            for entry in sorted(os.listdir("/proc")):
                if taken >= others:
                    break
                if entry.isdigit() and int(entry) not in mine:
                    taken += _capture(int(entry), min(16 * MIB, others - taken), out)
            corpus.sources["other-processes"] = taken // PAGE
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    return _describe(path, corpus)


def _describe(path: str, corpus: Corpus | None = None) -> Corpus:
    corpus = corpus or Corpus(path, 0)
    data = Path(path).read_bytes()
    corpus.pages = len(data) // PAGE
    for i in range(corpus.pages):
        word = fill_word(data[i * PAGE : (i + 1) * PAGE])
        if word is not None:
            corpus.same_pages += 1
            corpus.zero_pages += word == 0
    return corpus


# -- devices ---------------------------------------------------------------------


def _sh(*argv: str, check: bool = True, cwd: str | None = None) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, cwd=cwd).stdout


class Target:
    name = ""
    path = ""

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def compact(self) -> None:
        pass


class ZramTarget(Target):
    def __init__(self, size: int, algorithm: str) -> None:
        self.name = "zram"
        self.dev = "zram0"
        base = Path("/sys/block/zram0")
        if not base.exists() or (base / "initstate").read_text().strip() == "1":
            self.dev = "zram" + Path("/sys/class/zram-control/hot_add").read_text().strip()
            base = Path(f"/sys/block/{self.dev}")
        self.base = base
        try:
            (base / "reset").write_text("1")
            (base / "comp_algorithm").write_text(algorithm)
            (base / "disksize").write_text(str(size))
        except BaseException:
            self.close()
            raise
        self.path = f"/dev/{self.dev}"
        self.slab0 = _zs_slab_bytes()

    def stats(self) -> dict[str, float]:
        mm = [int(x) for x in (self.base / "mm_stat").read_text().split()]
        orig, compr, used = mm[0], mm[1], mm[2]
        pages = orig // PAGE
        disksize = int((self.base / "disksize").read_text())
        # zram's table: 16 bytes per device page (handle + flags); zsmalloc's
        # handles and zspage records are slab objects.
        meta = disksize // PAGE * 16 + (_zs_slab_bytes() - self.slab0)
        return {"orig_data_size": orig, "compr_data_size": compr, "mem_used_total": used, "pages": pages,
                "metadata_bytes": meta}  # fmt: skip

    def compact(self) -> None:
        (self.base / "compact").write_text("1")

    def close(self) -> None:
        (self.base / "reset").write_text("1")
        if self.dev != "zram0":
            Path("/sys/class/zram-control/hot_remove").write_text(self.dev[4:])


def _zs_slab_bytes() -> int:
    total = 0
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("zs_handle", "zspage"):
                    total += int(parts[1]) * int(parts[3])
    except OSError:
        pass
    return total


class ZswapdTarget(Target):
    def __init__(
        self,
        size: int,
        algorithm: str,
        workdir: str,
        backend: str = "builtin",
        src: str | None = None,
        swap_priority: int | None = None,
        fuse_threads: int | None = None,
        extra: str = "",
    ) -> None:
        """``src``: run the zswapd of that source tree instead of this one
        (a baseline, e.g. the previous commit, measured in the same run).
        ``swap_priority``: the daemon turns its device on as swap.
        ``fuse_threads``: [fuse] threads (default: the daemon's own default).
        ``extra``: more TOML, whole sections, appended to the config."""
        from .control import request

        self.name = "zswapd" if backend == "builtin" else f"zswapd-{backend}"
        if src:
            self.name = "baseline"
        self._request = request
        self.workdir = workdir
        self.swap = swap_priority is not None
        self.mnt = os.path.join(workdir, "mnt")
        self.sock = os.path.join(workdir, "ctl", "control.sock")
        cfg = os.path.join(workdir, "bench.toml")
        # With swap, the daemon itself attaches the loop device, runs mkswap
        # and swapon, and undoes them at SIGTERM, as a user's daemon would.
        swap = f"enable = true\npriority = {swap_priority}" if self.swap else "enable = false"
        # 0600 and root's, whatever the umask: the daemon refuses a config
        # that others could change (config.load strict).
        with os.fdopen(create_private(cfg), "w") as f:
            f.write(
                f'[device]\nsize = {size}\nmountpoint = "{self.mnt}"\n[pool]\nalgorithm = "{algorithm}"\n'
                f"memory_limit = 0\n[swap]\n{swap}\n[compaction]\nbackground = false\n"
                f'[control]\nsocket = "{self.sock}"\n[fuse]\n'
                # the default named by no name: a --baseline-src tree may call it "native"
                + (f'backend = "{backend}"\n' if backend != "builtin" else "")
                + (f"threads = {fuse_threads}\n" if fuse_threads is not None else "")
                + extra
            )
        self.file = os.path.join(self.mnt, "swap")
        self.log = open(os.path.join(workdir, "daemon.log"), "wb")
        # Isolated (-I), from /: the daemon is this checkout's installed
        # zswapd, or the source tree ``src`` named explicitly, never whatever
        # lies in the directory the bench was started from.
        prefix = [sys.executable, "-I", "-m", "zswapd"]
        if src:
            boot = "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('zswapd', run_name='__main__')"
            prefix = [sys.executable, "-I", "-c", boot, os.path.abspath(src)]
        self.proc = subprocess.Popen([*prefix, "run", "--config", cfg], stderr=self.log, cwd="/")
        try:
            deadline = time.monotonic() + 60
            while not self._ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(Path(workdir, "daemon.log").read_text())
                time.sleep(0.05)
            if self.swap:
                self.path = _loops_of(self.file)[0]
            else:
                time.sleep(0.2)
                self.path = _sh("losetup", "--find", "--show", "--direct-io=on", self.file).strip()
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.swap:  # the supervisor logs "ready:" once swap is on
            return b"ready:" in Path(self.log.name).read_bytes()
        return os.path.exists(self.sock)

    def stats(self) -> dict[str, float]:
        s = self._request(self.sock, {"cmd": "stats"})
        return {k: s[k] for k in ("orig_data_size", "compr_data_size", "mem_used_total", "metadata_bytes")} | {
            "pages": s["pages_stored"]
        }

    def serving(self) -> str:
        """What actually served this target: the engine stats report and the
        number of native FUSE threads the worker logged (a figure measured
        on a fallback engine would otherwise pass for the native one)."""
        s = self._request(self.sock, {"cmd": "stats"})
        engine = str(s.get("engine", "python (no engine in stats)"))
        m = re.search(rb"serving FUSE with (\d+) (?:C|native) threads", Path(self.log.name).read_bytes())
        return f"{engine} engine, " + (f"{int(m.group(1))} native FUSE threads" if m else "no native FUSE threads")

    def compact(self) -> None:
        self._request(self.sock, {"cmd": "compact"}, timeout=600)

    def close(self) -> None:
        if not self.swap:
            _detach_loops_of(self.file)
            if getattr(self, "path", None):
                subprocess.run(["losetup", "-d", self.path], capture_output=True)  # found by name, not by file
        self.proc.terminate()
        try:
            self.proc.wait(300)  # swapoff brings back whatever is still in swap
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.swap:
            # Only if the daemon could not undo its own swap (killed above,
            # or it failed on the way up).
            for loop in _loops_of(self.file):
                subprocess.run(["swapoff", loop], capture_output=True)
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            if any(line.split()[1] == self.mnt for line in Path("/proc/mounts").read_text().splitlines()):
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.log.close()


class TmpfsLoopTarget(Target):
    def __init__(self, size: int, private: str) -> None:
        """``private``: a directory made by private_dir(), on tmpfs; the file
        receives a copy of the corpus."""
        self.name = "tmpfs-loop"
        self.file = os.path.join(private, "tmpfs-loop")
        fd = create_private(self.file)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            self.path = _sh("losetup", "--find", "--show", "--direct-io=on", self.file).strip()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        _detach_loops_of(self.file)
        if getattr(self, "path", None):
            subprocess.run(["losetup", "-d", self.path], capture_output=True)  # found by name, not by file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)


def engine_module() -> str:
    """Which build of the C engine an import of zswapd here loads, and when it
    was built: an editable install can resolve ``zswapd._engine`` to another
    checkout's build, so a figure could otherwise belong to other C code."""
    try:
        from . import _engine
    except ImportError:
        return "not built (python engine only)"
    path = Path(str(_engine.__file__))
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(path.stat().st_mtime))
    return f"{path} (built {built} UTC)"


def pyfuse3_available() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return True


def _dd_rate(args: list[str], nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return nbytes / (time.perf_counter() - t) / 1e6


def _fio_randread(dev: str, size: int, seconds: int, workdir: str) -> tuple[float, float, float]:
    # fio may leave state files (*-verify.state) in its working directory.
    out = _sh(
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
            lat[t.name].append(_fio_randread(t.path, size, latency_seconds, workdir))
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
        "lz4_compress_MBps": _median_rate(lambda: [lz4.block.compress(p, store_size=False) for p in pages], nbytes, 3),
        "lz4_decompress_MBps": _median_rate(
            lambda: [lz4.block.decompress(c, uncompressed_size=PAGE) for c in lz], nbytes, 3
        ),
        "zstd_compress_MBps": _median_rate(lambda: [zc.compress(p) for p in pages], nbytes, 3),
        "zstd_decompress_MBps": _median_rate(lambda: [zd.decompress(c, max_output_size=PAGE) for c in zs], nbytes, 3),
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


def _failed(name: str, e: BaseException) -> int:
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
    if os.geteuid() != 0:
        print("zswapd bench device: needs root (loop devices, zram, FUSE)", file=sys.stderr)
        return 2
    for tool in ("fio", "dd", "losetup", "cmp"):
        if shutil.which(tool) is None:
            print(f"zswapd bench device: {tool} not found (apt-get install fio util-linux)", file=sys.stderr)
            return 2
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
        return _failed("zswapd bench device", e)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(format_device(results))
    if plot:
        _plot(results, plot)
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
        corpus = _describe(corpus_file)
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
        native = results[f"zswapd-{algorithms[0]}"]
        ratios[f"zswapd-{algorithms[0]} native/pyfuse3 write_MBps"] = native["write_MBps"] / p3["write_MBps"]
        ratios[f"zswapd-{algorithms[0]} native/pyfuse3 read_MBps"] = native["read_MBps"] / p3["read_MBps"]
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


# -- recompression (issue #19) ---------------------------------------------------------


def ceiling_dictionary(pages: list[bytes], size: int, samples: int = 4096) -> bytes:
    """A dictionary trained as the daemon trains its own (Store.training_
    samples, engine.train): on up to ``samples`` pages spread evenly over
    the device, those a write stored compressed (not same-filled, not huge
    under lz4), with ZDICT_trainFromBuffer (the C engine's, when built)."""
    from . import engine as engine_mod
    from .bench_ceiling import codec_for
    from .codec import is_huge
    from .pool import HUGE_THRESHOLD

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
) -> int:
    """The recompression tier on one corpus of real memory, in one run:
    zswapd's ratio (orig_data_size / mem_used_total) after a full pass, against
    zram with lz4 and against the per-page ceiling on the same pages (same
    level, a dictionary trained the daemon's way, the engine's keep rule);
    the pass's pages per CPU-second; and the QD1 4 KiB read p99 of a
    recompressed device against an lz4 one holding the same pages, the two
    measured in alternation."""
    if os.geteuid() != 0:
        print("zswapd bench recompress: needs root (loop devices, zram, FUSE)", file=sys.stderr)
        return 2
    for tool in ("fio", "dd", "losetup", "cmp"):
        if shutil.which(tool) is None:
            print(f"zswapd bench recompress: {tool} not found (apt-get install fio util-linux)", file=sys.stderr)
            return 2
    try:
        with exit_on_signals(), private_dir() as private, private_dir(tempfile.gettempdir()) as workdir:
            results = _bench_recompress(
                corpus_size, corpus_file, repeat, latency_seconds, level, threshold, dictionary_size, workdir, private
            )
    except (OSError, subprocess.CalledProcessError, KeyboardInterrupt, RuntimeError) as e:
        return _failed("zswapd bench recompress", e)
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
) -> dict[str, Any]:
    from .bench_ceiling import ceiling, tier
    from .control import request

    corpus = _describe(corpus_file) if corpus_file else capture_corpus(corpus_size, os.path.join(private, "corpus"))
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
            _sh("dd", f"if={corpus.path}", f"of={t.path}", "bs=128K", f"count={count}", "oflag=direct",
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
                lat[name].append(_fio_randread(targets[name].path, nbytes, latency_seconds, workdir))
        for name, runs in lat.items():
            results[name]["randread_p50_us"] = statistics.median(x[0] for x in runs)
            results[name]["randread_p99_us"] = statistics.median(x[1] for x in runs)
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
    if "zram-lz4" in results:
        ratios["recompressed/zram-lz4 ratio"] = mine["ratio"] / results["zram-lz4"]["ratio"]
        ratios["lz4/zram-lz4 ratio"] = results["lz4"]["ratio"] / results["zram-lz4"]["ratio"]
    results["ratios"] = ratios
    return results


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
    lines += [f"  {k}: {v:.3f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


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


def _plot(r: dict[str, Any], path: str) -> None:
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


# -- application benchmark -------------------------------------------------------
#
# A real program that none of us wrote, with a working set larger than its
# cgroup-v1 memory limit, run with zram, with zswapd and with a loop device
# over a tmpfs file (the loop layer's floor) as the only swap.
#
# ``sort`` (GNU coreutils, one thread, an in-memory sort): it reads the whole
# input into one buffer and merge-sorts line records whose comparisons
# dereference the text at random, so every page of the buffer is touched
# again and again in no order; measured here it swaps in about its whole
# footprint at 1.5x.  ``xz -9`` (LZMA's bt4 match finder over a 64 MiB
# dictionary) is random too, but on this kernel memcg v1 reclaim gives up on
# it and the OOM killer fires even with zram at 1.3x, so it rarely finishes.

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


def _swaps() -> list[str]:
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


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
        proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs"), *argv],
            stdout=subprocess.PIPE, stderr=err, env=env,
        )  # fmt: skip
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


def _swapon(t: Target, priority: int) -> None:
    """mkswap and swapon the target's device; on failure the target is
    closed (which turns off whatever it turned on) and the error raised."""
    try:
        _sh("mkswap", t.path)
        _sh("swapon", "--priority", str(priority), t.path)
    except BaseException:
        t.close()
        raise


class ZramSwap(Target):
    """zram0 with ``algorithm`` as the only swap; close() turns it off and resets it."""

    def __init__(self, size: int, algorithm: str, priority: int) -> None:
        self.zram = ZramTarget(size, algorithm)
        self.name = f"zram-{algorithm}"
        self.path = self.zram.path
        _swapon(self, priority)

    def close(self) -> None:
        if self.path in _swaps():
            subprocess.run(["swapoff", self.path], capture_output=True)
        self.zram.close()


def bench_app(
    program: str = "sort",
    input_size: int = 192 * MIB,
    limit_ratio: float = 1.5,
    repeat: int = 3,
    algorithm: str = "lz4",
    timeout: float = 1800,
    as_json: bool = False,
    fuse_threads: int | None = None,
) -> int:
    """``program`` on a deterministic input, in a memory cgroup whose limit
    is its measured peak / ``limit_ratio``, with zram, zswapd and a
    tmpfs-backed loop device each as the only swap in turn (the order
    rotating between repetitions); medians of wall time over the runs that
    finished with the right output."""
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
    if _swaps():
        print(
            f"{name}: swap is already on ({', '.join(_swaps())}); turn it off first: each run needs its "
            "target as the only swap",
            file=sys.stderr,
        )
        return 2
    try:
        with exit_on_signals(), private_dir() as private, private_dir(tempfile.gettempdir()) as workdir:
            print(f"{name}: input in {private}, daemons run in {workdir}", file=sys.stderr, flush=True)
            results = _bench_app(
                program, input_size, limit_ratio, repeat, algorithm, timeout, private, workdir, fuse_threads
            )
    except (OSError, subprocess.CalledProcessError, RuntimeError, KeyboardInterrupt) as e:
        return _failed(name, e)
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
    runs: list[AppRun] = []
    serving = ""
    kinds = list(names)
    for i in range(repeat):
        # The order rotates, so that no target always runs first or always
        # follows the same other target's teardown.
        for kind in kinds[i % 3 :] + kinds[: i % 3]:
            with contextlib.ExitStack() as stack:
                t = _app_swap(kind, swap_size, algorithm, os.path.join(workdir, f"{kind}-{i}"), private, fuse_threads)
                t.name = names[kind]
                stack.callback(t.close)
                if _swaps() != [t.path]:
                    raise RuntimeError(f"expected {t.path} as the only swap, /proc/swaps has {_swaps()}")
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
    res = _summarise_app(program, argv, input_size, peak, limit, ref_wall, runs, list(names.values()), serving)
    res["reference_sha256"] = ref_hash
    return res


def _app_swap(
    kind: str, size: int, algorithm: str, workdir: str, private: str, fuse_threads: int | None = None
) -> Target:
    """One swap target, on: zram, zswapd (which turns on its own swap), or a
    loop device over a tmpfs file (the loop layer's floor: no compression,
    the same block path as zswapd's)."""
    if kind == "zram":
        return ZramSwap(size, algorithm, APP_PRIORITY)
    if kind == "zswapd":
        os.makedirs(workdir)
        return ZswapdTarget(size, algorithm, workdir, swap_priority=APP_PRIORITY, fuse_threads=fuse_threads)
    return TmpfsLoopSwap(size, private, APP_PRIORITY)


class TmpfsLoopSwap(TmpfsLoopTarget):
    """A loop device over a tmpfs file as the only swap."""

    def __init__(self, size: int, private: str, priority: int) -> None:
        super().__init__(size, private)
        _swapon(self, priority)

    def close(self) -> None:
        for loop in _loops_of(self.file):  # swapoff before the loop device can go
            if loop in _swaps():
                subprocess.run(["swapoff", loop], capture_output=True)
        super().close()


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
