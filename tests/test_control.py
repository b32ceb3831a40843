"""The control socket and CLI against a real daemon, plus a fuzz of the parser.

Privilege: root for the daemon tests (FUSE mount, setpriv).  The fuzz test is
pure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import Daemon, run_daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from zswapd.control import MAX_LINE, Controller
from zswapd.store import Store

MIB = 1 << 20


def raw(sock_path: str, payload: bytes, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zswapd", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="zswapd-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_commands_and_stats_consistent_with_data(daemon: Daemon) -> None:
    fd = os.open(daemon.file, os.O_RDWR)
    try:
        for i in range(100):
            os.pwrite(fd, ((b"page %03d " % i) * 512)[:4096], i * 4096)  # compressible, 9-byte period
        for i in range(100, 120):
            os.pwrite(fd, bytes([i]) * 4096, i * 4096)  # same-filled
        os.pwrite(fd, os.urandom(4096), 200 * 4096)  # incompressible
    finally:
        os.close(fd)
    s = daemon.stats()
    assert s["pages_stored"] == 121 and s["orig_data_size"] == 121 * 4096
    assert s["same_pages"] == 20 and s["huge_pages"] == 1
    assert s["device"]["path"] == daemon.file and s["device"]["loop"] is None  # type: ignore[index]
    assert s["algorithm"] == "lz4" and s["version"] and s["uptime"] >= 0  # type: ignore[operator]
    assert {c["size"] for c in s["classes"]} >= {32, 4096}  # type: ignore[attr-defined]
    for key in ("mem_used_total", "compr_data_size", "mem_limit", "mem_used_max", "pages_compacted",
                "failed_reads", "failed_writes", "notify_free", "metadata_bytes", "compactions",
                "limit_hits", "full"):  # fmt: skip
        assert key in s
    r = daemon.call("compact")
    assert r["ok"] and "frames_freed" in r and "seconds" in r
    r = daemon.call("set", key="memory_limit", value="64M")
    assert r["ok"] and r["value"] == 64 * MIB and r["met"]
    assert daemon.stats()["mem_limit"] == 64 * MIB
    r = daemon.call("reset_max")
    assert r["ok"] and r["mem_used_max"] == daemon.stats()["mem_used_total"]
    # a limit below what is stored: accepted, reported, nothing dropped
    r = daemon.call("set", key="memory_limit", value=4096)
    assert r["ok"] and not r["met"] and "warning" in r
    assert daemon.stats()["pages_stored"] == 121
    # the CLI on top
    cfg = ["--socket", daemon.socket]
    out = cli("stats", *cfg)
    assert out.returncode == 0 and "DISKSIZE" in out.stdout and "RATIO" in out.stdout, out.stderr
    assert "frames_per_zspage" in cli("stats", "--classes", *cfg).stdout
    assert json.loads(cli("stats", "--json", *cfg).stdout)["pages_stored"] == 121
    prom = cli("stats", "--prometheus", *cfg).stdout
    assert "zswapd_orig_data_size 495616" in prom and "# TYPE zswapd_notify_free_total counter" in prom
    assert cli("set", "memory_limit=1G", *cfg).stdout.strip() == f"memory_limit = {1 << 30}"
    assert "freed" in cli("compact", *cfg).stdout
    bad = cli("set", "memory_limit=12Q", *cfg)
    assert bad.returncode == 1 and "expected a size" in bad.stderr
    bad = cli("set", "device_size=1G", *cfg)
    assert bad.returncode == 1 and "cannot set" in bad.stderr
    # switching the algorithm at runtime: new pages use it, old ones still read
    fd = os.open(daemon.file, os.O_RDWR)
    try:
        old = os.pread(fd, 4096 * 100, 0)
        assert cli("set", "algorithm=zstd", *cfg).stdout.strip() == "algorithm = zstd"
        page = ((b"zstd page %05d " % 7) * 300)[:4096]
        os.pwrite(fd, page, 300 * 4096)
        assert os.pread(fd, 4096, 300 * 4096) == page and os.pread(fd, 4096 * 100, 0) == old
        assert daemon.stats()["algorithm"] == "zstd"
        assert cli("set", "algorithm=lzo", *cfg).returncode == 1
    finally:
        os.close(fd)


@pytest.mark.root
def test_bad_input_gets_error_replies_and_daemon_goes_on(daemon: Daemon) -> None:
    for payload, fragment in [
        (b"not json\n", "invalid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"cmd": "explode"}\n', "unknown command"),
        (b'{"nocmd": 1}\n', "unknown command"),
        (b'{"cmd": "set", "key": "memory_limit", "value": [1]}\n', "expected a size"),
        (b"\xff\xfe\n", "not valid UTF-8"),
    ]:
        reply = json.loads(raw(daemon.socket, payload))
        assert reply["ok"] is False and fragment in reply["error"], (payload, reply)
    reply = json.loads(raw(daemon.socket, b"x" * (MAX_LINE + 10)))
    assert reply["ok"] is False and "longer than" in reply["error"]
    # an idle client is dropped after the timeout, without blocking others
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(daemon.socket)
    idle.settimeout(30)
    t = time.monotonic()
    assert daemon.stats()["ok"]
    assert idle.recv(10) == b""  # closed by the daemon
    assert 5 < time.monotonic() - t < 25
    idle.close()
    assert daemon.stats()["ok"]


@pytest.mark.root
def test_daemon_down_is_a_clear_exit_1(tmp_path: Path) -> None:
    for cmd in (["stats"], ["compact"], ["set", "memory_limit=1G"], ["reset-max"]):
        r = cli(*cmd, "--socket", str(tmp_path / "nothing.sock"))
        assert r.returncode == 1 and "not running" in r.stderr, r.stderr


@pytest.mark.root
def test_non_root_refused_for_mutations(public_dir: Path) -> None:
    with run_daemon(public_dir, control={"group": "nogroup"}) as d:
        os.chmod(Path(d.socket).parent, 0o755)
        assert (os.stat(d.socket).st_mode & 0o777) == 0o660
        client = (
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(sys.argv[2].encode() + b'\\n'); print(s.recv(1 << 20).decode())\n"
        )
        as_nogroup = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-I", "-c"]
        as_other = ["setpriv", "--reuid=65534", "--regid=1", "--clear-groups", "/usr/bin/python3", "-I", "-c"]
        if not os.path.exists("/usr/bin/python3"):
            as_nogroup[4] = as_other[4] = sys.executable
        for cmd, ok in (('{"cmd": "stats"}', True), ('{"cmd": "compact"}', False), ('{"cmd": "reset_max"}', False),
                        ('{"cmd": "set", "key": "memory_limit", "value": 1}', False)):  # fmt: skip
            r = subprocess.run(as_nogroup + [client, d.socket, cmd], capture_output=True, text=True, timeout=30)
            reply = json.loads(r.stdout)
            assert reply["ok"] is ok, (cmd, reply)
            if not ok:
                assert "permission denied" in reply["error"]
        # not in the group: the socket itself is closed to it
        r = subprocess.run(as_other + [client, d.socket, '{"cmd": "stats"}'], capture_output=True, text=True)
        assert r.returncode != 0 and "PermissionError" in r.stderr
        assert d.stats()["mem_limit"] != 1


@pytest.mark.root
def test_200_concurrent_stats_clients_during_64m_write(daemon: Daemon, tmp_path: Path) -> None:
    data = b"".join((b"block %08d " % i) * 300 + os.urandom(496) for i in range(16384))[: 64 * MIB]
    replies: list[bool] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(3):
            r = json.loads(raw(daemon.socket, b'{"cmd": "stats"}\n', timeout=120))
            with lock:
                replies.append(bool(r["ok"]))

    threads = [threading.Thread(target=client) for _ in range(200)]
    fd = os.open(daemon.file, os.O_RDWR)
    try:
        for t in threads:
            t.start()
        for off in range(0, len(data), MIB):
            os.pwrite(fd, data[off : off + MIB], off)
        for t in threads:
            t.join(180)
        assert len(replies) == 600 and all(replies)
        back = b"".join(os.pread(fd, MIB, off) for off in range(0, len(data), MIB))
        assert back == data
    finally:
        os.close(fd)


@pytest.mark.root
def test_metrics_endpoint(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with run_daemon(tmp_path, control={"metrics_listen": f"127.0.0.1:{port}"}) as d:
        deadline = time.monotonic() + 10
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert "zswapd_mem_used_total" in body and "zswapd_pages_compacted_total" in body
        assert d.stats()["ok"]


@settings(max_examples=400, deadline=None)
@given(
    line=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"cmd": st.sampled_from(["stats", "set", "compact", "reset_max", "ping", "x"])},
            optional={"key": st.one_of(st.text(max_size=15), st.sampled_from(["memory_limit", "accept_percent", "algorithm", "zstd_level"])),
                      "value": st.one_of(st.integers(-5, 1 << 40), st.text(max_size=10), st.none(), st.floats())},
        ).map(lambda v: json.dumps(v).encode()),
    ),
    uid=st.sampled_from([0, 65534]),
)  # fmt: skip
def test_fuzz_control_parser_never_crashes(line: bytes, uid: int) -> None:
    store = Store(64 * 4096)
    controller = Controller(store, lambda: {"path": "x"}, "<test>")

    async def go() -> dict[str, object]:
        return await controller.handle(line, uid, uid, [])

    reply = trio.run(go)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    assert reply["ok"] or isinstance(reply["error"], str)
    json.dumps(reply)  # always serialisable


@pytest.mark.root
def test_stats_into_a_closed_pipe_is_quiet(daemon: Daemon) -> None:
    """`zswapd stats | head`: the reader is gone before the CLI writes."""
    p = subprocess.Popen(
        [sys.executable, "-m", "zswapd", "stats", "--json", "--socket", daemon.socket],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
