"""The recompression tier in a running daemon: pages written through FUSE,
recompressed by hand (`zswapd recompress`) and by the policy, read back byte
for byte; under real swap; and a worker killed while it trains a dictionary
and while it recompresses, with nothing lost.

Privilege: root, /dev/fuse, and for the swap test loop devices, swap and the
cgroup-v1 memory controller.  Runs in CI.  The tests that kill a swap
backend or swap for real take /work-independent care: before each kill no
process but the test's own may have pages in swap (bring_others_home).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Daemon, memory_cgroup, run_daemon
from pressure_worker import corpus, page
from test_failclosed import bring_others_home, wait_for
from test_swap import CG_LIMIT, SWAP, WORKER, run_in_cgroup, swap_used_pages
from test_takeover import cli, read_lines, worker_pid

pytestmark = pytest.mark.root

PAGE = 4096


def _data(npages: int) -> bytes:
    """Varied, compressible pages (the pressure worker's): zstd with a
    dictionary shrinks them clearly more than lz4 does."""
    c = corpus()
    return b"".join(page(c, i) for i in range(npages))


def _write(d: Daemon, data: bytes) -> None:
    fd = os.open(d.file, os.O_RDWR)
    try:
        for at in range(0, len(data), 1 << 20):
            assert os.pwrite(fd, data[at : at + (1 << 20)], at) == min(1 << 20, len(data) - at)
    finally:
        os.close(fd)


def _read(d: Daemon, n: int) -> bytes:
    fd = os.open(d.file, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, min(1 << 20, n - at), at) for at in range(0, n, 1 << 20))
    finally:
        os.close(fd)


def _rec(d: Daemon) -> dict[str, object]:
    r = d.stats()["recompress"]
    assert isinstance(r, dict)
    return r


@pytest.mark.parametrize("engine", ["native", "python"])
def test_pages_through_fuse_recompressed_by_hand_and_read_back(tmp_path: Path, engine: str) -> None:
    data = _data(6000)
    # the default idle age (1 hour): the policy leaves these fresh pages alone
    with run_daemon(tmp_path, device={"size": "64M"}, pool={"engine": engine}) as d:
        _write(d, data)
        before = d.stats()
        out = cli(d, "recompress", "--idle-age", "0")
        print(out.strip())
        assert out.startswith("recompressed ") and "dictionary 1" in out, out
        s = d.stats()
        r = s["recompress"]
        assert isinstance(r, dict)
        assert r["pages"] > 4000 and r["bytes_saved"] > 0 and r["cpu_seconds"] > 0, r
        assert r["trainings"] == 1 and [x["id"] for x in r["dictionaries"]] == [1], r  # type: ignore[union-attr]
        assert r["dictionaries"][0]["pages"] == r["pages"], r  # type: ignore[index]
        assert s["compr_data_size"] < before["compr_data_size"] * 0.8, (s, before)  # type: ignore[operator]
        assert _read(d, len(data)) == data
        # the ratio after compaction, printed for the log
        cli(d, "compact")
        after = d.stats()
        print(
            f"{engine}: orig/mem_used {before['orig_data_size'] / before['mem_used_total']:.2f} lz4 -> "  # type: ignore[operator]
            f"{after['orig_data_size'] / after['mem_used_total']:.2f} recompressed"  # type: ignore[operator]
        )
        text = cli(d, "stats")
        assert "recompressed" in text and "CODEC" in text and "dictionary 1:" in text, text
        prom = cli(d, "stats", "--prometheus")
        assert f"zswapd_recompressed_pages {r['pages']}" in prom, prom
        assert 'zswapd_dictionary_pages{id="1"}' in prom and "zswapd_idle_pages{" in prom, prom
        # nothing left to do: every candidate was recompressed or tried
        again = json.loads(
            subprocess.run(
                [sys.executable, "-c", _CALL, d.socket, json.dumps({"cmd": "recompress", "idle_age": 0})],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        assert again["ok"] and again["candidates"] == 0, again
        # a bad request is a clear error
        bad = subprocess.run(
            [sys.executable, "-m", "zswapd", "recompress", "--threshold", "5000", "--socket", d.socket],
            capture_output=True, text=True,
        )  # fmt: skip
        assert bad.returncode == 1 and "[recompress] threshold = 5000: expected an integer from 0 to 4096" in (
            bad.stderr
        ), bad.stderr
        assert "Traceback" not in bad.stderr
        assert d.stop() == 0, d.logtext()


_CALL = """
import json, sys
from zswapd.control import request
print(json.dumps(request(sys.argv[1], json.loads(sys.argv[2]), 600)))
"""


def test_the_policy_recompresses_idle_pages_and_set_changes_it(tmp_path: Path) -> None:
    data = _data(5000)
    rc = {"idle_age": 0, "cpu_percent": 100}
    with run_daemon(tmp_path, device={"size": "64M"}, recompress=rc) as d:
        _write(d, data)
        # a round that overlaps the write recompresses its first pages
        # without a dictionary; the next one trains on them (samples include
        # them) and the rest go with the dictionary: wait for both
        wait_for(
            lambda: _rec(d)["pages"] > 4000 and _rec(d)["trainings"] == 1,
            timeout=120,
            what="the policy to train a dictionary and recompress the pages",
        )
        r = _rec(d)
        assert r["trainings"] == 1 and r["dictionaries"], r
        assert "recompression: training a 114688-byte dictionary on" in d.logtext()
        assert _read(d, len(data)) == data
        # `zswapd set` turns it off: a rewritten page stays primary
        assert cli(d, "set", "recompress=false").strip() == "recompress = False"
        assert cli(d, "set", "recompress_cpu_percent=2.5").strip() == "recompress_cpu_percent = 2.5"
        _write(d, data[: 100 * PAGE])
        time.sleep(12)  # more than a round
        codecs = {(c["codec"], c["tier"]): c["pages"] for c in d.stats()["codecs"]}  # type: ignore[union-attr]
        assert codecs[("lz4", "primary")] >= 100, codecs
        assert _read(d, len(data)) == data
        assert d.stop() == 0, d.logtext()


def _nibbles(seed: int) -> bytes:
    """Huge for lz4 (a frame each), about half a page with zstd."""
    import random

    return random.Random(seed).randbytes(PAGE).translate(bytes((b & 15) * 17 for b in range(256)))


@pytest.mark.parametrize("engine", ["native", "python"])
def test_the_ladder_makes_room_for_a_refused_write_at_the_limit(tmp_path: Path, engine: str) -> None:
    """Through FUSE: a pool at its memory limit, full of pages that only
    recompression can shrink (no free slot in any smaller class), refuses a
    write (ENOSPC); the policy's ladder recompresses them within the move
    reserve and pays it back, and the same write then succeeds.  Every
    page reads back byte for byte."""
    import errno

    limit = 1 << 20
    pool = {"memory_limit": limit, "engine": engine}
    with run_daemon(tmp_path, swap={"enable": False}, pool=pool, recompress={"dictionary_size": 0}) as d:
        fd = os.open(d.file, os.O_RDWR)
        try:
            written = 0
            with pytest.raises(OSError) as refused:
                while True:
                    os.pwrite(fd, _nibbles(written), written * PAGE)
                    written += 1
            assert refused.value.errno == errno.ENOSPC, refused.value
            assert written >= limit // PAGE - 16, written  # full: a frame each
            wait_for(
                lambda: not d.stats()["full"] and _rec(d)["pages"] >= written,
                timeout=60,
                what="the ladder to recompress the pages and bring usage under the accept threshold",
            )
            s = d.stats()
            assert limit < int(s["mem_used_max"]) <= limit + 16 * PAGE, s  # type: ignore[call-overload]
            assert int(s["mem_used_total"]) * 100 < limit * int(s["accept_percent"]), s  # type: ignore[call-overload]
            assert os.pwrite(fd, _nibbles(written), written * PAGE) == PAGE  # the refused write, again
            for i in range(written + 1):
                assert os.pread(fd, PAGE, i * PAGE) == _nibbles(i), i
        finally:
            os.close(fd)
        assert d.stop() == 0, d.logtext()


def test_recompress_settings_set_at_runtime_survive_a_worker_crash_and_a_reload_applies_the_file(
    tmp_path: Path,
) -> None:
    """As the pool's settings (test_takeover): what `zswapd set` changed of
    the recompression policy stays in force across a worker crash (the
    state header keeps it), and a reload, a deliberate re-read, applies the
    file's, which a later crash then keeps."""
    kept = "kept the settings in force before the takeover: "
    with run_daemon(tmp_path, swap={"enable": False}, recompress={"idle_age": "30m"}) as d:
        for assignment in ("recompress=false", "idle_age=2h", "recompress_level=10", "recompress_threshold=256",
                           "recompress_cpu_percent=2.5"):  # fmt: skip
            cli(d, "set", assignment)
        old = worker_pid(d)
        os.kill(old, signal.SIGKILL)  # no swap on this device: nobody's pages to lose
        wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
        wait_for(lambda: kept in d.logtext(), timeout=30, what="the new worker's log of what it kept")
        line = next(x for x in d.logtext().splitlines() if kept in x)
        for want in ("[recompress] enable False where the config says True", "[recompress] idle_age 7200 where "
                     "the config says 1800", "[recompress] level 10", "[recompress] threshold 256",
                     "[recompress] cpu_percent 2.5"):  # fmt: skip
            assert want in line, line
        cli(d, "reload")
        mark = len(d.logtext())
        old = worker_pid(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
        wait_for(lambda: "state attached" in d.logtext()[mark:], timeout=30, what="the takeover")
        assert "[recompress]" not in d.logtext()[mark:], d.logtext()[mark:]  # the file's, since the reload
        assert d.stop() == 0, d.logtext()


def test_a_worker_killed_while_training_and_while_recompressing_loses_nothing(tmp_path: Path) -> None:
    """No swap on this device (a kill costs nobody's pages); the data is
    read back after each takeover."""
    data = _data(16000)
    rc = {"idle_age": 0, "cpu_percent": 100}
    with run_daemon(tmp_path, device={"size": "128M"}, recompress=rc, fuse={"threads": 2}) as d:
        _write(d, data)
        # 1. while training: the log says so just before ZDICT runs (a second or more)
        wait_for(lambda: "recompression: training a" in d.logtext(), timeout=60, what="training to start")
        old = worker_pid(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
        assert _read(d, len(data)) == data
        # 2. while recompressing with the dictionary the new worker trained
        wait_for(lambda: _rec(d)["pages"] > 2000, timeout=120, what="recompression to be under way")
        old = worker_pid(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
        assert _read(d, len(data)) == data
        s = d.stats()
        assert s["process"]["worker_restarts"] == 2 and s["failed_reads"] == 0, s  # type: ignore[index]
        # the third worker carries on and finishes the pass
        wait_for(lambda: _rec(d)["pages"] > 14000, timeout=180, what="the rest to be recompressed")
        assert _read(d, len(data)) == data
        assert d.stop() == 0, d.logtext()


def test_recompression_under_real_swap_with_a_kill(tmp_path: Path) -> None:
    """A program's pages go to our swap, are recompressed while it verifies
    them round after round, and a worker is killed mid-way."""
    config = {**SWAP, "recompress": {"idle_age": 0, "cpu_percent": 100}}
    with run_daemon(tmp_path, **config) as d, memory_cgroup("zswapd-test-recompress", CG_LIMIT) as cg:  # type: ignore[arg-type]
        loop = str(d.stats()["device"]["loop"])  # type: ignore[index]
        # Enough verify rounds to outlive the policy's first rounds (every
        # 10 s): pages the program keeps in the swap cache verify in about a
        # second a round, and it must still be running when the kill comes.
        rounds = 60
        w = run_in_cgroup(cg, [sys.executable, WORKER, "200", str(rounds)])
        lines: list[str] = []
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "filled"
            reader = read_lines(w, lines)
            wait_for(lambda: swap_used_pages(loop) * PAGE >= 100e6, what="100 MB in our swap")

            shown = [0.0]

            def progress() -> bool:
                r = _rec(d)
                if time.monotonic() > shown[0] + 5:
                    shown[0] = time.monotonic()
                    print(f"swap {swap_used_pages(loop)} pages; recompress {r}", flush=True)
                return int(r["recompressed"]) > 2000  # type: ignore[call-overload]

            wait_for(progress, timeout=240, what="swapped pages recompressed")
            assert w.poll() is None, "the program ended before the kill: raise rounds"
            old = worker_pid(d)
            bring_others_home({w.pid, d.proc.pid, old})
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: worker_pid(d) != old, timeout=60, what="a new worker")
            w.wait(timeout=900)
            reader.join(10)
            out = "".join(lines)
            assert w.returncode == 0, out
            assert out.count(": 0 bad pages") == rounds, out
        finally:
            if w.poll() is None:
                w.kill()
        s = d.stats()
        print("under swap:", s["recompress"])
        assert s["failed_reads"] == 0 and s["failed_writes"] == 0, s
        assert d.stop() == 0, d.logtext()
