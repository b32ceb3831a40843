"""Writeback in the daemon: real swap of a program twice the pool's limit in
a memory cgroup, its pages spread over the pool and the backing file,
verified byte for byte through discards, cleaning and rewrites; worker
kills while writeback, cleaning and backed reads run; `zswapd writeback`;
the daily limit; bad setups refused with a clear error.

Privilege: root, /dev/fuse, loop devices, swap and the cgroup-v1 memory
controller.  Runs in CI (run it alone on a shared machine:
it swaps for real and kills a swap backend).  The backing file lives on
the root disk (/var/tmp), never on tmpfs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, memory_cgroup, run_daemon
from test_failclosed import bring_others_home, wait_for
from test_swap import CG_LIMIT, assert_clean, dmesg_lines, run_in_cgroup, swap_used_pages

from zswapd import backing

pytestmark = pytest.mark.root

PROGRAM = str(Path(__file__).with_name("writeback_worker.py"))
MIB = 1 << 20
POOL_LIMIT = 24 * MIB


@pytest.fixture
def disk() -> Iterator[Path]:
    """A directory on the root disk for the backing file (not tmpfs)."""
    d = Path(tempfile.mkdtemp(prefix="zswapd-wb-", dir="/var/tmp"))
    fd = os.open(d, os.O_RDONLY)
    try:
        assert backing.fs_type(fd) not in backing._MEMORY_FS, "/var/tmp must be on a disk filesystem"
    finally:
        os.close(fd)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sections(disk: Path, engine: str = "native", **writeback: object) -> dict[str, dict[str, object]]:
    return {
        "device": {"size": "1G"},
        "swap": {"enable": True},
        "pool": {"memory_limit": POOL_LIMIT, "engine": engine},
        "compaction": {"background": True, "interval": 0.2},
        "writeback": {"enable": True, "file": str(disk / "backing"), "size": "512M", **writeback},
    }


def stat(d: Daemon, key: str) -> int:
    return int(d.stats()[key])  # type: ignore[call-overload]


def wb(d: Daemon) -> dict[str, int]:
    w = d.stats()["writeback"]
    assert isinstance(w, dict), w
    return w


def worker_pid(d: Daemon) -> int:
    return int(d.stats()["process"]["worker_pid"])  # type: ignore[index]


def read_lines(proc: subprocess.Popen[str], into: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: into.extend(proc.stdout or []), daemon=True)
    t.start()
    return t


def no_swap_errors(before: int, loop: str) -> None:
    dev = f"dev {os.path.basename(loop)},"
    bad = [x for x in dmesg_lines()[before:] if dev in x or "Read-error on swap" in x or "Write-error on swap" in x]
    assert not bad, bad


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_program_twice_the_pool_spreads_over_pool_and_file_and_verifies(
    tmp_path: Path, disk: Path, engine: str
) -> None:
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, **sections(disk, engine)) as d:  # type: ignore[arg-type]
        assert (disk / "backing").stat().st_size == 512 * MIB
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        with memory_cgroup("zswapd-test-writeback", CG_LIMIT) as cg:
            w = run_in_cgroup(cg, [sys.executable, PROGRAM, "200", "2"], cwd=str(Path(__file__).parent))
            out, _ = w.communicate(timeout=900)
            s = d.stats()
            print(out)
            print(
                f"{engine}: bd_count {s['bd_count']} bd_writes {s['bd_writes']} bd_reads {s['bd_reads']} "
                f"pool {s['mem_used_total']} of {POOL_LIMIT}; writeback {s['writeback']}"
            )
            assert w.returncode == 0, out
            assert out.count(": 0 bad pages") == 3, out  # before and after the discards and rewrites
            # Twice the pool: most of what was swapped went through the file.
            assert stat(d, "bd_writes") * 4096 > POOL_LIMIT, s
            assert stat(d, "bd_reads") > 1000, s
            assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
            wait_for(lambda: swap_used_pages(loop) < 1000, timeout=60, what="the program's swap freed")
            # What the program freed is dead in the file; cleaning frees segments.
            wait_for(lambda: wb(d)["segments_cleaned"] > 0, timeout=60, what="segments cleaned")
        assert d.stop() == 0, d.logtext()
        assert "backing file" in d.logtext()
    assert not (disk / "backing").exists(), "the backing file outlived the daemon"
    assert_clean(loop, d.mountpoint)
    no_swap_errors(dmesg_before, loop)


def test_worker_kills_during_writeback_cleaning_and_backed_reads(tmp_path: Path, disk: Path) -> None:
    """The pool is a tenth of what is swapped: writeback (the write path's
    ladder and the background), cleaning and reads from the file run all
    the time; the worker is killed in the middle of them, again and again."""
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, **sections(disk)) as d, memory_cgroup("zswapd-test-wbkill", CG_LIMIT) as cg:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        rounds = 12
        w = run_in_cgroup(cg, [sys.executable, PROGRAM, "200", str(rounds)], cwd=str(Path(__file__).parent))
        lines: list[str] = []
        kills = 0
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = read_lines(w, lines)
            wait_for(lambda: stat(d, "bd_count") > 5000, timeout=120, what="pages in the backing file")
            rng = random.Random(11)
            seen = {"writes": 0, "reads": 0, "cleaned": 0}
            while kills < 10 and w.poll() is None:
                time.sleep(rng.uniform(0.1, 0.8))
                s = d.stats()
                seen["writes"] = max(seen["writes"], int(s["bd_writes"]))  # type: ignore[call-overload]
                seen["reads"] = max(seen["reads"], int(s["bd_reads"]))  # type: ignore[call-overload]
                old = int(s["process"]["worker_pid"])  # type: ignore[index]
                bring_others_home({w.pid, d.proc.pid, old})
                os.kill(old, signal.SIGKILL)
                kills += 1
                wait_for(lambda old=old: worker_pid(d) != old, timeout=60, what="a new worker")
            w.wait(timeout=1200)
            reader.join(10)
            out = "".join(lines)
            assert w.returncode == 0, out
            assert out.count(": 0 bad pages") == rounds + 1, out
        finally:
            if w.poll() is None:
                w.kill()
        s = d.stats()
        print(f"{kills} kills; bd_writes {s['bd_writes']} bd_reads {s['bd_reads']} writeback {s['writeback']}")
        assert kills >= 5, "the program finished before the kills did; raise rounds"
        assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
        assert int(s["bd_reads"]) > seen["reads"] > 0 and seen["writes"] > 0  # type: ignore[call-overload]
        assert d.stop() == 0, d.logtext()
    assert_clean(loop, d.mountpoint)
    no_swap_errors(dmesg_before, loop)


def _cli(d: Daemon, *argv: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    args = [*argv, "--socket", d.socket]
    if not uid:
        cmd = [sys.executable, "-m", "zswapd", *args]
    else:
        # Import as root, then drop to ``uid``: the interpreter's site-packages
        # may be private to root (a user site under a 0700 home), and what is
        # tested is the daemon's refusal, not whether nobody can import trio.
        cmd = [
            sys.executable,
            "-c",
            "import os, sys, zswapd.cli, zswapd.control; "
            f"os.setgroups([]); os.setgid({uid}); os.setuid({uid}); "
            f"sys.exit(zswapd.cli.main({args!r}))",
        ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _fill(fd: int, first: int, count: int, seed: int) -> dict[int, bytes]:
    rnd = random.Random(seed)
    pages = {}
    for i in range(first, first + count, 64):
        batch = []
        for k in range(64):
            n = rnd.randrange(900, 2400)
            batch.append((i + k).to_bytes(8, "little") + rnd.randbytes(n) + bytes(4096 - 8 - n))
        os.pwrite(fd, b"".join(batch), i * 4096)
        for k, p in enumerate(batch):
            pages[i + k] = p
    return pages


def test_the_writeback_command_and_the_daily_limit(tmp_path: Path, disk: Path) -> None:
    """Block I/O on the device (no swap): `zswapd writeback` writes back what
    it is asked to, as root only; the ladder writes back before full and
    reports full once the day's limit is spent, never beyond it."""
    limit = 8 * MIB
    with run_daemon(
        tmp_path,
        device={"size": "256M"},
        pool={"memory_limit": "8M"},
        writeback={"enable": True, "file": str(disk / "backing"), "size": "64M", "daily_limit": limit},
    ) as d:
        fd = os.open(d.file, os.O_RDWR)
        try:
            pages = _fill(fd, 0, 1024, 1)  # 4 MiB, about 1.7 MiB compressed: fits the pool
            assert stat(d, "bd_count") == 0
            r = _cli(d, "writeback", "--max-pages", "300")
            assert r.returncode == 0 and "wrote back 300 pages" in r.stdout, r
            assert stat(d, "bd_count") == 300
            r = _cli(d, "writeback", "--max-pages", "10", uid=65534)
            assert r.returncode != 0 and ("permission denied" in r.stderr or "needs root" in r.stderr), r
            assert stat(d, "bd_count") == 300
            # Writes beyond the pool go on through the file until the day's limit is spent.
            full = False
            at = 1024
            while not full and at < 65536:
                try:
                    pages.update(_fill(fd, at, 256, at))
                except OSError as e:
                    assert e.errno == 28, e  # ENOSPC
                    full = True
                at += 256
            w = wb(d)
            print(f"full after {at} pages; writeback {w}; bd_count {stat(d, 'bd_count')}")
            assert full and d.stats()["full"]
            assert limit - backing.MAX_SPAN < w["written_today"] <= limit, w
            assert w["daily_limit"] == limit and w["live_bytes"] > 0
            r = _cli(d, "writeback")
            assert r.returncode == 0 and "stopped: the daily limit is spent" in r.stdout, r
            for idx, p in pages.items():
                if os.pread(fd, 4096, idx * 4096) != p:
                    at = idx
                    break
            else:
                at = -1
            assert at == -1, f"page {at} differs"  # some were partially written at ENOSPC: none may differ
            text = _cli(d, "stats").stdout
            assert "writeback " in text and " pages, live " in text, text
            prom = _cli(d, "stats", "--prometheus").stdout
            for name in ("zswapd_bd_count", "zswapd_bd_reads_total", "zswapd_bd_writes_total",
                         "zswapd_writeback_live_bytes", "zswapd_writeback_written_today"):  # fmt: skip
                assert f"\n{name} " in prom, (name, prom)
        finally:
            os.close(fd)
        assert d.stop() == 0, d.logtext()


def _refused(tmp_path: Path, name: str, **writeback: object) -> str:
    """Start a daemon with ``writeback``; it must refuse to start: its log."""
    with run_daemon(tmp_path, name=name, ready=False, writeback={"enable": True, **writeback}) as d:
        assert d.proc.wait(60) == 2, d.logtext()
        return d.logtext()


def test_bad_setups_are_refused_with_a_clear_error(tmp_path: Path, disk: Path) -> None:
    shm = tmp_path / "tmpfs"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128M,mode=0755", "tmpfs", str(shm)], check=True)
    try:
        log = _refused(tmp_path, "shm", file=str(shm / "backing"), size="64M")
        assert "is on tmpfs, whose pages live in memory" in log and "Traceback" not in log, log
        assert not (shm / "backing").exists()
    finally:
        subprocess.run(["umount", str(shm)], check=True)
    log = _refused(tmp_path, "own", file=str(tmp_path / "own-mnt" / "backing"), size="64M")
    assert "expected a path outside [device] mountpoint" in log and "Traceback" not in log, log
    log = _refused(tmp_path, "size", file=str(disk / "backing"), size=1000 * 4096 + 100)
    assert "[writeback] size = 4096100: expected a size that is a multiple of the block size" in log, log
    log = _refused(tmp_path, "nofile", size="64M")
    assert "[writeback] enable = true needs [writeback] file" in log, log
    log = _refused(tmp_path, "nodir", file=str(disk / "no" / "such" / "backing"), size="64M")
    assert "cannot resolve" in log or "cannot open it O_DIRECT" in log, log
