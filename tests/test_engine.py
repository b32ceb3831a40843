"""The engine interface: selection, the native engine against the Python
reference (same tables, byte for byte, for the same allocator calls), state
handed from one engine to the other, fail-closed errors, and the native
engine's tests rerun under AddressSanitizer and UndefinedBehaviorSanitizer."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from zswapd import engine as engine_mod
from zswapd.bench import sample_pages
from zswapd.codec import Codec
from zswapd.engine import Engine, open_pool
from zswapd.errors import BadRequest
from zswapd.pool import FRAME_SIZE, HUGE_THRESHOLD, PoolError
from zswapd.state import State
from zswapd.store import Store

if TYPE_CHECKING:
    from zswapd.fuse.threads import FuseThreads

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
ENGINES = ["python", "native"]


def _digest(pool: Engine) -> dict[str, str]:
    """Every table and the arena, hashed: two engines that made the same
    calls must leave the same bytes."""
    state = pool.state
    out = {t.name: hashlib.sha256(bytes(state.view(t.name))).hexdigest() for t in state.tables}
    out["arena"] = hashlib.sha256(bytes(state.arena()[0])).hexdigest()
    return out


def _allocator_workload(pool: Engine, seed: int) -> list[int]:
    rnd = random.Random(seed)
    live: dict[int, int] = {}
    moved = []
    for step in range(6000):
        if live and rnd.random() < 0.4:
            h = rnd.choice(list(live))
            pool.free(h, live.pop(h))
        else:
            n = rnd.choice([1, 20, 100, 333, 700, 1500, 2049, 3000, HUGE_THRESHOLD - 1, FRAME_SIZE])
            h = pool.store(rnd.randbytes(n))
            live[h] = n
        if step % 997 == 0:
            moved.append(pool.compact(max_moves=rnd.randrange(1, 40)))
            pool.refill_reserve()
    moved.append(pool.compact())
    return moved


def test_both_engines_leave_the_same_bytes_for_the_same_calls() -> None:
    """The allocator is deterministic: the same stores, frees and compactions
    through either engine leave identical tables, arena and volatile indexes."""
    py = open_pool("python", 4096, 8192, reserve_frames=16)
    nat = open_pool("native", 4096, 8192, reserve_frames=16)
    assert py.name == "python" and nat.name == "native"
    assert _allocator_workload(py, 11) == _allocator_workload(nat, 11)
    assert _digest(py) == _digest(nat)
    assert py.reference().volatile() == nat.reference().volatile()
    assert py.class_stats() == nat.class_stats()


def _store_workload(store: Store, seed: int, pages: list[bytes], model: bytearray) -> bytearray:
    rnd = random.Random(seed)
    npages = store.size // PAGE
    for step in range(1500):
        i = rnd.randrange(npages)
        r = rnd.random()
        if r < 0.15:
            n = min(rnd.randrange(1, 9), npages - i) * PAGE - rnd.randrange(2) * 100
            store.discard(i * PAGE + 50, n - 50)
            model[i * PAGE + 50 : i * PAGE + n] = bytes(n - 50)
        elif r < 0.25:
            at = i * PAGE + rnd.randrange(PAGE)
            data = pages[rnd.randrange(len(pages))][: rnd.randrange(1, PAGE)][: store.size - at]
            store.write(at, data)
            model[at : at + len(data)] = data
        else:
            page = pages[rnd.randrange(len(pages))]
            store.write(i * PAGE, page)
            model[i * PAGE : (i + 1) * PAGE] = page
        if step % 400 == 0:
            store.compact(max_moves=rnd.randrange(1, 30))
    return model


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python")])
def test_state_written_by_one_engine_is_served_by_the_other(writer: str, reader: str, algorithm: str) -> None:
    pages = sample_pages(600)
    a = Store(512 * PAGE, Codec(algorithm), reserve_frames=4, engine=writer)
    model = _store_workload(a, 5, pages, bytearray(a.size))
    before = a.stats()
    b = Store(512 * PAGE, Codec(algorithm), reserve_frames=4, state=State.attach(a.state.fds()), engine=reader)
    a.close()
    try:
        b.check_invariants()
        after = b.stats()
        assert after["engine"] == reader
        for key in ("orig_data_size", "compr_data_size", "mem_used_total", "same_pages", "huge_pages", "classes"):
            assert after[key] == before[key], key
        assert b.read(0, b.size) == model
        # and it carries on: rewrites, discards and a compaction on the other engine
        model = _store_workload(b, 6, pages, model)
        b.compact()
        b.check_invariants()
        assert b.read(0, b.size) == model
    finally:
        b.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_selection_and_stats_name_the_engine(engine: str) -> None:
    s = Store(16 * PAGE, engine=engine)
    assert s.stats()["engine"] == engine
    s.close()
    with pytest.raises(BadRequest, match="engine must be one of auto, native, python"):
        Store(16 * PAGE, engine="rust")


def test_auto_prefers_native_and_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert engine_mod.select("auto") == "native"
    monkeypatch.setattr(engine_mod, "_NATIVE_ERROR", "No module named 'zswapd._engine'")
    monkeypatch.setattr(engine_mod, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="zswapd"):
        assert Store(16 * PAGE).stats()["engine"] == "python"
        assert Store(16 * PAGE).stats()["engine"] == "python"
    warnings = [r for r in caplog.records if "native engine not available" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(BadRequest, match="not built.*liblz4-dev"):
        Store(16 * PAGE, engine="native")


def test_c_and_python_agree_on_every_shared_rule() -> None:
    """The C engine exports every layout, list and limit Python also writes
    down (RULES); engine.py refuses a build that disagrees, as if it were
    not built, so auto falls back to the Python engine and says why."""
    from zswapd import _engine

    assert engine_mod.native_error() == ""
    assert engine_mod.rules_disagreeing(_engine.RULES) == []
    assert set(_engine.RULES) == set(engine_mod.python_rules())
    other = dict(_engine.RULES, ENTRY_LEN_SHIFT=5, COUNTERS=(*_engine.RULES["COUNTERS"], "new_counter"))
    assert [d.split(":")[0] for d in engine_mod.rules_disagreeing(other)] == ["COUNTERS", "ENTRY_LEN_SHIFT"]


@pytest.mark.parametrize("engine", ENGINES)
def test_corrupt_object_is_a_clear_error_and_counted(engine: str) -> None:
    s = Store(8 * PAGE, engine=engine)
    page = (b"zswapd corrupt test " * 300)[:PAGE]
    s.write(PAGE, page)
    entry = s.table[1]
    assert entry & 3 == 2  # compressed
    handle = s.state.view("handle")[entry >> 32]
    z, slot = handle >> 16, handle & 0xFFFF
    frame = s.state.view("zs_first")[z]
    size = s.pool.reference().classes[s.state.view("zs_class")[z]].size
    at = frame * FRAME_SIZE + slot * size + 4
    arena = s.state.arena()[0]
    arena[at : at + 16] = b"\xff" * 16  # garbage where the lz4 block starts
    with pytest.raises(ValueError, match="corrupt object|decompress"):
        s.read(PAGE, PAGE)
    assert s.stats()["failed_reads"] == 1
    assert s.read(0, PAGE) == bytes(PAGE)  # other pages still read
    s.close()


def test_native_refuses_bad_object_calls() -> None:
    pool = open_pool("native", 64, 64)
    with pytest.raises(PoolError, match="unknown handle"):
        pool.free(5, 10)
    with pytest.raises(PoolError, match="unknown handle"):
        pool.load(0, 10)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="beyond the device size"):
        pool.write(0, b"x")  # a bare pool has no device pages
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.compact()


@pytest.mark.parametrize("engine", ENGINES)
def test_count_bumps_a_named_counter_and_refuses_other_names(engine: str) -> None:
    """Engine.count is how the store bumps a counter (the native engine's
    is one atomic add, so a bump by its own threads is never lost)."""
    s = Store(4 * PAGE, engine=engine)
    before = s.stats()
    s.write(0, bytes(PAGE))
    s.read(0, PAGE)
    s.engine.count("limit_hits", 3)
    s.engine.count("failed_writes")
    after = s.stats()
    assert after["num_writes"] == before["num_writes"] + 1
    assert after["num_reads"] == before["num_reads"] + 1
    assert after["limit_hits"] == before["limit_hits"] + 3
    assert after["failed_writes"] == before["failed_writes"] + 1
    with pytest.raises(AttributeError, match="no engine counter named 'frames_used'"):
        s.engine.count("frames_used")
    s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_algorithm_switch_keeps_old_pages_readable(engine: str) -> None:
    pages = sample_pages(64)
    s = Store(64 * PAGE, Codec("lz4"), engine=engine)
    for i, p in enumerate(pages[:32]):
        s.write(i * PAGE, p)
    s.set_algorithm("zstd", 3)
    for i, p in enumerate(pages[32:], 32):
        s.write(i * PAGE, p)
    assert s.read(0, 64 * PAGE) == b"".join(pages)
    assert s.stats()["algorithm"] == "zstd"
    s.close()


# -- the sanitizer target -------------------------------------------------------


def _gcc_file(name: str) -> str | None:
    out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
    path = out.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


ENGINE_SOURCES = sorted(str(p) for p in (ROOT / "zswapd" / "engine").glob("*.c"))


def _sanitized_copy(tmp_path: Path, flags: list[str]) -> Path:
    """A copy of the package and the native tests in ``tmp_path``, with the
    engine (zswapd/engine/*.c) built by gcc with ``flags``; returns the
    built module."""
    shutil.copytree(ROOT / "zswapd", tmp_path / "zswapd", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "tests").mkdir()
    for name in ("conftest.py", "test_engine.py", "test_pool.py", "test_store.py", "test_fuse_paths.py"):
        shutil.copy(ROOT / "tests" / name, tmp_path / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lz4 = _gcc_file("liblz4.a")
    out = tmp_path / "zswapd" / ("_engine" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [
        "gcc", "-shared", "-fPIC", "-O1", "-g", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Werror",
        "-fno-omit-frame-pointer", *flags, f"-I{sysconfig.get_paths()['include']}", *ENGINE_SOURCES, "-o", str(out),
    ]  # fmt: skip
    cmd += [lz4, "-Wl,--exclude-libs,ALL"] if lz4 else ["-DZSWAPD_LZ4_FULL_RESET", "-llz4"]
    cmd += ["-lzstd"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def _engine_file(tmp_path: Path, env: dict[str, str]) -> str:
    check = subprocess.run(
        [sys.executable, "-c", "import zswapd._engine as m; print(m.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return check.stdout.strip()


def test_native_engine_under_asan_and_ubsan(tmp_path: Path) -> None:
    """Build the engine with -fsanitize=address,undefined and bound checks on
    every table index (ZSWAPD_BOUNDS), into a copy of the package, and run
    the native engine's tests there with libasan preloaded.  Any report
    aborts the run, so a clean exit is the assertion."""
    libasan = _gcc_file("libasan.so")
    assert libasan, "gcc's libasan is needed (Debian: gcc brings libasan8)"
    out = _sanitized_copy(tmp_path, ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-DZSWAPD_BOUNDS"])
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONMALLOC="malloc",  # so ASan sees the Python objects' buffers too
        PYTHONPATH=str(tmp_path),
        PYTHONDONTWRITEBYTECODE="1",
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "tests/test_engine.py",
         "tests/test_pool.py", "tests/test_store.py", "tests/test_fuse_paths.py",
         "-k", "(native or Native or Alternating or both or paths) and not asan and not tsan"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error" not in tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 20, tail  # the native tests really ran
    assert _engine_file(tmp_path, env) == str(out)  # the engine that ran was the sanitized build


@pytest.mark.root
def test_native_engine_under_tsan(tmp_path: Path) -> None:
    """Build the engine with -fsanitize=thread into a copy of the package and
    run the threaded test (writers, readers, discards, a compactor, and the
    unlocked policy reads and counter bumps of the store) and the native
    FUSE threads on a real mount (shared fd, shared clone, a clone each;
    spinner token, O_NONBLOCK toggling, stop) and over a socket pair where
    a write stops and asks the store's policy, and a dictionary dropped while
    readers decompress with it, with libtsan preloaded.  Any
    ThreadSanitizer report that names a file of zswapd/engine/ fails it.
    The interpreter is not instrumented, so TSan sees only the engine's
    accesses and the intercepted calls (memcpy, locks) Python makes;
    tests/tsan.supp holds the suppressions for reports that lie wholly in
    the interpreter, and must never name an engine function."""
    libtsan = _gcc_file("libtsan.so")
    assert libtsan, "gcc's libtsan is needed (Debian: gcc brings libtsan2)"
    out = _sanitized_copy(tmp_path, ["-fsanitize=thread"])
    logs = tmp_path / "tsan"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=libtsan,
        # detect_deadlocks=0: lock_all holds every class lock at once (over
        # a hundred), past the 64 the deadlock detector can track; the lock
        # order is the documented one at the top of zswapd/engine/engine.h.
        TSAN_OPTIONS=f"halt_on_error=0 report_signal_unsafe=0 detect_deadlocks=0 exitcode=0 "
        f"suppressions={ROOT / 'tests' / 'tsan.supp'} log_path={logs / 'report'}",
        PYTHONPATH=str(tmp_path),
        PYTHONDONTWRITEBYTECODE="1",
    )
    # The threaded test, the FUSE threads on a real mount, and writes that
    # stop on a FUSE thread and ask the store's policy with the GIL.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py",
           "tests/test_fuse_paths.py", "-k", "threads_against_a_model or serve_a_real_mount or runs_out_of_room or the_store_refuses "
           "or dictionary_dropped"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.iterdir()))
    if "unexpected memory mapping" in text + run.stderr:
        # TSan's fixed shadow layout against a randomized mmap base (a
        # kernel with high mmap_rnd_bits): rerun without ASLR.
        for p in logs.iterdir():
            p.unlink()
        run = subprocess.run(["setarch", os.uname().machine, "-R", *cmd], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        text = "".join(p.read_text(errors="replace") for p in sorted(logs.iterdir()))
    assert "FATAL: ThreadSanitizer" not in text + run.stderr, (text + run.stderr)[-6000:]
    reports = [r for r in text.split("==================") if "WARNING: ThreadSanitizer" in r]
    engine_reports = [r for r in reports if "zswapd/engine/" in r]
    assert not engine_reports, (
        f"{len(engine_reports)} ThreadSanitizer report(s) in zswapd/engine/:\n" + "\n".join(engine_reports)[-12000:]
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert re.search(r"\b7 passed", run.stdout), run.stdout[-3000:]  # the threaded tests really ran
    assert _engine_file(tmp_path, env) == str(out)  # under TSan, with the instrumented build


# -- the C FUSE threads: READ, WRITE, punch-hole served in C, the rest handed up ------


def _reads_handed_up_from_many_threads(server: FuseThreads, model: bytearray) -> None:
    """READs handed up to Python (as before enable(), right after a takeover)
    from four threads at once: each reply must carry its own unique and its
    own bytes, though FuseFS builds READ replies in one buffer and the engine
    releases the GIL while it reads."""
    import threading

    from zswapd.fuse import protocol

    bad: list[str] = []

    def reader(k: int) -> None:
        rnd = random.Random(k)
        for i in range(300):
            unique = (k << 32) | i
            off = rnd.randrange(0, len(model) - (128 << 10), PAGE)
            n = rnd.choice([4, 32]) * PAGE
            req = protocol.IN_HEADER.pack(protocol.IN_HEADER.size + protocol.READ_IN.size, protocol.READ, unique,
                                          protocol.FILE_ID, 0, 0, 0, 0, 0)  # fmt: skip
            req += protocol.READ_IN.pack(0, off, n, 0, 0, 0, 0)
            out = server._handle(req)
            length, error, got = protocol.OUT_HEADER.unpack_from(out, 0)
            if (length, error, got) != (protocol.OUT_HEADER.size + n, 0, unique):
                bad.append(f"thread {k}: header {(length, error, got)} for unique {unique}")
            elif out[protocol.OUT_HEADER.size :] != model[off : off + n]:
                bad.append(f"thread {k}: wrong bytes at {off}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad[:10]


def _concurrent_writes(files: list[int], model: bytearray, corpus: bytes, seed: int) -> None:
    """A thread per fd (O_DIRECT), each writing 32 x 128 KiB into its own
    16 MiB of the file; the model follows."""
    import mmap
    import threading

    def writer(k: int) -> None:
        buf = mmap.mmap(-1, 128 << 10)
        rnd = random.Random(seed * 4 + k)
        for _ in range(32):
            off = (k << 24) + rnd.randrange(0, (16 << 20) - (128 << 10), PAGE)
            src = rnd.randrange(0, len(corpus) - (128 << 10))
            buf[:] = corpus[src : src + (128 << 10)]
            assert os.pwrite(files[k], buf, off) == 128 << 10
            model[off : off + (128 << 10)] = buf[:]

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_init_read_before_the_fuse_threads_exist_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C thread can read INIT and hand it up before serve_fuse has returned
    (the kernel queues INIT at mount, so the first thread finds it at once).
    INIT must get its real reply, never EIO: an error reply to INIT marks
    the connection failed for good (every open then fails ECONNREFUSED, as
    a start-up under load showed about one time in ten).  Serving in C is
    enabled once the server exists."""
    from zswapd import _engine
    from zswapd.fuse import protocol
    from zswapd.fuse.threads import FuseThreads

    store = Store(64 * PAGE, engine="native")
    fs = protocol.FuseFS(store)
    replies: list[bytes | None] = []
    enabled: list[tuple[int, int]] = []

    class Server:
        def enable(self, max_write: int, size: int) -> None:
            enabled.append((max_write, size))

    def serve_fuse(engine: object, fds: list[int], callback: Callable[[bytes], bytes | None], decide: object) -> Server:
        init = struct.pack("<IIII", 7, 45, 131072, 0xFFFFFFFF) + bytes(48)
        replies.append(callback(protocol.pack_request(protocol.INIT, 5, 0, init)))  # a thread, before the return
        return Server()

    monkeypatch.setattr(_engine, "serve_fuse", serve_fuse)
    server = FuseThreads(-1, fs, store.engine, threads=1)
    error, unique, _ = protocol.unpack_reply(replies[0])  # type: ignore[arg-type]
    assert (error, unique) == (0, 5) and fs.initialized
    assert enabled == [(fs.max_write, 64 * PAGE)] and server.bugs == 0
    store.close()


@pytest.mark.root
@pytest.mark.parametrize("nclones", [0, 1, 2], ids=["shared-fd", "one-clone", "clone-per-thread"])
def test_native_threads_serve_a_real_mount(tmp_path: Path, nclones: int) -> None:
    """C threads serve READ, WRITE and punch-hole FALLOCATE of a real FUSE
    mount; INIT, LOOKUP, OPEN, GETATTR... go up to FuseFS.handle.  On the
    connection's O_NONBLOCK fd shared, or on blocking clones (each reply on
    the fd its request came from); stop() joins threads asleep in read(2)."""
    import mmap

    from tests.conftest import fallocate
    from zswapd.fuse import mount as fmount
    from zswapd.fuse import protocol
    from zswapd.fuse.threads import FuseThreads

    size = 64 << 20
    store = Store(size, engine="native")
    fs = protocol.FuseFS(store)
    fd = fmount.open_fuse()
    mp = tmp_path / "mnt"
    mp.mkdir()
    server: FuseThreads | None = None
    mounted = False
    clones: list[int] = []
    try:
        fmount.mount(fd, str(mp))
        mounted = True
        clones = [fmount.clone_fuse(fd) for _ in range(nclones)]
        server = FuseThreads(fd, fs, store.engine, threads=2, clones=clones)
        model = bytearray(size)
        corpus = b"".join(sample_pages(512))  # 2 MiB
        f = os.open(mp / "swap", os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT needs
            rnd = random.Random(9)
            for _ in range(200):
                n = rnd.choice([1, 4, 32, 256]) * PAGE
                off = rnd.randrange(0, size - n, PAGE)
                src = rnd.randrange(0, len(corpus) - n)
                buf[:n] = corpus[src : src + n]
                assert os.pwritev(f, [memoryview(buf)[:n]], off) == n
                model[off : off + n] = corpus[src : src + n]
                if rnd.random() < 0.2:
                    hole = rnd.randrange(0, size - 64 * PAGE, PAGE)
                    fallocate(f, 0x03, hole, 16 * PAGE)  # PUNCH_HOLE | KEEP_SIZE
                    model[hole : hole + 16 * PAGE] = bytes(16 * PAGE)
            for off in range(0, 8 << 20, 1 << 20):
                assert os.preadv(f, [buf], off) == 1 << 20
                assert buf[:] == model[off : off + (1 << 20)]
        finally:
            os.close(f)
        # an unaligned write comes in as an unaligned WRITE: read-modify-write in C
        with open(mp / "swap", "r+b", buffering=0) as g:
            g.seek(12345)
            g.write(b"unaligned bytes")
        model[12345 : 12345 + 15] = b"unaligned bytes"
        assert store.read(0, 8 << 20) == model[: 8 << 20]
        stats = server.stats()
        assert stats["serving"] == 1 and stats["threads"] == 2 and stats["clones"] == nclones
        assert stats["served_in_c"] >= 200 and stats["handed_up"] > 0 and stats["bugs"] == 0
        st = store.stats()
        assert st["num_writes"] >= 200 and st["notify_free"] > 0
        # Four writers at once, on files opened beforehand, so only hot
        # WRITEs come (a request handed up wakes a follower by itself): requests
        # queue, the reader wakes a follower, and both threads serve at once.
        # A new server counts max_busy from 0.  The rounds bound a scheduling
        # accident; they are not a timing.
        files = [os.open(mp / "swap", os.O_RDWR | os.O_DIRECT) for _ in range(4)]
        try:
            server.stop()
            server = FuseThreads(fd, fs, store.engine, threads=2, clones=clones)
            for rnd in range(20):
                _concurrent_writes(files, model, corpus, seed=rnd)
                if server.stats()["max_busy"] >= 2:
                    break
            assert server.stats()["max_busy"] == 2, server.stats()
        finally:
            for f in files:
                os.close(f)
        assert store.read(0, size) == model
        _reads_handed_up_from_many_threads(server, model)
    finally:
        if mounted:
            fmount.unmount(str(mp))
        if server is not None:
            server.stop()
        for c in clones:
            os.close(c)
        os.close(fd)
    store.check_invariants()
    assert store.read(0, size) == model
    store.close()


# -- concurrency: per-class locks, entry lock bits, codec outside the locks --------


def _stamped(tag: int, seq: int, n: int) -> bytes:
    """``n`` bytes that say who wrote them and when, and compress to a size
    that depends on ``seq`` (so writes land in many classes and compaction
    has work): a 16-byte stamp, random bytes, zeros."""
    rnd = random.Random(tag * 1_000_003 + seq)
    body = rnd.randbytes(rnd.choice([0, 40, 300, 900, 1700, 2600, 4000]))
    out = (tag.to_bytes(8, "little") + seq.to_bytes(8, "little") + body).ljust(n, b"\0")[:n]
    return out


def test_native_dictionary_dropped_while_readers_decompress_with_it() -> None:
    """tier.c's "readers and the free": readers decompress one page through
    its dictionary while a writer rewrites it (un-naming the slot) and the
    tier thread installs a dictionary, recompresses the page with it and
    drops it as soon as no entry names it, in a tight loop.  Every read is
    a whole version of the page.  Under ThreadSanitizer (the TSan test runs
    this) the drop's free must be ordered after the readers' use of the
    DDict: with the count's decrement and drop's load relaxed, 30 s of this
    gave 2-3 reports in ZSTD_freeDDict, with release/acquire none."""
    import threading
    import time

    npages, seconds = 64, 6.0
    store = Store(npages * PAGE, Codec("lz4", 1), reserve_frames=8, engine="native")
    eng = store.engine
    words = [random.Random(i).randbytes(6).hex() for i in range(300)]

    def text_page(seed: int) -> bytes:  # shared words: a dictionary pays
        r = random.Random(seed)
        return " ".join(r.choice(words) for _ in range(800)).encode()[:PAGE].ljust(PAGE, b" ")

    versions = {text_page(i) for i in range(npages)}
    for i in range(npages):
        eng.write(i * PAGE, text_page(i))
    samples, _ = eng.sample(0, npages, 0, 1, npages)
    dictionary = eng.train(samples, 8192)
    stop = time.monotonic() + seconds
    errors: list[str] = []
    done = {"reads": 0, "moved": 0, "drops": 0}

    def reader() -> None:
        out = bytearray(PAGE)
        try:
            while time.monotonic() < stop:
                eng.readinto(0, memoryview(out))
                assert bytes(out) in versions, "a torn or foreign page 0"
                done["reads"] += 1
        except BaseException as e:
            errors.append(f"reader: {e!r}")

    def writer() -> None:
        rnd = random.Random(5)
        try:
            while time.monotonic() < stop:
                assert eng.write(0, text_page(rnd.randrange(npages))) == (PAGE, 0)
        except BaseException as e:
            errors.append(f"writer: {e!r}")

    def tier() -> None:
        try:
            while time.monotonic() < stop:
                slot, _ = eng.add_dictionary(dictionary)
                done["moved"] += eng.recompress_step(0, 1, 1, PAGE, 0, 0, 3, 1, slot)[1]
                while time.monotonic() < stop:
                    try:
                        eng.drop_dictionary(slot)
                    except ValueError:  # page 0 still names it
                        continue
                    done["drops"] += 1
                    break
        except BaseException as e:
            errors.append(f"tier: {e!r}")

    threads = [threading.Thread(target=f) for f in (reader, reader, writer, tier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(done)
    assert not errors, errors
    assert done["moved"] > 10 and done["drops"] > 10 and done["reads"] > 1000, done
    store.check_invariants()


def test_native_engine_under_threads_against_a_model() -> None:
    """Threads on disjoint pages (each with its own model, read back as it
    goes), threads writing their own slice of shared pages unaligned (a
    read-modify-write that is not under the page's entry lock would lose
    another thread's slice), readers of shared whole pages that must never
    see a torn page, discards, and a compactor looping in small steps: at
    the end every page is what the models say and the invariants hold.
    Meanwhile a recompressor moves pages to the secondary codec and
    dictionaries come and go (tier.c's step, sampling, install, drop)."""
    import threading

    workers, own_pages, shared = 3, 96, 8
    npages = workers * own_pages + 2 * shared
    # zstd at a slow level: each page spends long enough in C, with the GIL
    # released, that the threads' updates really overlap there.
    store = Store(npages * PAGE, Codec("zstd", 15), reserve_frames=8, engine="native")
    eng = store.engine
    slice_len = PAGE // workers
    models: list[dict[int, bytes]] = [{} for _ in range(workers)]
    whole_versions: dict[int, set[bytes]] = {p: {bytes(PAGE)} for p in range(shared)}
    versions_lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    moved = [0]
    counted = [0]
    compactions_before = store.stats()["compactions"]

    def worker(k: int) -> None:
        try:
            rnd = random.Random(k)
            base = shared * 2 + k * own_pages
            model = models[k]
            out = bytearray(PAGE)
            for seq in range(5000):
                r = rnd.random()
                if r < 0.5:  # a run of own pages
                    i = base + rnd.randrange(own_pages - 4)
                    n = rnd.randrange(1, 5)
                    data = b"".join(_stamped(k, seq * 8 + j, PAGE) for j in range(n))
                    done, st = eng.write(i * PAGE, data)
                    assert (done, st) == (len(data), 0), (done, st)
                    for j in range(n):
                        model[i + j] = data[j * PAGE : (j + 1) * PAGE]
                elif r < 0.6:  # discard own pages
                    i = base + rnd.randrange(own_pages - 4)
                    eng.discard_pages(i, i + 3)
                    for j in range(3):
                        model.pop(i + j, None)
                elif r < 0.75:  # my slice of a shared page, unaligned
                    p = shared + rnd.randrange(shared)
                    at = p * PAGE + k * slice_len
                    data = _stamped(k, seq, slice_len)
                    assert eng.write(at, data) == (slice_len, 0)
                    model[-p - 1] = data
                elif r < 0.85:  # a whole shared page, racing the others
                    p = rnd.randrange(shared)
                    data = _stamped(k + 100, seq, PAGE)
                    with versions_lock:
                        whole_versions[p].add(data)
                    assert eng.write(p * PAGE, data) == (PAGE, 0)
                elif r < 0.93:  # read a shared whole page: some complete version
                    p = rnd.randrange(shared)
                    eng.readinto(p * PAGE, memoryview(out))
                    with versions_lock:
                        assert bytes(out) in whole_versions[p], f"torn page {p}"
                else:  # read own pages back
                    i = base + rnd.randrange(own_pages)
                    eng.readinto(i * PAGE, memoryview(out))
                    assert bytes(out) == model.get(i, bytes(PAGE)), f"page {i}"
        except BaseException as e:  # reported by the main thread
            errors.append(f"worker {k}: {e!r}")

    def compactor() -> None:
        """Also what the store's policy, stats and counters do meanwhile
        holding none of the engine's locks: figures read unlocked, the limit and ``full``
        set, counters bumped (the TSan target runs this test)."""
        try:
            rounds = 0
            while not stop.is_set():
                moved[0] += eng.compact(max_moves=8)
                eng.refill_reserve()
                store.compaction_wanted(1 << 16, 90)
                eng.frame_room()
                eng.frame_limit = 0
                eng.full = 0
                store.engine.count("compactions")
                rounds += 1
                if rounds % 16 == 0:
                    store.stats()
            counted[0] = rounds
        except BaseException as e:
            errors.append(f"compactor: {e!r}")

    tier = [0, 0]  # pages recompressed, dictionaries installed

    def recompressor() -> None:
        """The recompression tier's thread (tier.c, as the policy drives it):
        steps over every page with no idle age, with the newest dictionary;
        now and then a dictionary made of sampled pages (so the pages in it
        shrink, move, and are read back through its DDict by the workers),
        the unused ones dropped, and the census stats take."""
        try:
            rounds = 0
            while not stop.is_set():
                slot = store.dictionary_slot()
                at = 0
                while at < npages and not stop.is_set():
                    at, pages, *_ = eng.recompress_step(at, npages, 1, PAGE, 0, 0, 3, 16, slot)
                    tier[0] += pages
                if rounds % 4 == 0:
                    data, _ = eng.sample(0, npages, 0, 5, 48)
                    if data:
                        try:
                            store.install_dictionary(data)
                            tier[1] += 1
                        except ValueError:  # every slot still named by pages
                            store.drop_unused_dictionaries()
                eng.census()
                rounds += 1
        except BaseException as e:
            errors.append(f"recompressor: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    comp = threading.Thread(target=compactor)
    rec = threading.Thread(target=recompressor)
    comp.start()
    rec.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    comp.join()
    rec.join()
    try:
        assert not errors, errors
        assert moved[0] > 0  # compaction really ran alongside
        assert tier[0] > 0 and tier[1] > 0, tier  # and recompression, with dictionaries
        assert store.stats()["compactions"] == compactions_before + counted[0]  # no bump lost
        got = store.read(0, npages * PAGE)
        for k in range(workers):
            base = shared * 2 + k * own_pages
            for i in range(base, base + own_pages):
                assert got[i * PAGE : (i + 1) * PAGE] == models[k].get(i, bytes(PAGE)), f"page {i}"
        for p in range(shared, 2 * shared):
            page = got[p * PAGE : (p + 1) * PAGE]
            for k in range(workers):
                want = models[k].get(-p - 1, bytes(slice_len))
                assert page[k * slice_len : (k + 1) * slice_len] == want, f"shared page {p}, slice {k}"
        for p in range(shared):
            assert got[p * PAGE : (p + 1) * PAGE] in whole_versions[p]
        store.compact()
        store.check_invariants()
    finally:
        store.close()
