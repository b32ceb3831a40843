"""The real daemon behind a real FUSE mount.

Privilege: root (mount(2), /dev/fuse, loop devices, setpriv).  Runs in CI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PUNCH, Daemon, corrupt_object, fallocate, force_cleanup, run_daemon, write_config

from zswapd.state import State

pytestmark = pytest.mark.root

MIB = 1 << 20


@pytest.fixture(params=[("builtin", "native"), ("builtin", "python"), ("pyfuse3", "native")],
                ids=["native", "python-engine", "pyfuse3"])  # fmt: skip
def backend_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """The same tests against both FUSE backends (pyfuse3 is installed in CI)
    and both engines (the C one with its FUSE threads; the Python reference
    under the trio session)."""
    backend, engine = request.param
    with run_daemon(tmp_path, fuse={"backend": backend}, pool={"engine": engine}) as d:
        assert d.stats()["engine"] == engine
        yield d


def real_data(n: int) -> bytes:
    """Real file contents (binaries, libraries, text) from this machine."""
    out = bytearray()
    for root in ("/usr/lib", "/usr/share", "/usr/bin"):
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        out += f.read(n - len(out))
                except OSError:
                    continue
                if len(out) >= n:
                    return bytes(out)
    raise RuntimeError("not enough real data on this machine")


def test_random_unaligned_io_and_punch_holes_match_model(backend_daemon: Daemon) -> None:
    daemon = backend_daemon
    native = daemon.stats()["fuse_backend"] == "builtin"
    size = 256 * MIB
    model: dict[int, int] = {}  # sparse model: page index -> bytes of that page
    pages: dict[int, bytearray] = {}
    rnd = random.Random(2026)
    corpus = real_data(4 * MIB)
    fd = os.open(daemon.file, os.O_RDWR)
    try:
        region = 8 * MIB  # keep ops dense so they overlap

        def model_write(off: int, data: bytes) -> None:
            pos = 0
            while pos < len(data):
                idx, within = divmod(off + pos, 4096)
                take = min(4096 - within, len(data) - pos)
                page = pages.setdefault(idx, bytearray(4096))
                page[within : within + take] = data[pos : pos + take]
                pos += take

        def model_read(off: int, n: int) -> bytes:
            out = bytearray()
            pos = 0
            while pos < n:
                idx, within = divmod(off + pos, 4096)
                take = min(4096 - within, n - pos)
                out += pages.get(idx, bytes(4096))[within : within + take]
                pos += take
            return bytes(out)

        for _ in range(3000):
            op = rnd.random()
            off = rnd.randrange(region)
            if op < 0.5:
                n = rnd.choice([1, 7, 512, 4096, 5000, 65536, 200000])
                src = rnd.randrange(len(corpus) - n)
                data = corpus[src : src + n]
                assert os.pwrite(fd, data, off) == n
                model_write(off, data)
            elif op < 0.75:
                n = rnd.choice([1, 100, 4096, 10000, 131072])
                assert os.pread(fd, n, off) == model_read(off, n)
            elif native:
                n = rnd.choice([1, 4096, 8192, 2 * MIB, 100000])
                fallocate(fd, PUNCH, off, n)
                model_write(off, bytes(n))
            else:
                # pyfuse3 has no fallocate: the kernel turns libfuse's ENOSYS
                # into EOPNOTSUPP, and the data must stay as it was.
                with pytest.raises(OSError) as e:
                    fallocate(fd, PUNCH, off, 4096)
                assert e.value.errno == errno.EOPNOTSUPP
        assert os.pread(fd, region, 0) == model_read(0, region)
        # past the end: a short read, then nothing; writes get ENOSPC
        assert len(os.pread(fd, 8192, size - 4096)) == 4096
        assert os.pread(fd, 4096, size) == b""
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, size)
        assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
        # other fallocate modes are refused cleanly, never ENOSYS
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
        assert daemon.stats()["discard_supported"] is native
        assert_c_threads_served(daemon)
    finally:
        os.close(fd)
    del model


def dd_fill(d: Daemon, tmp_path: Path) -> bytes:
    src = tmp_path / "real.bin"
    data = real_data(64 * MIB)
    src.write_bytes(data)
    back = tmp_path / "back.bin"
    subprocess.run(
        ["dd", f"if={src}", f"of={d.file}", "bs=1M", "oflag=direct", "conv=notrunc", "status=none"], check=True
    )
    subprocess.run(["dd", f"if={d.file}", f"of={back}", "bs=1M", "count=64", "iflag=direct", "status=none"], check=True)
    assert back.read_bytes() == data
    return data


def assert_c_threads_served(d: Daemon) -> None:
    """With the builtin backend and the native engine, the C threads served
    the I/O (if they never were started, every data test would still pass,
    on the Python path); otherwise there are none."""
    s = d.stats()
    threads = s["fuse_threads"]
    if s["fuse_backend"] == "builtin" and s["engine"] == "native":
        assert isinstance(threads, dict) and threads["serving"] == 1, s
        assert threads["served_in_c"] > 0 and threads["handed_up"] > 0 and threads["bugs"] == 0, threads
    else:
        assert threads is None


def test_dd_direct_roundtrip(backend_daemon: Daemon, tmp_path: Path) -> None:
    dd_fill(backend_daemon, tmp_path)
    s = backend_daemon.stats()
    assert s["orig_data_size"] == 64 * MIB and s["compr_data_size"] < 64 * MIB  # it compressed
    assert_c_threads_served(backend_daemon)


@pytest.fixture(params=["native", "python"])
def engine_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    with run_daemon(tmp_path, pool={"engine": request.param}) as d:
        assert d.stats()["engine"] == request.param
        yield d


def _state_of(d: Daemon) -> State:
    """The daemon's state, mapped from the memfds its supervisor holds."""
    fds: dict[str, int] = {}
    try:
        for n in os.listdir(f"/proc/{d.proc.pid}/fd"):
            path = f"/proc/{d.proc.pid}/fd/{n}"
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                for name in ("meta", "arena"):
                    if target.startswith(f"/memfd:zswapd-{name} "):
                        fds[name] = os.open(path, os.O_RDWR)
        return State.attach([fds["meta"], fds["arena"]])
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_corrupt_object_is_eio_through_the_c_threads_and_serving_goes_on(tmp_path: Path) -> None:
    """A page whose object no longer decompresses: its READ, served by a C
    thread, fails with EIO, failed_reads counts it once, and the same
    worker goes on serving every other page, and that page once rewritten."""
    with run_daemon(tmp_path, pool={"engine": "native"}) as d:
        page = (b"zswapd corrupt page " * 210)[:4096]
        fd = os.open(d.file, os.O_RDWR)
        try:
            for i in range(8):
                assert os.pwrite(fd, page[i:] + page[:i], i * 4096) == 4096
            state = _state_of(d)
            try:
                corrupt_object(state, 5)
            finally:
                state.close()
            before = d.stats()
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 5 * 4096)
            assert e.value.errno == errno.EIO
            after = d.stats()
            assert after["failed_reads"] == before["failed_reads"] + 1  # type: ignore[operator]
            assert after["fuse_threads"]["served_in_c"] > before["fuse_threads"]["served_in_c"]  # type: ignore[index]
            assert after["fuse_errors"] == before["fuse_errors"] + 1  # type: ignore[operator]
            assert after["process"]["worker_pid"] == before["process"]["worker_pid"]  # type: ignore[index]
            for i in (0, 4, 6, 7):
                assert os.pread(fd, 4096, i * 4096) == page[i:] + page[:i]
            assert os.pwrite(fd, page, 5 * 4096) == 4096
            assert os.pread(fd, 4096, 5 * 4096) == page
        finally:
            os.close(fd)
        assert d.stop() == 0, d.logtext()


def test_punch_half_releases_memory(engine_daemon: Daemon, tmp_path: Path) -> None:
    daemon = engine_daemon
    data = dd_fill(daemon, tmp_path)
    before = daemon.stats()
    fd = os.open(daemon.file, os.O_RDWR)
    try:
        fallocate(fd, PUNCH, 0, 32 * MIB)
    finally:
        os.close(fd)
    after = daemon.stats()
    print(f"punch half: mem_used_total {before['mem_used_total']} -> {after['mem_used_total']}")
    assert after["notify_free"] == 8192
    assert after["orig_data_size"] == 32 * MIB
    assert after["mem_used_total"] < before["mem_used_total"] * 0.7  # type: ignore[operator]
    rest = subprocess.run(
        ["dd", f"if={daemon.file}", "bs=1M", "skip=32", "count=32", "iflag=direct", "status=none"],
        check=True,
        capture_output=True,
    ).stdout
    assert rest == data[32 * MIB :]


@pytest.mark.parametrize(
    "backend, algorithm, engine",
    [("builtin", "lz4", "native"), ("builtin", "zstd", "native"), ("builtin", "lz4", "python"),
     ("builtin", "zstd", "python"), ("pyfuse3", "lz4", "native")],
)  # fmt: skip
def test_fio_verify_through_loop_device(tmp_path: Path, backend: str, algorithm: str, engine: str) -> None:
    with run_daemon(tmp_path, pool={"algorithm": algorithm, "engine": engine}, fuse={"backend": backend}) as d:
        assert d.stats()["engine"] == engine
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", d.file], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            common = [
                "fio", f"--filename={loop}", "--direct=1", "--ioengine=psync", "--size=128M",
                "--verify=crc32c", "--verify_fatal=1", "--buffer_compress_percentage=60",
                "--refill_buffers", "--output-format=terse", "--group_reporting",
            ]  # fmt: skip
            jobs = [["--name=mixed", "--rw=randwrite", "--bsrange=4k-512k", "--do_verify=1"]]
            if backend == "builtin":  # pyfuse3 cannot take the trims (no fallocate)
                jobs.append(["--name=trim", "--rw=randtrimwrite", "--bs=64k", "--do_verify=1"])
            # fio writes its verify state (NAME-0-verify.state) into the current
            # directory: keep it out of the checkout.
            fio_dir = tmp_path / "fio"
            fio_dir.mkdir()
            for job in jobs:
                r = subprocess.run(common + job, capture_output=True, text=True, cwd=fio_dir)
                assert r.returncode == 0, r.stdout + r.stderr
                assert "verify" not in r.stderr.lower(), r.stderr
            if backend == "builtin":
                assert int(d.stats()["notify_free"]) > 0  # the trims arrived as discards  # type: ignore[call-overload]
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
        assert d.stats()["fuse_errors"] == 0


def test_non_root_cannot_open_or_read() -> None:
    public = Path(tempfile.mkdtemp(prefix="zswapd-test-", dir="/tmp"))
    os.chmod(public, 0o755)  # traversable, so only the file's own checks stand in the way
    try:
        with run_daemon(public) as d:
            fd = os.open(d.file, os.O_WRONLY)
            os.pwrite(fd, b"SECRET-SWAPPED-PAGE" * 200, 0)
            os.close(fd)
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            # Without allow_other the kernel refuses every other user outright;
            # default_permissions and the daemon's own uid check in OPEN back it up.
            r = subprocess.run(nobody + ["ls", str(d.mountpoint)], capture_output=True)
            assert r.returncode != 0 and b"Permission denied" in r.stderr
            for cmd in (["cat", d.file], ["dd", f"if={d.file}", "bs=4096", "count=1", "iflag=direct"]):
                r = subprocess.run(nobody + cmd, capture_output=True)
                assert r.returncode != 0
                assert b"SECRET" not in r.stdout
                assert b"Permission denied" in r.stderr, r.stderr
            r = subprocess.run(nobody + ["sh", "-c", f"echo x > {d.file}"], capture_output=True)
            assert r.returncode != 0 and b"Permission denied" in r.stderr
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _run_fails(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


def test_bad_mountpoints_exit_2(tmp_path: Path) -> None:
    mp = tmp_path / "full"
    mp.mkdir()
    (mp / "something").write_text("x")
    cfg = tmp_path / "c.toml"
    write_config(cfg, mp, str(tmp_path / "ctl/s.sock"))
    r = _run_fails([sys.executable, "-m", "zswapd", "run", "--config", str(cfg)])
    assert r.returncode == 2 and "is not empty" in r.stderr
    # a missing mountpoint is created with mode 0700
    with run_daemon(tmp_path, name="fresh") as d:
        assert os.path.ismount(d.mountpoint)  # (its stat is the FUSE root's now)
        # a second instance on the same mountpoint names the first
        r = _run_fails([sys.executable, "-m", "zswapd", "run", "--config", str(d.config)])
        assert r.returncode == 2
        assert f"pid {d.proc.pid}" in r.stderr, r.stderr
        assert d.stop() == 0
    assert not os.path.ismount(d.mountpoint)
    assert stat.S_IMODE(d.mountpoint.stat().st_mode) == 0o700


def test_already_mounted_mountpoint_exit_2(tmp_path: Path) -> None:
    mp = tmp_path / "busy"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mp)], check=True)
    try:
        cfg = tmp_path / "c.toml"
        write_config(cfg, mp, str(tmp_path / "ctl/s.sock"))
        r = _run_fails([sys.executable, "-m", "zswapd", "run", "--config", str(cfg)])
        assert r.returncode == 2 and "already mounted" in r.stderr
    finally:
        subprocess.run(["umount", str(mp)], check=False)


def test_not_root_or_no_dev_fuse_is_a_clear_error(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="zswapd-test-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        cfg = public / "c.toml"
        write_config(cfg, public / "m", str(public / "ctl/s.sock"))
        os.chmod(cfg, 0o644)
        # Import as root (site-packages may be private to root), then drop to nobody.
        script = (
            "import os, sys, zswapd.cli, zswapd.supervisor, zswapd.worker; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            f"sys.exit(zswapd.cli.main(['run', '--config', {str(cfg)!r}]))"
        )
        r = _run_fails([sys.executable, "-c", script])
        assert r.returncode == 2 and "must be started as root" in r.stderr, r.stderr
    finally:
        shutil.rmtree(public, ignore_errors=True)
    cfg = tmp_path / "c.toml"
    write_config(cfg, tmp_path / "m", str(tmp_path / "ctl/s.sock"))
    # No /dev/fuse: a private mount namespace with an empty /dev.
    script = f"mount -t tmpfs none /dev && exec {sys.executable} -m zswapd run --config {cfg}"
    r = _run_fails(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert r.returncode == 2 and "/dev/fuse does not exist" in r.stderr, r.stderr


def test_sigterm_cleans_up(tmp_path: Path) -> None:
    with run_daemon(tmp_path, name="term") as d:
        mp = str(d.mountpoint)
        assert d.stop() == 0
    assert not os.path.ismount(mp)
    assert not os.path.exists(d.socket)
    force_cleanup(mp)


def test_swap_missing_tools_fail_before_mounting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    mp = tmp_path / "m"
    write_config(cfg, mp, str(tmp_path / "ctl/s.sock"), swap={"enable": True})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("swapon", "swapoff"):  # mkswap deliberately missing
        path = shutil.which(tool)
        assert path
        (bindir / tool).symlink_to(path)
    r = _run_fails(
        [sys.executable, "-m", "zswapd", "run", "--config", str(cfg)], env={**os.environ, "PATH": str(bindir)}
    )
    assert r.returncode == 2 and "mkswap not found" in r.stderr, r.stderr
    assert not os.path.ismount(mp)


def test_pyfuse3_backend_missing_exits_2(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "pyfuse3").mkdir(parents=True)
    (fake / "pyfuse3" / "__init__.py").write_text("raise ImportError('pyfuse3 is not installed')\n")
    cfg = tmp_path / "c.toml"
    write_config(cfg, tmp_path / "m", str(tmp_path / "ctl/s.sock"), fuse={"backend": "pyfuse3"})
    env = {**os.environ, "PYTHONPATH": f"{fake}:{os.environ.get('PYTHONPATH', '')}"}
    r = _run_fails([sys.executable, "-m", "zswapd", "run", "--config", str(cfg)], env=env)
    assert r.returncode == 2, r.stderr
    assert "pip install 'zswapd[pyfuse3]'" in r.stderr and "libfuse3-dev" in r.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_pyfuse3_with_swap_warns_about_discards(tmp_path: Path) -> None:
    with run_daemon(tmp_path, fuse={"backend": "pyfuse3"}, swap={"enable": True}, device={"size": "64M"}) as d:
        assert "cannot receive discards" in d.logtext()
        s = d.stats()
        assert s["discard_supported"] is False and s["device"]["loop"]  # type: ignore[index]
        assert d.stop() == 0
