"""No single kill loses a page, outside systemd: the worker and the
supervisor restart each other (supervisor.py, "who restarts whom"), under
real swap pressure with every byte verified.

Privilege: root, /dev/fuse, loop devices, swap and the cgroup-v1 memory
controller.  Runs in CI.  Before each deliberate kill the test brings every
other process's pages home (this VM's DAMON pages cold memory out to any
swap).  The test process is a child subreaper while it runs, so that the
daemon's processes, which outlive their parents here, are reaped by it and
their exit status seen.  Fixtures clean up on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, memory_cgroup, run_daemon
from test_failclosed import bring_others_home, wait_for
from test_swap import CG_LIMIT, SWAP, WORKER, assert_clean, run_in_cgroup, swap_used_pages
from test_takeover import read_lines

pytestmark = pytest.mark.root

# What a lost page or a dead swap device prints in dmesg.
DMESG_BAD = ("Read-error on swap-device", "Write-error on swap-device", "I/O error, dev loop")


def exit_status(pid: int, timeout: float = 120) -> int:
    """Wait for ``pid`` to exit: our child, or one that becomes ours when
    its parent exits first (an adopted supervisor, once its worker is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours yet: its parent still lives
            done = 0
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} did not exit within {timeout} s")
        time.sleep(0.05)


def dmesg_marker() -> str:
    marker = f"zswapd-test-mutual {uuid.uuid4()}"
    with open("/dev/kmsg", "w") as f:
        f.write(marker + "\n")
    return marker


def dmesg_since(marker: str) -> list[str]:
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()
    at = max(i for i, line in enumerate(lines) if marker in line)
    return lines[at + 1 :]


def bad_dmesg(marker: str) -> list[str]:
    return [line for line in dmesg_since(marker) if any(b in line for b in DMESG_BAD)]


def pair(d: Daemon) -> tuple[int, int]:
    """(supervisor, worker) as the worker reports them; supervisor 0 while none lives."""
    p = d.stats()["process"]
    return int(p["supervisor_pid"]), int(p["worker_pid"])  # type: ignore[index]


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    out.append(int(name))
    return out


def kill_supervisor(d: Daemon, exclude: set[int], reap: list[int]) -> float:
    """SIGKILL the supervisor; ms until a new one has adopted the worker."""
    sup, worker = pair(d)
    bring_others_home(exclude | {sup, worker})
    t = time.monotonic()
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: pair(d)[0] not in (0, sup), timeout=60, what="a new supervisor")
    ms = (time.monotonic() - t) * 1e3
    p = d.stats()["process"]
    assert p["supervisor_start"] == "adopted" and p["worker_pid"] == worker, p  # type: ignore[index]
    reap += [sup, int(p["supervisor_pid"])]  # type: ignore[index]
    return ms


def kill_worker(d: Daemon, exclude: set[int], reap: list[int]) -> float:
    """SIGKILL the worker; the recovery time the new one reports."""
    sup, old = pair(d)
    bring_others_home(exclude | {sup, old})
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: pair(d)[1] != old, timeout=60, what="a new worker")
    wait_for(lambda: d.stats()["process"]["last_recovery_ms"] is not None, what="recovery time")  # type: ignore[index]
    p = d.stats()["process"]
    assert p["supervisor_pid"] == sup, p  # type: ignore[index]
    reap.append(old)
    return float(p["last_recovery_ms"])  # type: ignore[index]


def zswapd(d: Daemon, *argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "zswapd", *argv, "--socket", d.socket], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def lift(cg: Path) -> None:
    limit = cg / "memory.limit_in_bytes"
    (limit if limit.exists() else cg / "memory.max").write_text(str(4 << 30))


def finish(w: subprocess.Popen[str], lines: list[str], rounds: int) -> None:
    w.wait(timeout=900)
    out = "".join(lines)
    assert w.returncode == 0, out  # never killed, nothing corrupt
    assert out.count(": 0 bad pages") == rounds, out


@contextlib.contextmanager
def pressure(d: Daemon, name: str, mib: int, rounds: int) -> Iterator[tuple[subprocess.Popen[str], list[str], Path]]:
    """A verifying program with most of its ``mib`` in our swap."""
    with memory_cgroup(f"zswapd-test-{name}", CG_LIMIT) as cg:
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        w = run_in_cgroup(cg, [sys.executable, WORKER, str(mib), str(rounds)])
        lines: list[str] = []
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = read_lines(w, lines)
            wait_for(lambda: swap_used_pages(loop) * 4096 >= mib * 0.6e6, what=f"{mib * 0.6:.0f} MB in our swap")
            yield w, lines, cg
            reader.join(10)
        finally:
            if w.poll() is None:
                w.kill()


def stop_by_sigterm_to_worker(d: Daemon, reap: list[int]) -> None:
    """SIGTERM to the worker alone: it asks its supervisor, which stops
    everything once (swapoff while serving); both exit 0."""
    sup, worker = pair(d)
    os.kill(worker, signal.SIGTERM)
    assert exit_status(sup, 300) == 0, d.logtext()
    # Reaped by the supervisor if it forked it, else by us.
    assert f"worker {worker} stopped (exit status 0" in d.logtext(), d.logtext()
    if os.path.exists(f"/proc/{worker}"):  # a zombie of ours
        assert exit_status(worker, 30) == 0, d.logtext()
    reap.clear()


def test_supervisor_killed_then_worker_killed(tmp_path: Path, subreaper: list[int]) -> None:
    marker = dmesg_marker()
    with run_daemon(tmp_path, **SWAP) as d, pressure(d, "sup-then-worker", 330, 12) as (w, lines, cg):  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        adopted = kill_supervisor(d, {w.pid}, subreaper)
        assert d.proc.wait(10) == -signal.SIGKILL
        recovered = kill_worker(d, {w.pid}, subreaper)
        assert w.poll() is None, "the verifying program ended before the kills did; raise its rounds"
        print(f"supervisor adopted in {adopted:.0f} ms; worker recovered in {recovered:.1f} ms")
        s = d.stats()
        assert (s["process"]["supervisor_restarts"], s["process"]["worker_restarts"]) == (1, 1), s  # type: ignore[index]
        text = zswapd(d, "stats")
        assert "worker restarts 1" in text and "supervisor restarts 1 (this one: adopted)" in text, text
        assert "zswapd_supervisor_restarts_total 1\n" in zswapd(d, "stats", "--prometheus")
        finish(w, lines, 12)
        lift(cg)
        stop_by_sigterm_to_worker(d, subreaper)
        log = d.logtext()
        assert "supervisor" in log and "adopted us" in log and "Traceback" not in log, log
    assert_clean(loop, d.mountpoint)
    assert not bad_dmesg(marker), bad_dmesg(marker)


def test_worker_killed_then_supervisor_killed_during_the_takeover(tmp_path: Path, subreaper: list[int]) -> None:
    marker = dmesg_marker()
    with run_daemon(tmp_path, **SWAP) as d, pressure(d, "worker-then-sup", 330, 12) as (w, lines, cg):  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        sup, old = pair(d)
        bring_others_home({w.pid, sup, old})
        os.kill(old, signal.SIGKILL)
        # The supervisor forks the next worker at once; kill it while that
        # one is still taking over (attaching the state, RESEND).
        deadline = time.monotonic() + 10
        while not (forked := [c for c in children(sup) if c != old]):
            assert time.monotonic() < deadline, "no new worker"
        new = forked[0]
        os.kill(sup, signal.SIGKILL)
        subreaper += [old, new]
        assert d.proc.wait(10) == -signal.SIGKILL
        wait_for(lambda: pair(d)[0] not in (0, sup), timeout=60, what="a supervisor adopted by the new worker")
        s = d.stats()
        assert s["process"]["worker_pid"] == new and s["process"]["supervisor_start"] == "adopted", s  # type: ignore[index]
        subreaper.append(pair(d)[0])
        assert "took over (restart 1)" in d.logtext(), d.logtext()
        finish(w, lines, 12)
        lift(cg)
        stop_by_sigterm_to_worker(d, subreaper)
    assert_clean(loop, d.mountpoint)
    assert not bad_dmesg(marker), bad_dmesg(marker)


def test_orphaned_worker_stops_alone_on_sigterm(tmp_path: Path, subreaper: list[int]) -> None:
    """The supervisor SIGKILLed, and no new one can start (its config was
    made writable by others, which `zswapd run` refuses): the worker serves
    on alone.  SIGTERM while the program's cgroup is full: swapoff fails,
    and the worker says so and keeps serving; with the limit lifted, a
    second SIGTERM runs the whole stop here: swapoff while serving, detach,
    unmount, exit 0."""
    marker = dmesg_marker()
    with run_daemon(tmp_path, **SWAP) as d, pressure(d, "alone", 200, 6) as (w, lines, cg):  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        oom = cg / "memory.oom_control"
        if oom.exists():
            oom.write_text("1")  # swapoff gets ENOMEM instead of the OOM killer
        sup, worker = pair(d)
        subreaper.append(worker)
        os.chmod(d.config, 0o666)
        bring_others_home({w.pid, sup, worker})
        os.kill(sup, signal.SIGKILL)
        wait_for(lambda: "still without a supervisor" in d.logtext(), timeout=60, what="a refused new supervisor")
        assert pair(d)[0] == 0 and "writable by group or others" in d.logtext(), d.logtext()
        r = subprocess.run([sys.executable, "-m", "zswapd", "status", "--socket", d.socket], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode != 0 and "no supervisor: the worker serves alone" in r.stdout + r.stderr, r
        os.kill(worker, signal.SIGTERM)
        wait_for(lambda: "still serving" in d.logtext() or "stopped alone" in d.logtext(), timeout=300,
                 what="the swapoff to end")  # fmt: skip
        first_failed = "still serving" in d.logtext()
        if first_failed:
            assert loop in open("/proc/swaps").read() and pair(d)[1] == worker  # never exits with swap on
        lift(cg)
        finish(w, lines, 6)
        if first_failed:
            os.kill(worker, signal.SIGTERM)
        assert exit_status(worker, 300) == 0, d.logtext()
        print(f"first swapoff failed: {first_failed}")
        log = d.logtext()
        assert "SIGTERM with no supervisor: stopping alone" in log and "stopped alone, cleanly" in log, log
        assert f"detached {loop}" in log and "Traceback" not in log, log
    assert_clean(loop, d.mountpoint)
    assert not os.path.exists(d.socket)
    assert not bad_dmesg(marker), bad_dmesg(marker)


def test_sigterm_to_both_at_once_is_one_clean_stop(tmp_path: Path) -> None:
    """What `pkill zswapd` does: the worker passes its SIGTERM on, the
    supervisor stops everything once, and nobody takes over."""
    with run_daemon(tmp_path, **SWAP) as d:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        with open(d.file, "r+b", buffering=0) as f:
            f.write(os.urandom(1 << 20))
        sup, worker = pair(d)
        os.kill(worker, signal.SIGTERM)
        os.kill(sup, signal.SIGTERM)
        assert d.proc.wait(120) == 0, d.logtext()
        wait_for(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker to exit")
        log = d.logtext()
        assert "SIGTERM: shutting down" in log and f"worker {worker} stopped (exit status 0)" in log, log
        for word in ("taking over", "(takeover)", "died"):
            assert word not in log, log
    assert_clean(loop, d.mountpoint)


def test_10_random_kills_of_either_process_under_swap_pressure(tmp_path: Path, subreaper: list[int]) -> None:
    marker = dmesg_marker()
    rounds = 20
    with run_daemon(tmp_path, **SWAP) as d, pressure(d, "random-kills", 330, rounds) as (w, lines, cg):  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        rng = random.Random(17)
        times: dict[str, list[float]] = {"supervisor": [], "worker": []}
        for _ in range(10):
            time.sleep(rng.uniform(0.05, 0.6))
            assert w.poll() is None, "the verifying program ended early: " + "".join(lines)
            which = rng.choice(("supervisor", "worker"))
            kill = kill_supervisor if which == "supervisor" else kill_worker
            times[which].append(kill(d, {w.pid}, subreaper))
        assert w.poll() is None, "the program finished before the kills ended; raise rounds"
        for which, ms in times.items():
            if ms:
                print(f"{which} killed {len(ms)} times: recovery median {statistics.median(ms):.1f} ms, "
                      f"max {max(ms):.1f} ms")  # fmt: skip
        s = d.stats()
        assert s["process"]["supervisor_restarts"] == len(times["supervisor"]), s  # type: ignore[index]
        assert s["process"]["worker_restarts"] == len(times["worker"]), s  # type: ignore[index]
        assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
        finish(w, lines, rounds)
        lift(cg)
        sup, _ = pair(d)
        if sup != d.proc.pid:
            os.kill(sup, signal.SIGTERM)
            assert exit_status(sup, 300) == 0, d.logtext()
        else:
            assert d.stop() == 0, d.logtext()
        assert "Traceback" not in d.logtext()
    assert_clean(loop, d.mountpoint)
    assert not bad_dmesg(marker), bad_dmesg(marker)


def test_an_adopted_supervisor_reloads_and_stops_like_the_first(tmp_path: Path, subreaper: list[int]) -> None:
    """After the handover, `zswapd reload` (a fresh worker, the adopted
    supervisor's own child, replacing one that is not) and SIGHUP work as
    under the first supervisor, and SIGTERM to it stops everything.  No
    swap on this device: a kill costs nobody's pages."""
    with run_daemon(tmp_path, swap={"enable": False}) as d:
        data = os.urandom(1 << 20)
        with open(d.file, "r+b", buffering=0) as f:
            f.write(data)
        kill_supervisor(d, set(), subreaper)
        sup, old = pair(d)
        print(zswapd(d, "reload").strip())
        new = pair(d)[1]
        assert new != old and pair(d)[0] == sup and new in children(sup)
        os.kill(sup, signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.logtext(), what="the worker to reload its config")
        with open(d.file, "rb", buffering=0) as f:
            assert f.read(len(data)) == data
        assert d.stats()["process"]["worker_restarts"] == 1  # type: ignore[index]
        os.kill(sup, signal.SIGTERM)
        assert exit_status(sup, 60) == 0, d.logtext()
        log = d.logtext()
        assert f"worker {old} stopped (exit status 0 (as it said; not our child))" in log, log
        assert "Traceback" not in log, log
    assert not os.path.ismount(d.mountpoint)


def test_worker_killed_while_it_hands_its_fds_over(tmp_path: Path, subreaper: list[int]) -> None:
    """The supervisor SIGKILLed, then the worker SIGKILLed as soon as the
    new supervisor exists, before it has adopted anything: the fds are in
    the handover socket by then, so the new supervisor takes them and takes
    over with a worker of its own."""
    marker = dmesg_marker()
    with run_daemon(tmp_path, **SWAP) as d, pressure(d, "handover-kill", 330, 12) as (w, lines, cg):  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        sup, worker = pair(d)
        bring_others_home({w.pid, sup, worker})
        os.kill(sup, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (started := children(worker)):
            assert time.monotonic() < deadline, "no new supervisor"
        os.kill(worker, signal.SIGKILL)
        subreaper += [worker, *started]
        wait_for(lambda: pair(d)[1] != worker, timeout=60, what="a worker of the new supervisor")
        s = d.stats()["process"]
        assert s["supervisor_pid"] == started[0] and s["supervisor_start"] == "adopted", s  # type: ignore[index]
        assert s["worker_restarts"] == 1 and s["supervisor_restarts"] == 1, s  # type: ignore[index]
        finish(w, lines, 12)
        lift(cg)
        stop_by_sigterm_to_worker(d, subreaper)
        assert f"worker {worker} died (signal SIGKILL" in d.logtext(), d.logtext()
    assert_clean(loop, d.mountpoint)
    assert not bad_dmesg(marker), bad_dmesg(marker)
