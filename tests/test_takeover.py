"""Surviving the worker's death: kills and reloads under real swap pressure
and under block I/O, with every byte verified.

Privilege: root, /dev/fuse, loop devices, swap and the cgroup-v1 memory
controller.  Runs in CI.  Before each deliberate kill the test checks that
no process but its own pressure worker has pages in swap (this VM's DAMON
pages cold memory out to any swap).  Fixtures clean up on failure.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, memory_cgroup, run_daemon
from test_failclosed import bring_others_home, wait_for
from test_swap import CG_LIMIT, SWAP, WORKER, assert_clean, dmesg_lines, run_in_cgroup, swap_used_pages

pytestmark = pytest.mark.root

GENVERIFY = str(Path(__file__).with_name("genverify.py"))


def worker_pid(d: Daemon) -> int:
    return int(d.stats()["process"]["worker_pid"])  # type: ignore[index]


def kill_worker(d: Daemon, exclude: set[int]) -> float:
    """SIGKILL the worker; return the recovery time the new one reports."""
    old = worker_pid(d)
    bring_others_home(exclude | {d.proc.pid, old})
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
    process = d.stats()["process"]
    wait_for(lambda: d.stats()["process"]["last_recovery_ms"] is not None, what="recovery time")  # type: ignore[index]
    process = d.stats()["process"]
    assert process["supervisor_pid"] == d.proc.pid  # type: ignore[index]
    return float(process["last_recovery_ms"])  # type: ignore[index]


def cli(d: Daemon, *argv: str) -> str:
    """Run `zswapd ARGV --socket ...` against ``d``; its stdout."""
    r = subprocess.run(
        [sys.executable, "-m", "zswapd", *argv, "--socket", d.socket], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def read_lines(proc: subprocess.Popen[str], into: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: into.extend(proc.stdout or []), daemon=True)
    t.start()
    return t


def report(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name}: {len(ms)} takeovers, recovery median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms")


def test_worker_killed_20_times_under_swap_pressure(tmp_path: Path) -> None:
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, **SWAP) as d, memory_cgroup("zswapd-test-takeover", CG_LIMIT) as cg:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        rounds = 25
        w = run_in_cgroup(cg, [sys.executable, WORKER, "330", str(rounds)])
        lines: list[str] = []
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = read_lines(w, lines)
            # The bar: at least 250 MB of the program in our swap.
            wait_for(lambda: swap_used_pages(loop) * 4096 >= 250e6, what="250 MB in our swap")
            rng = random.Random(7)
            recoveries = []
            for _ in range(20):
                time.sleep(rng.uniform(0.05, 0.6))
                assert w.poll() is None, "the verifying program ended early: " + "".join(lines)
                recoveries.append(kill_worker(d, {w.pid}))
            verified_before = len(lines)
            w.wait(timeout=900)
            reader.join(10)
            out = "".join(lines)
            assert w.returncode == 0, out  # never killed, nothing corrupt
            assert out.count(": 0 bad pages") == rounds, out
            assert verified_before < rounds, "the program finished before the kills ended; raise rounds"
        finally:
            if w.poll() is None:
                w.kill()
        report("swap pressure", recoveries)
        s = d.stats()
        assert s["process"]["worker_restarts"] == 20  # type: ignore[index]
        assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
        assert d.stop() == 0, d.logtext()
        # A worker forked after swapon must not hold the loop device open:
        # the detach would wait for it, then take our own device for a
        # stranger's, and the unmount would find the file busy.
        log = d.logtext()
        assert f"detached {loop}\n" in log and "another process had attached" not in log, log
        assert "lazily" not in log, log
    assert_clean(loop, d.mountpoint)
    dev = f"dev {os.path.basename(loop)},"
    new = dmesg_lines()[dmesg_before:]
    bad = [x for x in new if dev in x or "Read-error on swap" in x]
    assert not bad, bad


@pytest.mark.parametrize("engine", ["native", "python"])
def test_block_io_with_worker_killed_10_times_loses_no_write(tmp_path: Path, engine: str) -> None:
    """Native: four serving threads, each on its own clone of the connection
    that the supervisor keeps, so a request a killed worker had read on any
    clone is resent to the next one.  Python: the reference engine under the
    trio session, on the connection's own fd."""
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, device={"size": "256M"}, fuse={"threads": 4}, pool={"engine": engine}) as d:
        assert d.stats()["engine"] == engine
        if engine == "native":
            assert "serving FUSE with 4 C threads on 4 cloned fds" in d.logtext()
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", d.file], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            v = subprocess.Popen(
                [sys.executable, GENVERIFY, loop, "20", "4"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            lines: list[str] = []
            try:
                assert v.stdout is not None
                assert v.stdout.readline().strip() == "started"
                reader = read_lines(v, lines)
                rng = random.Random(11)
                recoveries = []
                for _ in range(10):
                    time.sleep(rng.uniform(0.2, 1.2))
                    assert v.poll() is None, "".join(lines)
                    recoveries.append(kill_worker(d, set()))
                v.wait(timeout=300)
                reader.join(10)
                out = "".join(lines)
                print(out)
                assert v.returncode == 0 and " bad 0" in out, out
            finally:
                if v.poll() is None:
                    v.kill()
            report("block I/O", recoveries)
            if engine == "native":  # the last worker served on its C threads too
                assert d.stats()["fuse_threads"]["served_in_c"] > 0  # type: ignore[index]
            text = subprocess.run(
                [sys.executable, "-m", "zswapd", "stats", "--socket", d.socket], capture_output=True, text=True
            ).stdout
            assert "worker restarts 10" in text, text
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        assert d.stop() == 0, d.logtext()
    dev = f"dev {os.path.basename(loop)},"
    new = dmesg_lines()[dmesg_before:]
    assert not [x for x in new if dev in x], new


def test_the_c_threads_serve_again_after_a_kill(tmp_path: Path) -> None:
    """The worker that takes over serves READ and WRITE on its C threads
    from its first request, as the dead one did (INIT restored from the
    state), not on the Python path.  No swap on this device: a kill costs
    nobody's pages."""
    with run_daemon(tmp_path, swap={"enable": False}, fuse={"threads": 2}, pool={"engine": "native"}) as d:
        rnd = random.Random(5)
        data = b"".join(b"zswapd takeover %08d " % rnd.randrange(10**8) * 160 for _ in range(256))[: 1 << 20]
        fd = os.open(d.file, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 0) == len(data)
            assert os.pread(fd, len(data), 0) == data
            before = d.stats()["fuse_threads"]
            assert before["served_in_c"] > 0, before  # type: ignore[index]
            old = worker_pid(d)
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
            assert os.pread(fd, len(data), 0) == data
            assert os.pwrite(fd, data[::-1], 1 << 20) == len(data)
            assert os.pread(fd, len(data), 1 << 20) == data[::-1]
        finally:
            os.close(fd)
        s = d.stats()
        threads = s["fuse_threads"]
        assert s["process"]["worker_restarts"] == 1 and threads["serving"] == 1, s  # type: ignore[index]
        # a new worker's counters start at 0: these three 1 MiB requests were its own
        assert threads["served_in_c"] >= 3 and threads["bugs"] == 0, threads  # type: ignore[index]
        assert d.stop() == 0, d.logtext()


def test_reload_5_times_under_swap_pressure(tmp_path: Path) -> None:
    with run_daemon(tmp_path, **SWAP) as d, memory_cgroup("zswapd-test-reload", CG_LIMIT) as cg:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        rounds = 20
        w = run_in_cgroup(cg, [sys.executable, WORKER, "300", str(rounds)])
        lines: list[str] = []
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = read_lines(w, lines)
            pids = [worker_pid(d)]
            for _ in range(5):
                print(cli(d, "reload").strip())
                pids.append(worker_pid(d))
            assert len(set(pids)) == 6, pids  # a new worker each time
            w.wait(timeout=900)
            reader.join(10)
            out = "".join(lines)
            assert w.returncode == 0, out
            assert out.count(": 0 bad pages") == rounds, out
        finally:
            if w.poll() is None:
                w.kill()
        assert d.stop() == 0, d.logtext()
    assert_clean(loop, d.mountpoint)


def test_settings_set_at_runtime_survive_a_worker_crash_and_a_reload_applies_the_file(tmp_path: Path) -> None:
    """What `zswapd set` changed stays in force across a crash (the state
    header keeps it), as zram keeps what was written to its sysfs files; a
    reload is a deliberate re-read of the file and applies the file's."""
    with run_daemon(tmp_path, swap={"enable": False}, pool={"memory_limit": "64M"}) as d:
        for assignment in ("memory_limit=48M", "accept_percent=80", "algorithm=zstd", "zstd_level=5"):
            cli(d, "set", assignment)
        # No swap on this device: no process has pages behind it to lose.
        old = worker_pid(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
        s = d.stats()
        assert (s["mem_limit"], s["accept_percent"], s["algorithm"], s["zstd_level"]) == (48 << 20, 80, "zstd", 5), s
        assert "kept the settings in force before the takeover: algorithm zstd" in d.logtext()
        cli(d, "reload")
        s = d.stats()
        assert (s["mem_limit"], s["accept_percent"], s["algorithm"]) == (64 << 20, 90, "lz4"), s
        assert d.stop() == 0, d.logtext()


def test_worker_args_from_an_older_or_newer_supervisor() -> None:
    """zswapd reload starts the code installed now under a supervisor that
    may be older: keys it does not know must not stop the new worker."""
    from zswapd.worker import WorkerArgs

    a = WorkerArgs.from_json(
        {"config_arg": None, "fuse_fd": 3, "control_fd": 4, "channel_fd": 5, "gone": 1, "restarts": 2}
    )
    assert a.restarts == 2 and a.takeover
    assert WorkerArgs.from_json(a.to_json()) == a


def test_worker_command_without_the_supervisor_is_a_clear_error() -> None:
    for env in ({}, {"ZSWAPD_WORKER": "{not json"}):
        r = subprocess.run(
            [sys.executable, "-m", "zswapd", "worker"], capture_output=True, text=True, env={**os.environ, **env}
        )
        assert r.returncode == 2 and "use `zswapd run`" in r.stderr and "Traceback" not in r.stderr, r.stderr
