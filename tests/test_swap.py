"""Real swap under memory pressure through zswapd.

Privilege: root, /dev/fuse, loop devices, swapon/swapoff and the cgroup-v1
memory controller (v2 where that is what the machine has).  Runs in CI.
Fixtures undo swap, loop devices, mounts, cgroups and processes on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Daemon, memory_cgroup, run_daemon

pytestmark = pytest.mark.root

WORKER = str(Path(__file__).with_name("pressure_worker.py"))
CG_LIMIT = 64 << 20
SWAP = {"device": {"size": "1G"}, "swap": {"enable": True}, "compaction": {"background": True, "interval": 0.2}}


def vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            out[k] = int(v)
    return out


def dmesg_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


def run_in_cgroup(cg: Path, argv: list[str], **kw: object) -> subprocess.Popen[str]:
    def enter() -> None:
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen(argv, preexec_fn=enter, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def device_pages(loop: str) -> tuple[int, int]:
    """(pages read, pages written) on ``loop`` since it was attached, from
    /sys/block/*/stat (sectors of 512 bytes).  Counted on our device, not
    /proc/vmstat's pswpin/pswpout, which count every swap device: another
    swap on the machine, or DAMON paging anyone out, would skew a ratio."""
    fields = Path(f"/sys/block/{os.path.basename(loop)}/stat").read_text().split()
    return int(fields[2]) // 8, int(fields[6]) // 8


def swap_used_pages(loop: str) -> int:
    with open("/proc/swaps") as f:
        for line in f:
            parts = line.split()
            if parts[0] == loop:
                return int(parts[3]) // 4  # KiB -> pages
    return 0


def wait_drained(d: Daemon, loop: str, peak: int, timeout: float = 30) -> tuple[int, int]:
    """Wait until the pool holds no more than what swap still uses.

    Returns (pages in the pool, pages swap uses).  Swap may legitimately hold
    other processes' pages: this VM runs DAMON proactive reclaim (kdamond),
    which pages cold memory out to any swap there is.  The kernel discards a
    2 MiB cluster only when all of it is free, so clusters shared with such
    pages keep some stale pages in the pool: 5% of the round is allowed."""
    deadline = time.monotonic() + timeout
    while True:
        left = int(d.stats()["pages_stored"])  # type: ignore[call-overload]
        used = swap_used_pages(loop)
        if left <= used + max(512, peak // 20) or time.monotonic() > deadline:
            return left, used
        time.sleep(0.2)


def assert_clean(loop: str | None, mountpoint: Path) -> None:
    with open("/proc/swaps") as f:
        assert loop is None or loop not in f.read()
    assert not os.path.ismount(mountpoint)
    if loop:
        r = subprocess.run(["losetup", loop], capture_output=True, text=True)
        assert r.returncode != 0 or "swap" not in r.stdout


@pytest.mark.parametrize("engine", ["native", "python"])
def test_swap_under_memory_pressure_verifies_every_byte(tmp_path: Path, engine: str) -> None:
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, **SWAP, pool={"engine": engine}) as d:  # type: ignore[arg-type]
        assert d.stats()["engine"] == engine
        loop = d.stats()["device"]["loop"]  # type: ignore[index]
        assert loop and loop in open("/proc/swaps").read()
        assert open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
        with memory_cgroup("zswapd-test-pressure", CG_LIMIT) as cg:
            for rnd in range(3):
                v0, s0 = device_pages(loop), d.stats()
                w = run_in_cgroup(cg, [sys.executable, WORKER, "300", "3"])
                out, _ = w.communicate(timeout=600)
                assert w.returncode == 0, out
                assert out.count(": 0 bad pages") == 3, out  # every byte, three times
                v1, s1 = device_pages(loop), d.stats()
                swapped_in, swapped_out = v1[0] - v0[0], v1[1] - v0[1]
                writes = int(s1["num_writes"]) - int(s0["num_writes"])  # type: ignore[call-overload]
                reads = int(s1["num_reads"]) - int(s0["num_reads"])  # type: ignore[call-overload]
                left, used = wait_drained(d, loop, swapped_out)
                s2 = d.stats()
                print(
                    f"round {rnd}: pages swapped out +{swapped_out} in +{swapped_in}; daemon writes +{writes} reads +{reads};"
                    f" peak {s1['mem_used_max']} B; after exit: pool {left} pages, swap uses {used}; ratio "
                    f"{s1['orig_data_size'] / max(1, s1['mem_used_total']):.2f}"  # type: ignore[operator]
                )
                assert swapped_out > 20000 and swapped_in > 10000  # real swap traffic
                assert writes > 0 and reads > 0
                freed = int(s2["notify_free"]) - int(s0["notify_free"])  # type: ignore[call-overload]
                print(f"  discards freed {freed} pages")
                assert freed >= 0.85 * swapped_out, "discards did not reach the pool"
                assert left <= used + max(512, swapped_out // 20), "discards did not free the pool"
        s = d.stats()
        assert s["failed_writes"] == 0 and s["failed_reads"] == 0 and s["fuse_errors"] == 0
        assert d.stop() == 0, d.logtext()
    assert_clean(loop, d.mountpoint)
    new = dmesg_lines()[dmesg_before:]
    bad = [line for line in new if "error, dev loop" in line or "operation not supported" in line]
    assert not bad, bad


def test_stress_ng_vm_verify(tmp_path: Path) -> None:
    with run_daemon(tmp_path, **SWAP) as d, memory_cgroup("zswapd-test-stress", CG_LIMIT) as cg:  # type: ignore[arg-type]
        v0 = vmstat()
        w = run_in_cgroup(
            cg,
            ["stress-ng", "--vm", "1", "--vm-bytes", "200M", "--vm-keep", "--verify", "--timeout", "20s",
             "--metrics-brief"],
        )  # fmt: skip
        out, _ = w.communicate(timeout=300)
        swapped = vmstat()["pswpout"] - v0["pswpout"]
        print(out[-2000:])
        print(f"pswpout +{swapped}")
        assert w.returncode == 0, out
        assert "fail" not in out.lower() or " 0 failed" in out.lower() or "failed: 0" in out.lower(), out
        assert swapped > 10000
        assert d.stop() == 0


def test_sigterm_during_pressure_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM mid-run.  swapoff must charge every returning page to the
    owner's full cgroup, so it fails (ENOMEM: the OOM killer is disabled for
    the cgroup, as an operator would do to protect it).  The daemon must say
    so and keep serving with swap on.  Once the cgroup has room, the worker
    verifies every byte and a second SIGTERM shuts down cleanly."""
    with run_daemon(tmp_path, **SWAP) as d, memory_cgroup("zswapd-test-term", CG_LIMIT) as cg:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        oom = cg / "memory.oom_control"
        if oom.exists():
            oom.write_text("1")  # swapoff gets ENOMEM instead of the OOM killer
        w = run_in_cgroup(cg, [sys.executable, WORKER, "200", "4"])
        assert w.stdout is not None
        assert w.stdout.readline().strip() == "filled"
        assert swap_used_pages(loop) > 10000  # the worker really is in swap
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while d.proc.poll() is None and "still serving" not in d.logtext() and time.monotonic() < deadline:
            time.sleep(0.2)
        first_failed = d.proc.poll() is None
        if first_failed:
            assert "still serving" in d.logtext()
            assert loop in open("/proc/swaps").read()  # never exits with swap active
            assert d.stats()["ok"]
        # Room for the worker; a limit change also wakes tasks waiting on memcg OOM.
        limit = cg / "memory.limit_in_bytes"
        (limit if limit.exists() else cg / "memory.max").write_text(str(2 << 30))
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out
        assert out.count(": 0 bad pages") == 4, out
        if first_failed:
            d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(120) == 0, d.logtext()
        print(f"first swapoff failed: {first_failed}")
        print(d.logtext()[-2000:])
        assert "stopped" in d.logtext()
    assert_clean(loop, d.mountpoint)


def test_sd_notify_ready_after_swapon(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    os.environ["NOTIFY_SOCKET"] = path
    try:
        with run_daemon(tmp_path, **SWAP) as d:  # type: ignore[arg-type]
            msgs = []
            while not any("READY=1" in m for m in msgs):
                msgs.append(sock.recv(4096).decode())
            ready = next(m for m in msgs if "READY=1" in m)
            loop = d.stats()["device"]["loop"]  # type: ignore[index]
            assert "STATUS=" in ready and str(loop) in ready
            assert str(loop) in open("/proc/swaps").read()  # swap was on before READY
            assert d.stop() == 0
            msgs.append(sock.recv(4096).decode())
            assert any("STOPPING=1" in m for m in msgs)
    finally:
        del os.environ["NOTIFY_SOCKET"]
        sock.close()


def test_no_loop_device_fails_before_mounting(tmp_path: Path) -> None:
    """In a mount namespace whose /dev has /dev/fuse but no loop devices,
    swap cannot be set up: exit 2 before mounting, nothing left behind."""
    from conftest import write_config

    cfg = tmp_path / "c.toml"
    mp = tmp_path / "m"
    write_config(cfg, mp, str(tmp_path / "ctl/s.sock"), swap={"enable": True})
    script = (
        "mount -t tmpfs none /dev && mknod /dev/fuse c 10 229 && mknod /dev/null c 1 3 && "
        f"exec {sys.executable} -m zswapd run --config {cfg}"
    )
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "swap is enabled but cannot be set up" in r.stderr and "loop" in r.stderr, r.stderr
    assert not os.path.ismount(mp) and not mp.exists()
