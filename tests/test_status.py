"""`zswapd status`: the rules (zswapd/health.py) and the exit codes, with
no daemon, a mute one and a real one.

Privilege: root for the daemon tests (FUSE mount, setuid to nobody)."""

from __future__ import annotations

import copy
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_daemon

from zswapd import health

MIB = 1 << 20

SERVING: dict[str, Any] = {
    "orig_data_size": 8 * MIB, "mem_used_total": 2 * MIB, "mem_limit": 100 * MIB, "full": False,
    "accept_percent": 90, "failed_reads": 0, "task_failures": {}, "fuse_internal_errors": 0,
    "control_internal_errors": 0, "fuse_threads": {"threads": 2, "alive": 2, "bugs": 0}, "engine": "native",
    "engine_fallback": "", "device": {"loop": "/dev/loop3", "swap": True},
    "process": {"worker_pid": 42, "worker_restarts": 3},
}  # fmt: skip


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zswapd", *args], capture_output=True, text=True, timeout=timeout)


def test_serving_line() -> None:
    code, line = health.summary(SERVING)
    assert code == health.SERVING
    assert line == (
        "serving: 8.0M in 2.0M (ratio 4.00), limit 100.0M (2%), swap on /dev/loop3, engine native, "
        "worker 42 (3 restarts)"
    )


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"full": True}, "pool full: writes refused until usage falls below 90% of the limit"),
        ({"device": {"loop": "/dev/loop3", "swap": False}}, "swap is off on /dev/loop3"),
        ({"failed_reads": 2}, "2 failed reads"),
        ({"task_failures": {"metrics": 1, "fuse": 2}}, "tasks failed and were restarted (fuse 2, metrics 1); see the log"),
        ({"fuse_internal_errors": 5}, "5 internal errors answering FUSE requests; see the log"),
        ({"control_internal_errors": 1}, "1 internal errors answering control requests; see the log"),
        ({"fuse_threads": {"threads": 4, "alive": 3, "bugs": 0}}, "1 of 4 C FUSE threads stopped"),
        ({"fuse_threads": {"threads": 2, "alive": 2, "bugs": 7}}, "C FUSE threads hit 7 bugs; see the log"),
        ({"engine": "python", "engine_fallback": "No module named 'zswapd._engine'"},
         "Python engine: the native engine is not built (No module named 'zswapd._engine')"),
    ],
)  # fmt: skip
def test_each_reason_is_degraded(change: dict[str, Any], problem: str) -> None:
    s = {**copy.deepcopy(SERVING), **change}
    assert health.assess(s) == [problem]
    code, line = health.summary(s)
    assert code == health.DEGRADED and line.startswith(f"degraded: {problem} -- ")


def test_not_degraded() -> None:
    """A chosen setup is not a problem: swap off by config, the Python
    engine asked for, pyfuse3 (no C threads), a bare Controller's
    stats (no process, no device)."""
    for change in (
        {"device": {"loop": None, "swap": False}},
        {"engine": "python", "engine_fallback": "", "fuse_threads": None},
        {"process": None, "device": None, "mem_limit": 0},
    ):
        s = {**copy.deepcopy(SERVING), **change}
        assert health.assess(s) == [], change
        assert health.summary(s)[0] == health.SERVING


def test_status_without_a_daemon(tmp_path: Path) -> None:
    r = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert (r.returncode, r.stdout) == (3, f"the daemon is not running (no control socket at {tmp_path}/none.sock)\n")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on: what a killed daemon leaves
    r = cli("status", "--socket", str(stale))
    assert r.returncode == 3 and "nothing listens on" in r.stdout, r


def test_status_of_a_daemon_that_does_not_answer(tmp_path: Path) -> None:
    """Connected but no reply in 5 s (a worker starting or stuck): degraded."""
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(8)  # and never accepts
        r = cli("status", "--socket", path)
    assert (r.returncode, r.stdout) == (1, f"degraded: control socket {path}: no reply within 5 s\n")


def _as_nobody(args: list[str]) -> tuple[int, str]:
    """The CLI as uid nobody (no exec: the interpreter is not nobody's to
    read), its exit code and output."""
    import zswapd.control  # noqa: F401  (before the child drops root)
    from zswapd.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(w, 1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout = open(1, "w", closefd=False)
            code = main(args)
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(w)
    with open(r) as f:
        out = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


@pytest.mark.root
def test_status_of_a_real_daemon(tmp_path: Path) -> None:
    with run_daemon(tmp_path, pool={"memory_limit": "64M"}) as d:
        r = cli("status", "--socket", d.socket)
        assert r.returncode == 0 and r.stdout.startswith("serving: ") and "no swap (a plain file)" in r.stdout, r
        assert r.stdout.count("\n") == 1 and not r.stderr

        # Not root, and not in [control] group: the socket is closed to it.
        code, out = _as_nobody(["status", "--socket", d.socket])
        assert (code, out) == (4, f"unknown: permission denied on {d.socket} (run as root or as a member of "
                                  "[control] group)\n")  # fmt: skip

        # Fill the pool past a limit cut below its use: writes are refused.
        _fill(d)
        assert d.call("set", key="memory_limit", value=MIB)["ok"]
        with pytest.raises(OSError) as e, open(d.file, "r+b", buffering=0) as f:
            for _ in range(4096):
                f.write(os.urandom(4096))
        assert e.value.errno == errno.ENOSPC
        r = cli("status", "--socket", d.socket)
        assert r.returncode == 1 and r.stdout.startswith("degraded: pool full: writes refused"), r
    r = cli("status", "--socket", d.socket)
    assert r.returncode == 3 and "not running" in r.stdout


def _fill(d: Daemon) -> None:
    with open(d.file, "r+b", buffering=0) as f:
        for _ in range(1024):
            f.write(os.urandom(4096))
