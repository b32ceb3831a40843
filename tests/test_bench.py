"""`zswapd bench` works end to end on a small corpus.  No timing is asserted.

Privilege: root (loop devices, zram, a FUSE mount).  Runs in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import force_cleanup

from zswapd.bench import create_private, describe_corpus, exit_on_signals, private_dir, remove_cgroup, sample_pages
from zswapd.swap import loops_backed_by

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "zswapd", "bench", "device", "--repeat", "1", "--latency-seconds", "1", "--json",
         "--algorithms", "lz4"]  # fmt: skip


def _dirs_named(stderr: str) -> tuple[Path, Path]:
    """The private directory and the work directory the bench announced."""
    m = re.search(r"kept in (\S+) \(mode 0700\).*daemons run in (\S+)", stderr)
    assert m, stderr
    return Path(m.group(1)), Path(m.group(2))


def _daemons_under(workdir: Path) -> list[int]:
    """Pids of daemons the bench started with a config inside ``workdir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"run" in argv and any(a.startswith(os.fsencode(f"{workdir}/")) for a in argv):
                    pids.append(int(entry.name))
    return pids


def _nothing_left(private: Path, workdir: Path) -> None:
    assert not private.exists() and not workdir.exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(private) not in loops and str(workdir) not in loops, loops
    assert str(workdir) not in Path("/proc/mounts").read_text()
    assert not _daemons_under(workdir)


def test_bench_pool_prints_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zswapd", "bench", "pool", "--pages", "500", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    r = json.loads(out)
    assert {"lz4_store_MBps", "raw_lz4_compress_MBps", "store_vs_raw_lz4_compress", "lz4_metadata_B_per_page"} <= set(r)


def test_corpus_description_counts_same_filled(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    path.write_bytes(bytes(4096) * 3 + b"\x07" * 4096 + b"".join(sample_pages(4)))
    c = describe_corpus(str(path))
    assert (c.pages, c.zero_pages, c.same_pages) == (8, 3, 4)


def test_private_files(tmp_path: Path) -> None:
    with private_dir(str(tmp_path)) as d:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        path = os.path.join(d, "dump")
        os.close(create_private(path))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(FileExistsError):  # O_EXCL: never reuse a file
            create_private(path)
        os.symlink(str(tmp_path / "elsewhere"), os.path.join(d, "link"))
        with pytest.raises(FileExistsError):  # nor follow a planted link
            create_private(os.path.join(d, "link"))
        assert not (tmp_path / "elsewhere").exists()
    assert not os.path.exists(d)
    with pytest.raises(RuntimeError), private_dir(str(tmp_path)) as d:
        raise RuntimeError("an error on the way")
    assert not os.path.exists(d)


def test_sigterm_becomes_system_exit() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e, exit_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.root
def test_bench_device_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(BENCH + ["--corpus-size", "8M"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _nothing_left(*_dirs_named(r.stderr))
    assert not list(ROOT.glob("*-verify.state"))
    res = json.loads(r.stdout)
    assert res["corpus"]["pages"] >= 1024
    for target in ("tmpfs-loop", "zswapd-lz4"):
        assert res[target]["verified"] == 1.0, target  # every byte read back equal
    z = res["zswapd-lz4"]
    assert z["ratio"] > 1 and 0 < z["frag_after_compact"] <= 1 and z["metadata_B_per_page"] > 0
    if "zram-lz4" in res:
        assert res["zram-lz4"]["verified"] == 1.0
        assert "zswapd-lz4/zram-lz4 ratio" in res["ratios"]
    # nothing left behind
    assert "zswapd" not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert Path("/sys/block/zram0/disksize").read_text().strip() == "0"


@pytest.mark.root
def test_bench_device_sigterm_mid_run_leaves_nothing() -> None:
    """SIGTERM once the captured corpus and its tmpfs-loop copy exist: the
    files were private while they existed, and nothing is left after."""
    proc = subprocess.Popen(BENCH + ["--corpus-size", "4M"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, cwd=ROOT)  # fmt: skip
    private = workdir = None
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        private, workdir = _dirs_named(first)
        deadline = time.monotonic() + 300
        while not (private / "tmpfs-loop").exists():
            assert proc.poll() is None and time.monotonic() < deadline, first + proc.stderr.read()
            time.sleep(0.05)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        for name in ("corpus", "tmpfs-loop"):
            st_ = (private / name).lstat()
            assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == 0, name
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(300) == 128 + signal.SIGTERM, rest
        assert "Traceback" not in rest, rest
        _nothing_left(private, workdir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # only if the bench failed to clean up after itself
        if workdir is not None and workdir.exists():
            for mnt in workdir.glob("*/mnt"):
                force_cleanup(str(mnt))
            for pid in _daemons_under(workdir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(workdir, ignore_errors=True)
        if private is not None and private.exists():
            for loop in loops_backed_by(str(private / "tmpfs-loop")):
                subprocess.run(["losetup", "-d", loop], check=False)
            shutil.rmtree(private, ignore_errors=True)


APP = [sys.executable, "-m", "zswapd", "bench", "app", "--repeat", "1", "--input-size", "4M", "--limit-ratio", "1.3", "--json",
       "--algorithms", "lz4"]  # fmt: skip


def _swaps() -> list[str]:
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


@pytest.mark.root
def test_bench_app_end_to_end() -> None:
    """A real program in a memory cgroup with zram, zswapd and a tmpfs loop
    device, each in turn, as its only swap: it runs, each finished run's output equals the run without swap,
    and swap, cgroups, loop devices, mounts and daemons are all gone after."""
    assert not _swaps(), "the app bench needs swap off; something else left it on"
    r = subprocess.run(APP, capture_output=True, text=True, timeout=900, cwd=ROOT)
    try:
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["limit_bytes"] < res["peak_bytes"]
        assert [run["target"] for run in res["runs"]] == ["zram-lz4", "zswapd-lz4", "tmpfs-loop"]
        assert "native" in res["zswapd_serving"] or "python" in res["zswapd_serving"]
        for run in res["runs"]:
            # Under memcg v1 thrashing the OOM killer may fire; the bench must
            # say so.  Any run that finished produced the right output.
            assert run["status"] in ("ok", "oom-killed"), run
            if run["status"] == "ok":
                assert run["sha256"] == res["reference_sha256"]
            else:
                assert run["oom_kills"] > 0
        assert not res["wrong_output"]
    finally:
        m = re.search(r"input in (\S+), daemons run in (\S+)", r.stderr)
        assert m, r.stderr
        private, workdir = Path(m.group(1)), Path(m.group(2))
        leftovers = [p.name for p in Path("/sys/fs/cgroup/memory").iterdir() if p.name.startswith("zswapd-bench-app")]
        swaps = _swaps()
        for dev in swaps:  # only if the bench failed to clean up after itself
            subprocess.run(["swapoff", dev], check=False)
        for mnt in workdir.glob("*/mnt"):
            force_cleanup(str(mnt))
    assert not swaps and not leftovers
    assert Path("/sys/block/zram0/disksize").read_text().strip() == "0"
    _nothing_left(private, workdir)


TIERS = [sys.executable, "-m", "zswapd", "bench", "tiers", "--repeat", "1", "--cold", "24M", "--hot", "16M",
         "--cgroup-limit", "16M", "--tier-memory", "8M", "--cycles", "2", "--corpus-size", "8M",
         "--latency-size", "4M", "--latency-seconds", "1", "--json"]  # fmt: skip
ZSWAP = Path("/sys/module/zswap/parameters")


def _zswap_params() -> dict[str, str]:
    return {p.name: p.read_text() for p in ZSWAP.iterdir() if p.is_file()}


def _tiers_dirs(stderr: str) -> tuple[Path, Path, Path]:
    m = re.search(r"pages in (\S+), daemons run in (\S+), disk files in (\S+)", stderr)
    assert m, stderr
    return Path(m.group(1)), Path(m.group(2)), Path(m.group(3))


def _tiers_cleanup_checked(stderr: str, swaps_before: list[str], zswap_before: dict[str, str]) -> None:
    """Whatever the bench left (cleaned up here, then asserted absent)."""
    private, workdir, diskdir = _tiers_dirs(stderr)
    leftovers = [p.name for p in Path("/sys/fs/cgroup/memory").iterdir() if p.name.startswith("zswapd-bench-tiers")]
    swaps = _swaps()
    zswap_after = _zswap_params()
    for dev in set(swaps) - set(swaps_before):  # only if the bench failed to clean up after itself
        subprocess.run(["swapoff", dev], check=False)
    if zswap_after != zswap_before:
        (ZSWAP / "enabled").write_text(zswap_before["enabled"])
    for mnt in workdir.glob("*/mnt"):
        force_cleanup(str(mnt))
    for name in leftovers:
        remove_cgroup(Path("/sys/fs/cgroup/memory") / name)
    left_disk = diskdir.exists()
    shutil.rmtree(diskdir, ignore_errors=True)
    assert swaps == swaps_before and not leftovers and zswap_after == zswap_before and not left_disk
    assert Path("/sys/block/zram0/disksize").read_text().strip() == "0"
    _nothing_left(private, workdir)


@pytest.mark.root
def test_bench_tiers_end_to_end() -> None:
    """The LRU-inversion workload on zswapd with writeback, on zram with a
    disk swap file and on the kernel's zswap, small: every run ends with
    every page verified, zswapd wrote pages back, the written-back reads
    verify, and swap, zswap's parameters, zram, cgroups, files and daemons
    are as they were after."""
    swaps_before, zswap_before = _swaps(), _zswap_params()
    r = subprocess.run(TIERS, capture_output=True, text=True, timeout=900, cwd=ROOT)
    try:
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert [run["target"] for run in res["runs"]] == ["zswapd", "zram", "zswap"]
        for run in res["runs"]:
            assert run["status"] == "ok" and run["verify"] == "ok", run
            assert run["hot_bad"] == 0 and run["verified_bad"] == 0, run
        zswapd = res["runs"][0]
        assert zswapd["written_back"] > 0 and zswapd["detail"]["failed_writes"] == 0, zswapd
        assert res["sizes"]["tier"] == 8 << 20 and res["sizes"]["zswap_percent"] >= 1
        lat = res["latency"]
        assert lat["verified"] and lat["written_back"] == lat["pages"], lat
        assert lat["readback"]["bd_reads"] >= lat["pages"], lat
        assert {"zswapd-backed", "disk-file"} <= set(lat)
    finally:
        _tiers_cleanup_checked(r.stderr, swaps_before, zswap_before)


@pytest.mark.root
def test_bench_tiers_sigterm_while_zswap_is_on_restores_it() -> None:
    """SIGTERM while the zswap target runs: the bench exits 128+SIGTERM
    without a traceback, with zswap's parameters as it found them, the swap
    file off and removed, the cgroup gone."""
    swaps_before, zswap_before = _swaps(), _zswap_params()
    proc = subprocess.Popen(TIERS + ["--targets", "zswap", "--cycles", "50"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, cwd=ROOT)  # fmt: skip
    first = rest = ""
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        _tiers_dirs(first)
        deadline = time.monotonic() + 300
        while (ZSWAP / "enabled").read_text().strip() != "Y" or not [
            p for p in Path("/sys/fs/cgroup/memory").iterdir() if p.name.startswith("zswapd-bench-tiers")
        ]:
            assert proc.poll() is None and time.monotonic() < deadline, first
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(300) == 128 + signal.SIGTERM, rest
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _tiers_cleanup_checked(first + rest, swaps_before, zswap_before)
