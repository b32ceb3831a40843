"""Fail closed: no signal, client, config or bug ends the daemon while swap
is on, and a killed instance is recovered rather than tripped over.

Privilege: root, /dev/fuse, loop devices, swap and the cgroup-v1 memory
controller.  Runs in CI.  Every daemon, loop device, mount, cgroup and
helper process is cleaned up by the fixtures even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, force_cleanup, kill_instance, memory_cgroup, run_daemon, write_config
from test_control import raw
from test_swap import CG_LIMIT, SWAP, WORKER, assert_clean, dmesg_lines, run_in_cgroup, swap_used_pages

pytestmark = pytest.mark.root

IGNORED = [
    "SIGUSR1",
    "SIGUSR2",
    "SIGALRM",
    "SIGVTALRM",
    "SIGPROF",
    "SIGQUIT",
    "SIGPIPE",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
]


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def wait_for(cond: object, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def send_line(path: str, payload: bytes) -> dict[str, object]:
    reply: dict[str, object] = json.loads(raw(path, payload))
    return reply


def assert_serving(d: Daemon) -> None:
    assert d.proc.poll() is None, d.logtext()
    assert proc_state(d.proc.pid) not in ("T", "t"), "daemon is stopped"
    assert d.stats()["ok"]


def test_signals_are_ignored_and_never_stop_the_daemon(tmp_path: Path) -> None:
    with run_daemon(tmp_path) as d:
        worker = int(d.stats()["process"]["worker_pid"])  # type: ignore[index]
        for pid in (d.proc.pid, worker):  # the supervisor, then the worker
            for name in IGNORED:
                before = d.logtext().count(f"{name} ignored")
                os.kill(pid, getattr(signal, name))
                wait_for(lambda n=name, b=before: d.logtext().count(f"{n} ignored") > b, what=f"{name} logged")  # type: ignore[misc]
                assert_serving(d)
                assert proc_state(worker) not in ("T", "t")
        assert d.stats()["process"]["worker_pid"] == worker  # type: ignore[index]
        with open(d.file, "r+b") as f:
            f.write(b"still here" * 400)
            f.seek(0)
            assert f.read(10) == b"still here"
        assert d.stats()["signals_ignored"] == len(IGNORED)  # counted by the worker
        assert d.stop() == 0, d.logtext()
    assert "Traceback" not in d.logtext()


def test_sighup_reloads_what_can_change_and_reports_the_rest(tmp_path: Path) -> None:
    with run_daemon(tmp_path) as d:
        text = d.config.read_text()
        d.config.write_text(
            text.replace('size = "256M"', 'size = "512M"')
            + '[pool]\nmemory_limit = "48M"\nalgorithm = "zstd"\nzstd_level = 3\naccept_percent = 80\n'
        )
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.logtext(), what="reload")
        s = d.stats()
        assert s["mem_limit"] == 48 << 20 and s["algorithm"] == "zstd" and s["reloads"] == 1, s
        assert "[device] size" in d.logtext()  # named as needing a restart
        # A broken file changes nothing and ends nothing.
        d.config.write_bytes(b"[pool]\nmemory_limit = \xff\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed" in d.logtext(), what="failed reload")
        s = d.stats()
        assert s["mem_limit"] == 48 << 20 and s["reloads"] == 1
        assert_serving(d)
        assert d.stop() == 0, d.logtext()
    assert "Traceback" not in d.logtext()


def test_a_bug_in_housekeeping_is_logged_and_contained(tmp_path: Path) -> None:
    with run_daemon(
        tmp_path, inject="zswapd.store:Store.compaction_wanted", compaction={"background": True, "interval": 0.05}
    ) as d:
        wait_for(lambda: "task housekeeping failed" in d.logtext(), what="the injected bug")
        wait_for(lambda: d.stats()["task_failures"].get("housekeeping", 0) >= 2, what="a restart")  # type: ignore[attr-defined]
        data = os.urandom(1 << 20)
        with open(d.file, "r+b") as f:
            f.write(data)
            f.seek(0)
            assert f.read(len(data)) == data
        assert "InjectedBug" in d.logtext()  # the traceback is in the log, for the bug report
        assert d.stop() == 0, d.logtext()


def test_a_worker_that_cannot_start_ends_the_start_cleanly(tmp_path: Path) -> None:
    """Before any worker has served nothing is at stake: after a few failed
    starts `zswapd run` gives up (exit 1) and leaves nothing behind."""
    with run_daemon(tmp_path, ready=False, inject="zswapd.worker:Worker.__init__") as d:
        assert d.proc.wait(60) == 1, d.logtext()
        log = d.logtext()
        assert "worker cannot start: injected bug" in log and "giving up" in log, log
        assert "Traceback" not in log
    assert not os.path.ismount(d.mountpoint)


def test_mlockall_refused_means_no_swap(tmp_path: Path) -> None:
    """Without CAP_IPC_LOCK and with a tiny RLIMIT_MEMLOCK, mlockall fails:
    swap must not be enabled (exit 2, saying why, nothing mounted)."""
    config = tmp_path / "c.toml"
    mnt = tmp_path / "mnt"
    write_config(config, mnt, str(tmp_path / "ctl" / "s.sock"), swap={"enable": True})
    argv = ["prlimit", "--memlock=65536", "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    try:
        r = subprocess.run(
            [*argv, sys.executable, "-m", "zswapd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert "mlockall failed" in r.stderr and "refusing to enable swap" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not os.path.ismount(mnt)
    finally:
        force_cleanup(str(mnt))


def swap_in(pid: int) -> None:
    """Fault back in every page of ``pid`` that is in swap, by reading it
    through /proc/PID/mem (as root; the VMAs come from smaps' Swap: lines,
    the pages from pagemap's swapped bit).  DAMON on this VM pages out any
    process's idle memory to whatever swap is on, ours included: a test that
    is about to kill its swap backend first brings those pages home."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            smaps = f.read().splitlines()
        pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return  # gone, or a kernel thread
    try:
        start = end = 0
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
            elif head == "Swap:" and int(line.split()[1]) > 0:
                entries = os.pread(pagemap, (end - start) // 4096 * 8, start // 4096 * 8)
                for i, (e,) in enumerate(struct.iter_unpack("<Q", entries)):
                    if e >> 62 & 1:  # swapped
                        with contextlib.suppress(OSError):
                            os.pread(mem, 1, start + i * 4096)
    except OSError:
        pass
    finally:
        os.close(pagemap)
        os.close(mem)


def others_in_swap(exclude: set[int]) -> list[str]:
    """Processes, other than ``exclude``, with pages in swap (any swap: ours is the only one here)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in exclude:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmSwap:") and int(line.split()[1]) > 0:
                        found.append(pid)
        except OSError:
            pass
    return found


def bring_others_home(exclude: set[int], timeout: float = 60) -> None:
    """Before a test kills its swap backend: no process but ``exclude`` may
    have pages in swap.  Those DAMON put there are faulted back in (swap_in);
    the test fails if any stay (a process that keeps swapping out)."""
    deadline = time.monotonic() + timeout
    while others := others_in_swap(exclude):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {others} have pages in swap: refusing to kill the swap backend")
        for pid in others:
            swap_in(int(pid))
        time.sleep(0.1)


def test_restart_over_a_killed_instance(tmp_path: Path) -> None:
    mnt = tmp_path / "d-mnt"
    dmesg_before = len(dmesg_lines())
    with run_daemon(tmp_path, **SWAP) as d:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        # Kill only a swap backend that holds nobody's pages (DAMON on this
        # VM pages out cold memory to any swap there is).
        worker = int(d.stats()["process"]["worker_pid"])  # type: ignore[index]
        bring_others_home(set())
        assert swap_used_pages(loop) == 0, "swap holds pages: refusing to kill it"
        kill_instance([d.proc.pid, worker])  # every process of the instance, at once
        d.proc.wait(10)
        wait_for(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker to die")
        assert loop in open("/proc/swaps").read()  # what a kill leaves: swap on a dead device
        with run_daemon(tmp_path, **SWAP) as d2:  # type: ignore[arg-type]
            log = d2.logtext()
            assert "left by an instance that is no longer running" in log, log
            # Pages DAMON pushed at the dead device after the kill failed to
            # write and stayed in RAM; what matters is that no read failed.
            loop2 = str(d2.stats()["device"]["loop"])  # type: ignore[index]
            assert loop2 in open("/proc/swaps").read()
            assert d2.stop() == 0, d2.logtext()
        assert "Traceback" not in d2.logtext()
    assert_clean(loop, mnt)
    assert_clean(loop2, mnt)
    new = dmesg_lines()[dmesg_before:]
    assert not [line for line in new if "Read-error on swap" in line], new


def _hold_connections(sock: str, n: int) -> subprocess.Popen[str]:
    """``n`` idle connections to the control socket from uid 65534 in group
    nogroup (a member of ``[control] group``)."""
    code = (
        "import socket, sys, time\n"
        "held = []\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n"
    )
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-I", "-c", code, sock, str(n)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "holding", line + p.stdout.read()
    return p


def test_abuse_under_swap_pressure_loses_nothing() -> None:
    """A verifying worker keeps ~250 MB in our swap while the daemon gets
    every input the fail-closed issue lists.  The daemon keeps serving and
    the worker verifies every byte, round after round."""
    # uid 65534 must reach the control socket: a directory outside pytest's
    # private (0700) tmp tree.
    tmp_path = Path(tempfile.mkdtemp(prefix="zswapd-test-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    try:
        _abuse(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _abuse(tmp_path: Path) -> None:
    dmesg_before = len(dmesg_lines())
    sections = dict(SWAP, control={"group": "nogroup"})
    with run_daemon(tmp_path, **sections) as d, memory_cgroup("zswapd-test-abuse", CG_LIMIT) as cg:  # type: ignore[arg-type]
        os.chmod(Path(d.socket).parent, 0o755)
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        rounds = 12
        w = run_in_cgroup(cg, [sys.executable, WORKER, "250", str(rounds)])
        lines: list[str] = []
        holder = None
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = threading.Thread(target=lambda: lines.extend(w.stdout or []), daemon=True)
            reader.start()
            used = swap_used_pages(loop)
            assert used > 10000, f"only {used} pages in our swap"  # the worker really is in it
            # The control socket.
            nested = b"[" * 60000 + b"\n"
            for payload in (
                nested,
                b'{"cmd": "set", "key": "memory_limit", "value": ' + b"9" * 5000 + b"}\n",
                b'{"cmd": "set", "key": "memory_limit", "value": NaN}\n',
                b'{"cmd": "st\xffats"}\n',
            ):
                reply = send_line(d.socket, payload)
                assert reply["ok"] is False and "internal error" not in str(reply["error"]), reply
            holder = _hold_connections(d.socket, 600)
            assert d.stats()["ok"]  # root is not locked out
            # Signals, including the job-control stops and a reload.
            for name in IGNORED:
                os.kill(d.proc.pid, getattr(signal, name))
            os.kill(d.proc.pid, signal.SIGHUP)
            wait_for(lambda: "reloaded" in d.logtext(), what="reload")
            assert_serving(d)
            verified_before = len(lines)
            w.wait(timeout=900)
            reader.join(10)
            out = "".join(lines)
            assert w.returncode == 0, out
            assert out.count(": 0 bad pages") == rounds, out
            # Every page was read back after the last input, not only before.
            assert verified_before < rounds, "the worker finished before the inputs were sent; raise rounds"
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            if w.poll() is None:
                w.kill()
        assert_serving(d)
        s = d.stats()
        assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
        assert d.stop() == 0, d.logtext()
    assert_clean(loop, d.mountpoint)
    assert "Traceback" not in d.logtext()
    new = dmesg_lines()[dmesg_before:]
    assert not [line for line in new if "error, dev loop" in line or "Read-error on swap" in line], new
