"""Writeback at the engine level: the backing file's segments, writeback and
cleaning steps and backed reads, in both engines (the native one against
the Python reference, byte for byte: page table, segment table and file),
across a crash at any step, under threads, and the setup checks."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zswapd import backing, entry
from zswapd.backing import SEG_SIZE, open_backing_file
from zswapd.codec import ALGORITHMS, Codec
from zswapd.errors import BadRequest
from zswapd.state import CrashHook, State, StateError
from zswapd.store import Store, store_geometry

PAGE = 4096
ENGINES = ["python", "native"]
NPAGES = 256
SIZE = NPAGES * PAGE
NSEG = 6
FILE_BYTES = NSEG * SEG_SIZE


def content(seed: int) -> bytes:
    """Pages of every kind: same-filled, compressible to 40..3900 bytes, or
    random (stored raw: huge, a whole 4 KiB object in a segment)."""
    rnd = random.Random(seed)
    pick = seed % 7
    if pick == 0:
        return bytes([seed % 251 + 1]) * PAGE
    if pick in (5, 6):
        return rnd.randbytes(PAGE)
    n = rnd.randrange(40, 3900)
    return rnd.randbytes(n) + bytes(PAGE - n)


def disk_dir() -> Path:
    """A directory on the root disk for backing files: /var/tmp, which on
    the machines this runs on is the root filesystem (never tmpfs; checked,
    since a backing file refuses memory filesystems)."""
    d = Path(tempfile.mkdtemp(prefix="zswapd-backing-", dir="/var/tmp"))
    fd = os.open(d, os.O_RDONLY)
    try:
        assert backing.fs_type(fd) not in backing._MEMORY_FS, "/var/tmp must be on a disk filesystem"
    finally:
        os.close(fd)
    return d


@pytest.fixture
def files() -> Iterator[Path]:
    d = disk_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _store(engine: str, path: Path, state: State | None = None, nseg: int = NSEG) -> tuple[Store, int]:
    fd = open_backing_file(str(path), nseg * SEG_SIZE) if state is None else os.open(path, os.O_RDWR | os.O_DIRECT)
    s = Store(SIZE, Codec("lz4"), reserve_frames=2, state=state, engine=engine)
    s.engine.attach_backing(fd, nseg * SEG_SIZE)
    return s, fd


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tables(store: Store) -> dict[str, str]:
    st_ = store.state
    return {t.name: hashlib.sha256(bytes(st_.view(t.name))).hexdigest() for t in st_.tables if t.persistent}


Op = tuple[str, int, int, int]


def _apply(store: Store, op: Op, model: bytearray) -> None:
    kind, a, b, seed = op
    if kind == "write":
        n = min(b, NPAGES - a)
        data = b"".join(content(seed + k) for k in range(n))
        store.write(a * PAGE, data)
        model[a * PAGE : a * PAGE + len(data)] = data
    elif kind == "discard":
        n = min(b, NPAGES - a)
        store.discard(a * PAGE, n * PAGE)
        model[a * PAGE : (a + n) * PAGE] = bytes(n * PAGE)
    elif kind == "writeback":
        store.engine.writeback(a, b << 12)
    elif kind == "clean":
        store.engine.clean(a, 1 << 30, b)
    elif kind == "compact":
        store.compact(max_moves=a)


def _prefix(store: Store, model: bytearray) -> None:
    """Every page written, most written back over several segments, a third
    discarded: dead bytes for cleaning to find."""
    for i in range(0, NPAGES, 16):
        _apply(store, ("write", i, 16, i * 7 + 3), model)
    while store.engine.writeback(200, 1 << 30)[0]:
        pass
    for i in range(0, NPAGES, 3):
        _apply(store, ("discard", i, 1, 0), model)


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, NPAGES - 1), st.integers(1, 8), st.integers(0, 10**6)),
        st.tuples(st.just("discard"), st.integers(0, NPAGES - 1), st.integers(1, 12), st.just(0)),
        st.tuples(st.just("writeback"), st.integers(1, 200), st.integers(1, 400), st.just(0)),
        st.tuples(st.just("clean"), st.integers(1, 200), st.integers(30, 100), st.just(0)),
        st.tuples(st.just("compact"), st.integers(1, 12), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=16,
)


def _random_ops(rnd: random.Random, count: int) -> list[Op]:
    ops: list[Op] = []
    for _ in range(count):
        pick = rnd.random()
        if pick < 0.35:
            ops.append(("write", rnd.randrange(NPAGES), rnd.randrange(1, 9), rnd.randrange(10**6)))
        elif pick < 0.55:
            ops.append(("discard", rnd.randrange(NPAGES), rnd.randrange(1, 13), 0))
        elif pick < 0.75:
            ops.append(("writeback", rnd.randrange(1, 200), rnd.randrange(1, 400), 0))
        elif pick < 0.95:
            ops.append(("clean", rnd.randrange(1, 200), rnd.randrange(30, 101), 0))
        else:
            ops.append(("compact", rnd.randrange(1, 12), 0, 0))
    return ops


# -- the mechanism, both engines ------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_pages_spread_over_pool_and_file_read_back_through_cleaning(engine: str, files: Path) -> None:
    store, fd = _store(engine, files / "b.img")
    try:
        model = bytearray(SIZE)
        _prefix(store, model)
        c = store.c
        assert c.bd_count > NPAGES // 2 and c.bd_writes >= c.bd_count
        fig = store.engine.backing_figures()
        assert fig["live_bytes"] > 0 and fig["dead_bytes"] > 0 and fig["segments_used"] >= 3
        assert store.read(0, SIZE) == model
        assert c.bd_reads >= c.bd_count
        store.check_invariants()
        # Cleaning frees segments until every full one is at least 80% live.
        freed = 0
        while True:
            moved, f = store.engine.clean(64, 1 << 30, 80)
            freed += f
            if not moved and not f:
                break
        assert freed >= 1 and c.segments_cleaned == freed
        after = store.engine.backing_figures()
        assert after["live_bytes"] == fig["live_bytes"] and after["dead_bytes"] < fig["dead_bytes"]
        store.check_invariants()
        assert store.read(0, SIZE) == model
        # Rewrites and discards of backed pages leave dead bytes, never stale data.
        for op in _random_ops(random.Random(5), 60):
            _apply(store, op, model)
        store.check_invariants()
        assert store.read(0, SIZE) == model
        # Partial writes into backed pages read-modify-write from the file.
        store.engine.writeback(1000, 1 << 30)
        for i in range(1, NPAGES, 5):
            store.write(i * PAGE + 100, b"x" * 50)
            model[i * PAGE + 100 : i * PAGE + 150] = b"x" * 50
        assert store.read(0, SIZE) == model
        assert store.read(123, 9000) == model[123:9123]
        store.check_invariants()
    finally:
        store.close()
        os.close(fd)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_engines_leave_the_same_tables_and_file(seed: int, files: Path) -> None:
    """The native engine against the reference: the same calls leave the same
    persistent tables, the same file bytes and the same figures."""
    stores = {e: _store(e, files / f"{e}.img") for e in ENGINES}
    try:
        models = {e: bytearray(SIZE) for e in ENGINES}
        for e in ENGINES:
            _prefix(stores[e][0], models[e])
        ops = _random_ops(random.Random(seed), 120)
        for i, op in enumerate(ops):
            for e in ENGINES:
                _apply(stores[e][0], op, models[e])
            if i % 10 == 9 or op[0] in ("writeback", "clean"):
                py, nat = stores["python"][0], stores["native"][0]
                assert _tables(py) == _tables(nat), f"after op {i} {op}"
                assert _file_digest(files / "python.img") == _file_digest(files / "native.img"), f"after op {i} {op}"
                assert py.engine.backing_figures() == nat.engine.backing_figures()
                assert {k: getattr(py.c, k) for k in ("bd_count", "bd_writes", "segments_cleaned")} == {
                    k: getattr(nat.c, k) for k in ("bd_count", "bd_writes", "segments_cleaned")
                }
        for e in ENGINES:
            assert stores[e][0].read(0, SIZE) == models[e]
            stores[e][0].check_invariants()
    finally:
        for s, fd in stores.values():
            s.close()
            os.close(fd)


@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python")])
def test_state_and_file_written_by_one_engine_are_served_by_the_other(writer: str, reader: str, files: Path) -> None:
    path = files / "b.img"
    store, fd = _store(writer, path)
    model = bytearray(SIZE)
    _prefix(store, model)
    store.engine.clean(50, 1 << 30, 70)  # a victim half cleaned: rebuilt as full
    state = State.attach(store.state.fds())
    store.close()
    os.close(fd)
    other, fd2 = _store(reader, path, state=state)
    try:
        assert other.c.bd_count > 0
        assert other.read(0, SIZE) == model
        while other.engine.clean(64, 1 << 30, 70) != (0, 0):
            pass
        for op in _random_ops(random.Random(9), 40):
            _apply(other, op, model)
        other.check_invariants()
        assert other.read(0, SIZE) == model
    finally:
        other.close()
        os.close(fd2)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_full_file_stops_writeback_and_keeps_a_segment_for_cleaning(engine: str, files: Path) -> None:
    store, fd = _store(engine, files / "b.img", nseg=2)
    try:
        model = bytearray(SIZE)
        for i in range(0, NPAGES, 16):
            _apply(store, ("write", i, 16, i), model)
        total = 0
        while (moved := store.engine.writeback(200, 1 << 30)[0]) > 0:
            total += moved
        fig = store.engine.backing_figures()
        # One segment written, the other kept free: cleaning needs it.
        assert fig["segments_used"] == 1 and 0 < total < NPAGES
        assert store.read(0, SIZE) == model
        for i in range(NPAGES):
            if entry.backed(store.table[i]) and i % 2:
                _apply(store, ("discard", i, 1, 0), model)
        assert store.engine.clean(1000, 1 << 30, 90)[1] == 1  # moved into the reserve, the victim freed
        assert store.engine.writeback(200, 1 << 30)[0] > 0  # room again
        store.check_invariants()
        assert store.read(0, SIZE) == model
    finally:
        store.close()
        os.close(fd)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_write_loses_nothing_and_is_a_clear_error(engine: str, files: Path) -> None:
    path = files / "b.img"
    open_fd = open_backing_file(str(path), NSEG * SEG_SIZE)
    os.close(open_fd)
    ro = os.open(path, os.O_RDONLY | os.O_DIRECT)
    store = Store(SIZE, Codec("lz4"), reserve_frames=2, engine=engine)
    store.engine.attach_backing(ro, NSEG * SEG_SIZE)
    try:
        model = bytearray(SIZE)
        _apply(store, ("write", 0, 64, 11), model)
        with pytest.raises(OSError, match="Bad file descriptor|backing file"):
            store.engine.writeback(100, 1 << 30)
        assert store.c.bd_count == 0
        assert store.read(0, SIZE) == model
        store.check_invariants()
    finally:
        store.close()
        os.close(ro)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_smaller_file_than_the_state_names_is_refused(engine: str, files: Path) -> None:
    store, fd = _store(engine, files / "a.img")
    model = bytearray(SIZE)
    _prefix(store, model)
    state = State.attach(store.state.fds())
    store.close()
    os.close(fd)
    small = open_backing_file(str(files / "small.img"), 2 * SEG_SIZE)
    other = Store(SIZE, Codec("lz4"), reserve_frames=2, state=state, engine=engine)
    try:
        with pytest.raises(StateError, match="smaller than the one the state was written to"):
            other.engine.attach_backing(small, 2 * SEG_SIZE)
    finally:
        other.close()
        os.close(small)


# -- rebuild after corruption: both refuse alike ----------------------------------------


def _first_backed(store: Store) -> int:
    return next(i for i in range(NPAGES) if entry.backed(store.table[i]))


@pytest.mark.parametrize("what", ["past_fill", "free_segment", "bad_length", "beyond_table"])
def test_both_rebuilds_refuse_the_same_corrupt_backed_entry(what: str, files: Path) -> None:
    store, fd = _store("python", files / "a.img")
    model = bytearray(SIZE)
    _prefix(store, model)
    i = _first_backed(store)
    e = store.table[i]
    seg = entry.location(e) * backing.OBJ_ALIGN // SEG_SIZE
    if what == "past_fill":
        store.table[i] = (
            e & ~(entry.HANDLE_MASK << entry.HANDLE_SHIFT)
            | ((seg * SEG_SIZE + SEG_SIZE - 64) // 16) << entry.HANDLE_SHIFT
        )
    elif what == "free_segment":
        store.table[i] = entry.make_backed((NSEG - 1) * SEG_SIZE // 16 + 4, entry.kind(e), entry.algo(e), 100)
    elif what == "bad_length":
        store.table[i] = entry.make_backed(entry.location(e), 3, 0, 100)
    else:
        store.table[i] = entry.make_backed((1 << 31) - 1, entry.kind(e), entry.algo(e), 100)
    errors = []
    for eng in ENGINES:
        state = State.attach(store.state.fds())
        with pytest.raises(StateError) as err:
            Store(SIZE, Codec("lz4"), reserve_frames=2, state=state, engine=eng)
        errors.append(str(err.value))
        state.close()
    store.close()
    os.close(fd)
    assert errors[0] == errors[1]
    assert f"page {i}" in errors[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_both_checks_catch_wrong_live_bytes(engine: str, files: Path) -> None:
    store, fd = _store(engine, files / "a.img")
    try:
        model = bytearray(SIZE)
        _prefix(store, model)
        store.check_invariants()
        segs = store.state.view("segment")
        segs[0] += 16
        with pytest.raises(StateError, match=r"backing invariants broken: segment 0: live \d+, fill \d+, pages name"):
            store.check_invariants()
        segs[0] -= 16
        store.c.bd_count += 1
        with pytest.raises(StateError, match="bd_count"):
            store.check_invariants()
        store.c.bd_count -= 1
        store.check_invariants()
    finally:
        store.close()
        os.close(fd)


# -- crash at any step ------------------------------------------------------------------


def _crash_child(state: State, path: Path, ops: list[Op], crash_after: int) -> tuple[int, int]:
    """A child attaches ``state`` under a crash hook (Python engine: every
    table store and every file write is a crash point), runs ``ops`` and
    dies after ``crash_after`` steps.  Returns (ops started, exit code)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            hook = CrashHook()
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            store = Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds(), hook=hook))
            store.engine.attach_backing(fd, FILE_BYTES)
            hook.arm(crash_after)
            scratch = bytearray(SIZE)
            for i, op in enumerate(ops):
                os.write(w, bytes([i]))
                _apply(store, op, scratch)
        except BaseException:
            os.write(w, b"\xff" + traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    report = b""
    while chunk := os.read(r, 65536):
        report += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert b"\xff" not in report[: len(ops) + 1], report[report.index(b"\xff") :].decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CrashHook.EXIT_CODE), code
    return len(report), code


_PREFIX: dict[str, bytes] = {}


def _prefixed(d: Path) -> tuple[State, Path, bytearray]:
    """A state and file after _prefix (made once, copied per run)."""
    path = d / "b.img"
    if "file" not in _PREFIX:
        base = disk_dir()
        try:
            store, fd = _store("python", base / "p.img")
            model = bytearray(SIZE)
            _prefix(store, model)
            _PREFIX["file"] = (base / "p.img").read_bytes()
            _PREFIX["model"] = bytes(model)
            _PREFIX["meta"] = os.pread(store.state.fds()[0], os.fstat(store.state.fds()[0]).st_size, 0)
            _PREFIX["arena"] = os.pread(store.state.fds()[1], os.fstat(store.state.fds()[1]).st_size, 0)
            store.close()
            os.close(fd)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    fd = open_backing_file(str(path), FILE_BYTES)
    os.close(fd)
    with open(path, "r+b") as f:
        f.write(_PREFIX["file"])
    state = State.create(store_geometry(SIZE, 2), ALGORITHMS)
    for i, name in enumerate(("meta", "arena")):
        data = _PREFIX[name]
        sfd = state.fds()[i]
        for at in range(0, len(data), 1 << 20):
            chunk = data[at : at + (1 << 20)]
            if chunk.count(0) != len(chunk):
                os.pwrite(sfd, chunk, at)
    return state, path, bytearray(_PREFIX["model"])


def _crash_recovery(state: State, path: Path, recovery_crash: int) -> None:
    """A first recovery that dies ``recovery_crash`` stores into its rebuild
    (of the pool and of the segment table), as a worker killed while taking
    over would."""
    pid = os.fork()
    if pid == 0:
        hook = CrashHook()
        hook.arm(recovery_crash)
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            store = Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds(), hook=hook))
            store.engine.attach_backing(fd, FILE_BYTES)
            store.engine.clean(30, 1 << 30, 90)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, CrashHook.EXIT_CODE)


def _crash_run(
    d: Path, ops: list[Op], crash_after: int, reader: str = "python", recovery_crash: int | None = None
) -> str:
    """Returns the kind of op the child died in ("" if it did not)."""
    state, path, model = _prefixed(d)
    started, code = _crash_child(state, path, ops, crash_after)
    if recovery_crash is not None:
        _crash_recovery(state, path, recovery_crash)
    scratch = bytearray(model)
    for op in ops[: max(0, started - 1)]:
        _apply_model(op, scratch)
    after = bytearray(scratch)
    if started:
        _apply_model(ops[started - 1], after)
    if code != CrashHook.EXIT_CODE:
        scratch = after
    recovered, fd = _store(reader, path, state=state)
    try:
        got = recovered.read(0, SIZE)
        for i in range(NPAGES):
            page = got[i * PAGE : (i + 1) * PAGE]
            assert page in (scratch[i * PAGE : (i + 1) * PAGE], after[i * PAGE : (i + 1) * PAGE]), (
                f"page {i} after a crash at step {crash_after} in op {started - 1}"
            )
        recovered.check_invariants()
        # The rebuilt tables serve further writeback and cleaning.
        while recovered.engine.clean(100, 1 << 30, 80) != (0, 0):
            pass
        recovered.engine.writeback(100, 1 << 30)
        recovered.check_invariants()
        assert recovered.read(0, SIZE) == got
    finally:
        recovered.close()
        os.close(fd)
        state.close()
    return ops[started - 1][0] if code == CrashHook.EXIT_CODE and started else ""


def _apply_model(op: Op, model: bytearray) -> None:
    kind, a, b, seed = op
    if kind == "write":
        n = min(b, NPAGES - a)
        data = b"".join(content(seed + k) for k in range(n))
        model[a * PAGE : a * PAGE + len(data)] = data
    elif kind == "discard":
        n = min(b, NPAGES - a)
        model[a * PAGE : (a + n) * PAGE] = bytes(n * PAGE)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(ops=ops_strategy, crash_after=st.integers(0, 3000), recovery_crash=st.none() | st.integers(0, 400))
def test_crash_at_any_step_of_writeback_or_cleaning_loses_nothing(
    ops: list[Op], crash_after: int, recovery_crash: int | None, files: Path
) -> None:
    _crash_run(files, ops, crash_after, recovery_crash=recovery_crash)


def test_crash_sweep_over_writeback_and_cleaning(files: Path) -> None:
    """One run of writeback, cleaning, rewrites and discards, killed at
    evenly spread steps; recovered by either engine (the native rebuild of
    the segment table from a crashed state too)."""
    ops: list[Op] = [("clean", 300, 90, 0), ("writeback", 150, 300, 0), ("write", 10, 8, 77), ("clean", 40, 100, 0)]
    ops += _random_ops(random.Random(21), 10) + [("writeback", 200, 400, 0), ("clean", 300, 100, 0)]
    state, path, _ = _prefixed(files)
    hook = CrashHook()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    store = Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds(), hook=hook))
    store.engine.attach_backing(fd, FILE_BYTES)
    hook.arm(1 << 40)
    scratch = bytearray(SIZE)
    for op in ops:
        _apply(store, op, scratch)
    steps = (1 << 40) - hook.left
    assert store.c.segments_cleaned >= 1 and store.c.bd_writes > 0
    store.close()
    os.close(fd)
    state.close()
    assert steps > 200
    stride = max(1, steps // 120)
    died_in: dict[str, int] = {}
    for i, n in enumerate(range(0, steps + 2, stride)):
        kind = _crash_run(files, ops, n, ENGINES[i % 2], recovery_crash=n % 97 if i % 3 == 0 else None)
        died_in[kind] = died_in.get(kind, 0) + 1
    # The sweep did kill the child inside both kinds of step.
    assert died_in.get("writeback", 0) >= 5 and died_in.get("clean", 0) >= 5, died_in


# -- threads (native) -------------------------------------------------------------------------


def test_native_reads_while_writeback_cleaning_and_rewrites_run(files: Path) -> None:
    """Reader threads read stable pages (many in the file, moved by cleaning
    under them) while a writer rewrites and discards other pages and a
    background thread writes back and cleans: every read is right."""
    store, fd = _store("native", files / "b.img")
    try:
        model = bytearray(SIZE)
        _prefix(store, model)
        stable = [i for i in range(NPAGES) if i % 4 == 0]
        busy = [i for i in range(NPAGES) if i % 4]
        stop = threading.Event()
        errors: list[str] = []

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            out = bytearray(PAGE)
            while not stop.is_set():
                i = rnd.choice(stable)
                store.engine.readinto(i * PAGE, memoryview(out))
                if out != model[i * PAGE : (i + 1) * PAGE]:
                    errors.append(f"page {i}")
                    stop.set()

        def background() -> None:
            while not stop.is_set():
                store.engine.writeback(64, 1 << 30)
                store.engine.clean(64, 1 << 30, 90)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        threads.append(threading.Thread(target=background))
        for t in threads:
            t.start()
        rnd = random.Random(3)
        try:
            for step in range(1500):
                i = rnd.choice(busy)
                if step % 3:
                    data = content(step)
                    store.engine.write(i * PAGE, data)
                    model[i * PAGE : (i + 1) * PAGE] = data
                else:
                    store.engine.discard_pages(i, i + 1)
                    model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        assert store.c.segments_cleaned > 0
        assert store.read(0, SIZE) == model
        store.check_invariants()
    finally:
        store.close()
        os.close(fd)


# -- where a backing file may live --------------------------------------------------------------


def test_a_backing_file_in_memory_is_refused_and_not_left_behind() -> None:
    for d in ("/dev/shm", "/run"):
        fd = os.open(d, os.O_RDONLY)
        tmpfs = backing.fs_type(fd) == 0x01021994
        os.close(fd)
        if tmpfs:
            path = f"{d}/zswapd-test-backing-{os.getpid()}.img"
            with pytest.raises(BadRequest, match="is on tmpfs, whose pages live in memory"):
                open_backing_file(path, 2 * SEG_SIZE)
            assert not os.path.exists(path)
            return
    pytest.fail("no tmpfs to test with (/dev/shm or /run)")


@pytest.mark.root
def test_a_loop_device_is_followed_to_its_file(files: Path) -> None:
    """A filesystem on a loop device is as good as the loop's file: refused
    when that is in memory, taken when it is on a disk; and a disk too
    small for the size is a clear error at start."""
    cases = [("/dev/shm", "is on /dev/loop"), (str(files), "cannot allocate")]
    for where, error in cases:
        image = Path(where) / f"zswapd-test-loop-{os.getpid()}.img"
        mnt = files / "mnt"
        mnt.mkdir(exist_ok=True)
        loop = ""
        try:
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
            loop = subprocess.run(
                ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
            ).stdout.strip()
            subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)
            with pytest.raises(BadRequest, match=error):
                open_backing_file(str(mnt / "b.img"), 64 << 20)  # more than the 16 MiB filesystem
            fd = open_backing_file(str(mnt / "b.img"), 2 * SEG_SIZE) if where != "/dev/shm" else -1
            if fd >= 0:
                os.close(fd)
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            if loop:
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            image.unlink(missing_ok=True)


def test_bad_sizes_and_paths_are_clear_errors(files: Path) -> None:
    with pytest.raises(BadRequest, match=r"multiple of the block size \(4096 bytes\) of at least two segments"):
        open_backing_file(str(files / "x.img"), 1000 * 4096 + 100)
    with pytest.raises(BadRequest, match="at least two segments"):
        open_backing_file(str(files / "x.img"), SEG_SIZE)
    with pytest.raises(BadRequest, match="32 GiB"):
        open_backing_file(str(files / "x.img"), 64 << 30)
    with pytest.raises(BadRequest, match="cannot open it O_DIRECT"):
        open_backing_file(str(files / "no" / "such" / "x.img"), 2 * SEG_SIZE)
    os.mkdir(files / "dir.img")
    with pytest.raises(BadRequest, match="cannot open it O_DIRECT for writing: Is a directory"):
        open_backing_file(str(files / "dir.img"), 2 * SEG_SIZE)


# -- the store's ladder before full ------------------------------------------------------------


def _compressible(i: int) -> bytes:
    rnd = random.Random(i)
    n = rnd.randrange(900, 2400)
    return rnd.randbytes(n) + bytes(PAGE - n)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_ladder_writes_back_before_full_and_full_comes_with_the_file(engine: str, files: Path) -> None:
    """More than twice the pool's limit of data: writes go on (pages to the
    file) until the file cannot take more; then, and only then, full."""
    limit = 64 * PAGE
    npages = 1024
    store = Store(npages * PAGE, Codec("lz4"), memory_limit=limit, reserve_frames=2, engine=engine)
    fd = open_backing_file(str(files / "b.img"), 2 * SEG_SIZE)
    store.attach_backing(fd, 2 * SEG_SIZE, str(files / "b.img"))
    try:
        model = bytearray(npages * PAGE)
        written = 0
        for i in range(npages):
            data = _compressible(i)
            try:
                store.write(i * PAGE, data)
            except Exception:
                break
            model[i * PAGE : (i + 1) * PAGE] = data
            written += 1
        assert written * PAGE > 2 * limit, written  # far beyond the pool alone
        assert store.mem_used_total <= limit
        assert store.c.bd_count > 0 and store.backing_full()
        assert written < npages and store.full  # full came with the file full
        assert store.read(0, npages * PAGE) == model
        st = store.stats()["writeback"]
        assert isinstance(st, dict) and st["live_bytes"] > 0 and st["written_today"] > 0
        # Discards leave dead bytes that cleaning frees; writes go on.
        for i in range(0, written, 2):
            store.discard(i * PAGE, PAGE)
            model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
        for i in range(0, written // 2, 2):
            data = _compressible(10_000 + i)
            store.write(i * PAGE, data)
            model[i * PAGE : (i + 1) * PAGE] = data
        assert store.c.segments_cleaned > 0
        assert store.read(0, npages * PAGE) == model
        store.check_invariants()
    finally:
        store.close()
        os.close(fd)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_daily_limit_holds_and_full_comes_when_it_is_spent(engine: str, files: Path) -> None:
    limit = 64 * PAGE
    day_limit = 150_000
    store = Store(SIZE, Codec("lz4"), memory_limit=limit, reserve_frames=2, engine=engine)
    fd = open_backing_file(str(files / "b.img"), NSEG * SEG_SIZE)
    store.attach_backing(fd, NSEG * SEG_SIZE, str(files / "b.img"), daily_limit=day_limit)
    now = [1_000_000.0]
    store.clock = lambda: now[0]
    try:
        model = bytearray(SIZE)
        i = 0
        with pytest.raises(Exception, match="full"):
            for i in range(NPAGES):  # noqa: B007
                data = _compressible(i)
                store.write(i * PAGE, data)
                model[i * PAGE : (i + 1) * PAGE] = data
        assert 0 < store.written_today <= day_limit
        assert day_limit - store.written_today < backing.MAX_SPAN  # spent, to the last object that fitted
        assert not store.backing_full()  # the file had room: the limit made it full
        assert store.read(0, SIZE) == model
        # The next day, the ladder writes back again.
        now[0] += 86400
        data = _compressible(i)
        store.write(i * PAGE, data)
        model[i * PAGE : (i + 1) * PAGE] = data
        assert 0 < store.written_today <= day_limit
        assert store.read(0, SIZE) == model
        # The meter is in the state: a takeover goes on counting.
        state = State.attach(store.state.fds())
        assert state.load_writeback_day() == (store.wb_day, store.written_today)
        state.close()
    finally:
        store.close()
        os.close(fd)


# -- with the recompression tier -----------------------------------------------------------------


def _word_pages(n: int) -> list[bytes]:
    rnd = random.Random(4)
    vocab = [rnd.randbytes(rnd.randrange(3, 12)) for _ in range(400)]
    return [b" ".join(rnd.choice(vocab) for _ in range(PAGE))[:PAGE] for _ in range(n)]


@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python"), ("native", "native")])
def test_recompressed_pages_written_back_keep_their_dictionary(writer: str, reader: str, files: Path) -> None:
    """Pages recompressed with a dictionary, then written back: read back
    through the dictionary, counted as its references (it cannot be dropped
    under them), across a takeover by either engine; recompression leaves
    backed pages alone; oldest pages go first."""
    npages = 700
    pages = _word_pages(npages)
    s = Store(1024 * PAGE, Codec("lz4"), reserve_frames=2, engine=writer)
    fd = open_backing_file(str(files / "b.img"), 8 * SEG_SIZE)
    s.attach_backing(fd, 8 * SEG_SIZE, "b.img")
    try:
        s.tick(0.0)
        for i in range(0, npages // 2):
            s.write(i * PAGE, pages[i])
        s.tick(3600.0)  # the second half an hour younger
        for i in range(npages // 2, npages):
            s.write(i * PAGE, pages[i])
        slot = s.install_dictionary(s.engine.train(s.training_samples(0, 600), 16 << 10))
        assert s.recompress(0)["pages"] > 600
        # Oldest first: the older half goes before any of the younger.
        moved, _ = s.writeback(200, idle_ticks=30)
        assert moved == 200 and all(entry.backed(s.table[i]) == (i < 200) for i in range(npages)), moved
        while s.writeback(256)[0]:
            pass
        assert s.c.bd_count == npages
        named = [i for i in range(npages) if entry.tier(s.table[i]) == slot]
        assert len(named) > 600 and all(entry.backed(s.table[i]) for i in named)
        assert [d[3] for d in s.engine.dictionaries()] == [len(named)]
        with pytest.raises(ValueError):
            s.engine.drop_dictionary(slot)
        assert s.recompress(0)["candidates"] == 0  # nothing in the pool to recompress
        assert s.read(0, npages * PAGE) == b"".join(pages)
        s.check_invariants()
        state = State.attach(s.state.fds())
    finally:
        s.close()
    other = Store(1024 * PAGE, Codec("lz4"), reserve_frames=2, state=state, engine=reader)
    other.attach_backing(fd, 8 * SEG_SIZE)
    try:
        assert [d[3] for d in other.engine.dictionaries()] == [len(named)]
        assert other.read(0, npages * PAGE) == b"".join(pages)
        other.discard(0, npages * PAGE)
        assert [d[3] for d in other.engine.dictionaries()] == [0]
        other.engine.drop_dictionary(slot)
        while other.clean(256, percent=100) != (0, 0):
            pass
        assert other.engine.backing_figures()["segments_used"] == 0
        other.check_invariants()
    finally:
        other.close()
        os.close(fd)
