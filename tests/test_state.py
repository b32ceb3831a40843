"""State in memfds: layout checks, punching frames, measured metadata, and
recovery after the process that wrote it died at any point."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import rss_kib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zswapd import libc
from zswapd.codec import ALGORITHMS, Codec
from zswapd.engine import COUNTER_NAMES
from zswapd.pool import CLASSES, FRAME_SIZE, Pool
from zswapd.state import (
    COUNTER_SNAPSHOT,
    LAYOUT_VERSION,
    CrashHook,
    Geometry,
    InitParams,
    State,
    StateError,
)
from zswapd.store import Store, StoreError, store_geometry

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def content(seed: int) -> bytes:
    """Pages of every encoding and many object sizes: same-filled, a random
    prefix of 40..3900 bytes followed by zeros (compresses to about the
    prefix, so it lands in a wide range of classes, some straddling frames),
    words from a small random vocabulary (which recompression shrinks), or
    wholly random (stored raw)."""
    rnd = random.Random(seed)
    pick = seed % 7
    if pick == 0:
        return bytes([seed % 251 + 1]) * PAGE
    if pick == 6:
        return rnd.randbytes(PAGE)
    if pick == 5:  # words: zstd's entropy coding beats lz4, so recompression moves it
        words = [rnd.randbytes(rnd.randrange(2, 9)) for _ in range(rnd.randrange(8, 200))]
        text = b" ".join(rnd.choice(words) for _ in range(PAGE))
        return text[:PAGE]
    n = rnd.randrange(40, 3900)
    return rnd.randbytes(n) + bytes(PAGE - n)


# -- layout and attach -----------------------------------------------------------


def test_create_attach_roundtrip_and_header_fields() -> None:
    g = Geometry(100, 300, 164, 0x1234)
    a = State.create(g, ALGORITHMS)
    try:
        assert a.load_init() is None
        a.save_init(InitParams(38, 1 << 20, 0x1000, 1 << 40 | 0x4A, 256, 1))
        a.view("page")[7] = 0xDEADBEEF << 32 | 2
        a.save_counters({"num_reads": 5, "num_writes": 6, "failed_reads": 7})
        b = State.attach(a.fds())
        try:
            assert b.geometry == g
            assert b.algorithms() == ALGORITHMS
            assert b.load_init() == InitParams(38, 1 << 20, 0x1000, 1 << 40 | 0x4A, 256, 1)
            assert b.view("page")[7] == 0xDEADBEEF << 32 | 2
            assert b.load_counters() == {name: 0 for name in COUNTER_SNAPSHOT} | {
                "num_reads": 5,
                "num_writes": 6,
                "failed_reads": 7,
            }
            assert b.fds() != a.fds()  # attach duplicates: each side closes its own
        finally:
            b.close()
        assert a.view("page")[7] == 0xDEADBEEF << 32 | 2
    finally:
        a.close()


def test_entries_are_fixed_width() -> None:
    s = State.create(Geometry(16, 64, 16, 0))
    try:
        widths = {t.name: s.view(t.name).itemsize for t in s.tables}
        assert widths["page"] == widths["handle"] == 8
        assert widths["zs_first"] == widths["frame_next"] == widths["hot"] == 4
        assert all(t.fmt in "BHIQ" for t in s.tables)
    finally:
        s.close()


def _memfd(data: bytes, size: int) -> int:
    fd = os.memfd_create("test")
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    return fd


@pytest.mark.parametrize(
    "patch, message",
    [
        (lambda h: b"notzswap" + h[8:], "not a zswapd state"),
        (lambda h: h[:8] + (LAYOUT_VERSION + 1).to_bytes(4, "little") + h[12:], "layout version"),
        (lambda h: h[:16] + (8192).to_bytes(4, "little") + h[20:], "page/frame sizes"),
    ],
)
def test_attach_refuses_foreign_or_newer_state(patch: Callable[[bytes], bytes], message: str) -> None:
    s = State.create(Geometry(16, 64, 16, 0))
    try:
        meta, arena = s.fds()
        head = os.pread(meta, 4096, 0)
        bad = _memfd(patch(head), os.fstat(meta).st_size)
        try:
            with pytest.raises(StateError, match=message):
                State.attach((bad, arena))
        finally:
            os.close(bad)
    finally:
        s.close()


def test_attach_refuses_truncated_memfds_and_wrong_counts() -> None:
    s = State.create(Geometry(16, 64, 16, 0))
    try:
        meta, arena = s.fds()
        with pytest.raises(StateError, match="2 memfds"):
            State.attach((meta,))
        short = _memfd(os.pread(meta, 4096, 0), 4096)
        small_arena = _memfd(b"", 4096)
        tiny = _memfd(b"", 100)
        try:
            with pytest.raises(StateError, match="layout needs"):
                State.attach((short, arena))
            with pytest.raises(StateError, match="arena memfd is 4096 bytes"):
                State.attach((meta, small_arena))
            with pytest.raises(StateError, match="smaller than a header"):
                State.attach((tiny, arena))
        finally:
            for fd in (short, small_arena, tiny):
                os.close(fd)
    finally:
        s.close()


def test_memfds_are_sealed_once_sized() -> None:
    """No holder can shrink a state memfd (every mapping would SIGBUS on
    the pages cut off), grow it, or seal it against writes; punching a
    frame out still works."""
    s = State.create(Geometry(16, 64, 16, 0))
    try:
        for fd in s.fds():
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            assert seals == want, seals
            size = os.fstat(fd).st_size
            for bad in (size - 4096, size + 4096):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, bad)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            assert os.fstat(fd).st_size == size
        s.punch(1, 2)
    finally:
        s.close()


def test_store_refuses_a_state_of_another_device() -> None:
    state = State.create(store_geometry(64 * PAGE), ALGORITHMS)
    try:
        with pytest.raises(StoreError, match="64 pages, this store is 32 pages"):
            Store(32 * PAGE, state=state)
    finally:
        state.close()


# -- frames back to the kernel ---------------------------------------------------


def _fill_free_trim(reserve: int) -> dict[str, int]:
    pool = Pool(4096, 4096, reserve_frames=reserve)
    hs = [pool.store(bytes([7]) * FRAME_SIZE) for _ in range(2000)]
    for h in hs:
        pool.free(h, FRAME_SIZE)
    # A second mapping of the same memfds, touched, as the supervisor will
    # hold one (mlocked) for its whole life.
    other = State.attach(pool.state.fds())
    touched = sum(other.arena()[0][f * FRAME_SIZE] for f in range(2000))
    out = {"touched": touched, "rss_before": rss_kib(), "blocks_before": pool.state.arena_allocated_bytes()}
    out["trimmed"] = pool.trim()
    out["rss_after"] = rss_kib()
    out["blocks_after"] = pool.state.arena_allocated_bytes()
    # Punched frames read as zeros through either mapping and can be reused.
    out["zeros"] = int(bytes(other.arena()[0][: 2000 * FRAME_SIZE]).count(0) >= 1996 * FRAME_SIZE)
    h = pool.store(bytes([9]) * FRAME_SIZE)
    out["reused"] = int(bytes(pool.load(h, FRAME_SIZE)) == bytes([9]) * FRAME_SIZE)
    other.close()
    return out


def _check_trim(r: dict[str, int]) -> None:
    assert r["touched"] == 7 * 2000 and r["trimmed"] == 1996
    assert r["blocks_before"] >= 2000 * FRAME_SIZE
    assert r["blocks_before"] - r["blocks_after"] >= 1996 * FRAME_SIZE
    assert r["rss_before"] - r["rss_after"] >= 1996 * 4 * 0.8
    assert r["zeros"] and r["reused"]


def test_punched_frames_leave_the_memfd_and_rss() -> None:
    _check_trim(_fill_free_trim(reserve=4))


def _in_child(fn: Callable[[], dict[str, int]]) -> dict[str, int]:
    """Run ``fn`` in a forked child; return its result (or raise its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            out = json.dumps({"ok": fn()})
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    if "error" in result:
        raise AssertionError("child failed:\n" + result["error"])
    out: dict[str, int] = result["ok"]
    return out


def test_why_punch_and_not_madvise() -> None:
    """The facts the design rests on: MADV_DONTNEED on a MAP_SHARED memfd
    mapping frees nothing, and MADV_REMOVE is refused once it is locked."""
    import mmap

    fd = os.memfd_create("why")
    try:
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20, flags=mmap.MAP_SHARED)
        m[:] = b"\1" * (1 << 20)
        m.madvise(mmap.MADV_DONTNEED, 0, 1 << 20)
        assert os.fstat(fd).st_blocks * 512 >= 1 << 20
        assert m[5] == 1

        def locked_remove() -> dict[str, int]:
            libc.mlockall(libc.MCL_CURRENT | libc.MCL_FUTURE | libc.MCL_ONFAULT)
            try:
                m.madvise(mmap.MADV_REMOVE, 0, 4096)
            except OSError as e:
                return {"errno": e.errno or 0}
            return {"errno": 0}

        assert _in_child(locked_remove)["errno"] == 22  # EINVAL
        m.close()
    finally:
        os.close(fd)


def test_punch_works_under_mlockall_onfault() -> None:
    """Production runs under mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT),
    where MADV_DONTNEED fails and MADV_REMOVE is refused: punching still
    frees the frames, through two locked mappings."""

    def locked() -> dict[str, int]:
        libc.mlockall(libc.MCL_CURRENT | libc.MCL_FUTURE | libc.MCL_ONFAULT)
        out = _fill_free_trim(reserve=4)
        with open("/proc/self/status") as f:
            out["vmlck"] = int(next(line for line in f if line.startswith("VmLck:")).split()[1])
        return out

    r = _in_child(locked)
    assert r["vmlck"] > 0
    _check_trim(r)


# -- measured metadata -------------------------------------------------------------


@pytest.mark.parametrize("engine", ["python", "native"])
def test_metadata_bytes_is_what_is_resident(engine: str) -> None:
    size = 1 << 30  # a 2 MiB page table, of which a few pages get touched
    s = Store(size, engine=engine)
    try:
        base = s.metadata_bytes()
        assert base < 64 * 1024  # the header and little else: tables are lazy
        for i in range(0, 2000):
            s.write(i * 97 * PAGE, content(i + 1))
        used = s.metadata_bytes()
        # The page table costs the pages of it that were touched: not 8 bytes
        # per device page (2 MiB), nor 8 per stored page (16 KiB).
        touched = len({i * 97 * 8 // PAGE for i in range(2000)}) * PAGE
        assert s.state.resident_bytes(["page"]) == touched
        assert touched <= used - base <= touched + 256 * 1024
        assert s.metadata_bytes() == s.state.resident_bytes()
        assert s.pool.metadata_bytes() < used
    finally:
        s.close()


# -- attach and rebuild in a fresh process ---------------------------------------------

_ATTACH = """
import hashlib, json, sys
from zswapd.codec import Codec
from zswapd.state import State
from zswapd.store import Store
size, meta, arena = (int(x) for x in sys.argv[1:4])
store = Store(size, Codec("lz4"), reserve_frames=8, state=State.attach((meta, arena)), engine=sys.argv[4])
assert store.stats()["engine"] == sys.argv[4]
stats = store.stats()
pages = [hashlib.sha256(store.read(i * 4096, 4096)).hexdigest() for i in range(size // 4096)]
store.check_invariants()
print(json.dumps({"stats": stats, "pages": pages}))
"""


def _workload(store: Store, npages: int, seed: int) -> dict[int, bytes]:
    rnd = random.Random(seed)
    model = {i: bytes(PAGE) for i in range(npages)}
    for step in range(npages * 3):
        i = rnd.randrange(npages)
        if rnd.random() < 0.2:
            n = min(rnd.randrange(1, 8), npages - i)
            store.discard(i * PAGE, n * PAGE)
            for j in range(i, min(npages, i + n)):
                model[j] = bytes(PAGE)
        else:
            data = content(rnd.randrange(1 << 30))
            store.write(i * PAGE, data)
            model[i] = data
        if step % 500 == 0:
            store.compact(max_moves=rnd.randrange(1, 64))
    return model


# The differential case across processes: state written by one engine is
# attached, rebuilt and read back by the other.
@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python")])
def test_attach_in_a_fresh_process_reads_every_page_back(writer: str, reader: str) -> None:
    npages = 3000
    store = Store(npages * PAGE, Codec("lz4"), reserve_frames=8, engine=writer)
    try:
        model = _workload(store, npages, seed=3)
        before = store.stats()
        assert before["pages_stored"] and before["same_pages"] and before["huge_pages"]
        meta, arena = store.state.fds()
        out = subprocess.run(
            [sys.executable, "-c", _ATTACH, str(npages * PAGE), str(meta), str(arena), reader],
            cwd=ROOT, pass_fds=(meta, arena), capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        for i in range(npages):
            assert got["pages"][i] == hashlib.sha256(model[i]).hexdigest(), f"page {i}"
        after = got["stats"]
        for key in (
            "orig_data_size", "compr_data_size", "mem_used_total", "same_pages", "huge_pages", "pages_stored",
            "pages_compacted", "num_reads", "num_writes", "notify_free", "compactions", "mem_used_max",
            "freeable_bytes", "classes",
        ):  # fmt: skip
            assert after[key] == before[key], key
    finally:
        store.close()


# -- repairs and refusals ----------------------------------------------------------


@pytest.mark.parametrize("engine", ["python", "native"])
def test_rebuild_frees_orphans_and_check_catches_corruption(engine: str) -> None:
    size = 64 * PAGE
    store = Store(size, reserve_frames=0, engine=engine)
    try:
        for i in range(64):
            store.write(i * PAGE, content(i + 1))
        used = store.pool.frames_used
        # What a crash can leave: objects and word handles no page names.
        for i in range(30):  # the handle table has room for 64 more
            store.pool.store(content(i + 100)[:1500])
            store.pool.store_word(i)
        assert store.pool.frames_used > used
        again = Store(size, state=State.attach(store.state.fds()), engine=engine)
        assert again.pool.frames_used == used
        assert again.pool.handles_used == 64
        assert again.read(0, size) == b"".join(content(i + 1) for i in range(64))
        again.write(0, content(999))  # the rebuilt indexes work
        again.compact()
        again.check_invariants()
        again.close()

        table = store.state.view("page")
        table[5] = table[6]  # two pages naming one handle
        with pytest.raises(StateError, match="named by two pages"):
            Store(size, state=State.attach(store.state.fds()))
        table[5] = 0
        table[6] = table[6] ^ (1 << 33)  # a handle whose slot names another
        with pytest.raises(StateError, match=r"page 6: .*"):
            Store(size, state=State.attach(store.state.fds()))
    finally:
        store.close()


# -- the crash-point property ------------------------------------------------------

NPAGES = 64
SIZE = NPAGES * PAGE

Op = tuple[str, int, int, int]
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, NPAGES - 1), st.integers(1, 4), st.integers(0, 10**6)),
        st.tuples(st.just("unaligned"), st.integers(0, SIZE - 1), st.integers(1, 3 * PAGE), st.integers(0, 10**6)),
        st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(0, 6 * PAGE), st.just(0)),
        st.tuples(st.just("compact"), st.integers(1, 12), st.just(0), st.just(0)),
        st.tuples(st.just("recompress"), st.integers(1, 12), st.just(0), st.just(0)),
        st.tuples(st.just("dictionary"), st.integers(0, 10**6), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=20,
)


def _op_bytes(op: Op) -> tuple[int, bytes]:
    """The (offset, data) a write op writes; a discard writes zeros."""
    kind, a, b, seed = op
    if kind == "write":
        n = min(b, NPAGES - a)
        return a * PAGE, b"".join(content(seed + k) for k in range(n))
    if kind == "unaligned":
        n = min(b, SIZE - a)
        return a, b"".join(content(seed + k) for k in range(n // PAGE + 1))[:n]
    if kind == "discard":
        n = min(b, SIZE - a)
        return a, bytes(n)
    return 0, b""


def _apply(store: Store, op: Op) -> None:
    kind, a, _, _ = op
    if kind == "compact":
        store.compact(max_moves=a)
        return
    if kind == "recompress":
        # a low threshold, so that most candidates move
        store.recompress(0, threshold=16, max_pages=a)
        return
    if kind == "dictionary":
        # a raw-content dictionary of word pages: install it (dropping the
        # dictionaries no page names); the next recompressions use it
        store.install_dictionary(b"".join(content((a + k) * 7 + 5) for k in range(3)))
        return
    offset, data = _op_bytes(op)
    if kind == "discard":
        store.discard(offset, len(data))
    else:
        store.write(offset, data)


def _prefix(store: Store) -> bytearray:
    """A fragmented starting state, so compaction has work to do."""
    model = bytearray(SIZE)
    for i in range(NPAGES):
        # Three quarters in a narrow band of object sizes (one or two classes
        # of multi-frame zspages), the rest of every kind.
        if i < NPAGES * 3 // 4:
            n = 690 + i % 3 * 8
            data = random.Random(i).randbytes(n) + bytes(PAGE - n)
        else:
            data = content(i * 11 + 5)
        store.write(i * PAGE, data)
        model[i * PAGE : (i + 1) * PAGE] = data
    for i in range(NPAGES):
        if i % 3:
            store.discard(i * PAGE, PAGE)
            model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    return model


def _crash_child(state: State, ops: list[Op], crash_after: int) -> tuple[int, int]:
    """Fork a child that writes the prefix, then runs ``ops`` on ``state`` and
    dies after ``crash_after`` writes to the persistent state.  Returns
    (ops started, exit code)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            hook = CrashHook()
            store = Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds(), hook=hook))
            _prefix(store)
            hook.arm(crash_after)
            for i, op in enumerate(ops):
                os.write(w, bytes([i]))
                _apply(store, op)
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


def _crash_recovery(state: State, recovery_crash: int) -> None:
    """A first recovery that dies ``recovery_crash`` writes into its rebuild,
    as a worker killed while taking over would (Python engine: its stores
    are the crash points)."""
    pid = os.fork()
    if pid == 0:
        hook = CrashHook()
        hook.arm(recovery_crash)
        try:
            Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds(), hook=hook))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, CrashHook.EXIT_CODE)


def _crash_run(ops: list[Op], crash_after: int, recovery_crash: int | None = None) -> None:
    """Fork a child that runs ``ops`` and dies after ``crash_after`` writes
    to the persistent state; then recover and check every page.  With
    ``recovery_crash``, a first recovery dies that many writes into its
    rebuild."""
    state = State.create(store_geometry(SIZE, 2), ALGORITHMS)
    started, code = _crash_child(state, ops, crash_after)
    # The model before and after the op in progress (after = before when the
    # child finished every op).
    model = _prefix_model()
    for op in ops[: max(0, started - 1)]:
        offset, data = _op_bytes(op)
        model[offset : offset + len(data)] = data
    after = bytearray(model)
    if code == CrashHook.EXIT_CODE and started:
        offset, data = _op_bytes(ops[started - 1])
        after[offset : offset + len(data)] = data
    elif started:
        offset, data = _op_bytes(ops[-1])
        model[offset : offset + len(data)] = data
        after = bytearray(model)

    if recovery_crash is not None:
        _crash_recovery(state, recovery_crash)

    recovered = Store(SIZE, Codec("lz4"), reserve_frames=2, state=State.attach(state.fds()))
    try:
        got = recovered.read(0, SIZE)
        for i in range(NPAGES):
            page = got[i * PAGE : (i + 1) * PAGE]
            assert page in (model[i * PAGE : (i + 1) * PAGE], after[i * PAGE : (i + 1) * PAGE]), (
                f"page {i} after a crash at step {crash_after} in op {started - 1} {ops[started - 1]}"
            )
        # The rebuilt indexes serve further work correctly.
        recovered.write(0, content(123456))
        recovered.compact()
        recovered.check_invariants()
        assert recovered.read(0, PAGE) == content(123456)
        assert recovered.read(PAGE, SIZE - PAGE) == got[PAGE:]
    finally:
        recovered.close()
        state.close()


_PREFIX: bytes = b""


def _prefix_model() -> bytearray:
    global _PREFIX
    if not _PREFIX:
        s = Store(SIZE, Codec("lz4"), reserve_frames=2)
        _PREFIX = bytes(_prefix(s))
        s.close()
    return bytearray(_PREFIX)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, crash_after=st.integers(0, 600), recovery_crash=st.none() | st.integers(0, 120))
def test_crash_at_any_step_recovers_each_page_before_or_after(
    ops: list[Op], crash_after: int, recovery_crash: int | None
) -> None:
    _crash_run(ops, crash_after, recovery_crash)


def _random_ops(rnd: random.Random, count: int, cuts: tuple[float, float, float]) -> list[Op]:
    """``count`` ops: a write below cuts[0], an unaligned write below
    cuts[1], a discard below cuts[2], else a compaction, a recompression or
    a new dictionary."""
    ops: list[Op] = []
    for _ in range(count):
        pick = rnd.random()
        if pick < cuts[0]:
            ops.append(("write", rnd.randrange(NPAGES), rnd.randrange(1, 4), rnd.randrange(10**6)))
        elif pick < cuts[1]:
            ops.append(("unaligned", rnd.randrange(SIZE), rnd.randrange(1, 2 * PAGE), rnd.randrange(10**6)))
        elif pick < cuts[2]:
            ops.append(("discard", rnd.randrange(SIZE), rnd.randrange(6 * PAGE), 0))
        else:
            kind = rnd.choice(("compact", "recompress", "recompress", "dictionary"))
            ops.append((kind, rnd.randrange(1, 12), 0, 0))
    return ops


def test_crash_sweep_over_every_step_of_one_run() -> None:
    """One fixed run with writes, rewrites, discards, compaction and
    recompression, killed at hundreds of evenly spread steps from the first
    to the last."""
    ops = _random_ops(random.Random(25), 24, (0.45, 0.6, 0.8))
    # Count the steps of the whole run.
    hook = CrashHook()
    state = State.create(store_geometry(SIZE, 2), ALGORITHMS, hook=hook)
    store = Store(SIZE, Codec("lz4"), reserve_frames=2, state=state)
    _prefix(store)
    hook.arm(1 << 40)
    for op in ops:
        _apply(store, op)
    steps = (1 << 40) - hook.left
    moved = store.c.recompressed
    named = sum(1 for e in store.table.tolist() if 0 < e >> 17 & 7 < 7)
    store.close()
    assert steps > 300
    assert moved > 0 and named > 0, "the run recompresses pages with a dictionary: the sweep kills those steps too"
    stride = max(1, steps // 300)
    for n in range(0, steps + 2, stride):
        _crash_run(ops, n)


# -- the native rebuild against the Python reference ----------------------------------
#
# A new worker rebuilds the volatile indexes and checks the invariants before
# serving; the native engine does both in C.  Each state below is cloned
# twice and attached once by each engine: the rebuilt memfds must be equal
# byte for byte (volatile tables, slot headers rethreaded in the arena, holes
# punched), and so must the volatile scalars and every counter.  A state
# neither can repair must make both refuse.


def _data_ranges(fd: int) -> list[tuple[int, int]]:
    """[start, end) of the parts of a memfd that are not holes."""
    size = os.fstat(fd).st_size
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole))
        pos = hole
    return out


def _clone(state: State) -> State:
    """A copy of a state's memfds, holes kept."""
    new = State.create(state.geometry, state.algorithms())
    for src, dst in zip(state.fds(), new.fds()):
        for start, end in _data_ranges(src):
            os.pwrite(dst, os.pread(src, end - start, start), start)
    return new


def _image(state: State) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, fd in zip(("meta", "arena"), state.fds()):
        out[name] = hashlib.sha256(os.pread(fd, os.fstat(fd).st_size, 0)).hexdigest()
        out[name + " data"] = _data_ranges(fd)
    for t in state.tables:  # a readable name for the table that differs
        out[t.name] = hashlib.sha256(bytes(state.view(t.name))).hexdigest()
    return out


def _attach_each(state: State, size: int, reserve: int) -> tuple[Store | str, Store | str]:
    """Attach a clone of ``state`` with each engine: a Store, or the
    StateError's message."""
    out: list[Store | str] = []
    for engine in ("python", "native"):
        clone = _clone(state)
        try:
            out.append(Store(size, Codec("lz4"), reserve_frames=reserve, state=clone, engine=engine))
        except StateError as e:
            clone.close()
            out.append(str(e))
    return out[0], out[1]


def _rebuilt_alike(state: State, size: int, reserve: int) -> None:
    """Both engines rebuild ``state`` to the same bytes, scalars and
    counters, and read back the same device."""
    py, nat = _attach_each(state, size, reserve)
    assert isinstance(py, Store), py
    assert isinstance(nat, Store), nat
    try:
        assert (py.engine.name, nat.engine.name) == ("python", "native")
        assert _image(py.state) == _image(nat.state)
        assert py.engine.reference().volatile() == nat.engine.reference().volatile()
        for name in COUNTER_NAMES:
            assert getattr(py.c, name) == getattr(nat.c, name), name
        a, b = py.stats(), nat.stats()
        a.pop("engine"), b.pop("engine")
        assert a == b
        assert py.read(0, size) == nat.read(0, size)
    finally:
        py.close()
        nat.close()


@pytest.mark.parametrize("writer", ["python", "native"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_rebuild_equals_reference_after_random_workloads(writer: str, seed: int) -> None:
    npages = 1500
    store = Store(npages * PAGE, Codec("lz4"), reserve_frames=8, engine=writer)
    try:
        _workload(store, npages, seed)
        # some orphans, as a crash between allocation and the switch leaves
        for i in range(20):
            store.pool.store(content(seed * 100 + i)[:1200])
            store.pool.store_word(i)
        _rebuilt_alike(store.state, npages * PAGE, 8)
    finally:
        store.close()


def _differential_crash(ops: list[Op], crash_after: int, recovery_crash: int | None) -> None:
    state = State.create(store_geometry(SIZE, 2), ALGORITHMS)
    try:
        _crash_child(state, ops, crash_after)
        if recovery_crash is not None:
            _crash_recovery(state, recovery_crash)
        _rebuilt_alike(state, SIZE, 2)
    finally:
        state.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, crash_after=st.integers(0, 600), recovery_crash=st.none() | st.integers(0, 120))
def test_native_rebuild_equals_reference_after_a_crash(
    ops: list[Op], crash_after: int, recovery_crash: int | None
) -> None:
    _differential_crash(ops, crash_after, recovery_crash)


def test_native_rebuild_equals_reference_over_a_crash_sweep() -> None:
    ops = _random_ops(random.Random(21), 16, (0.4, 0.55, 0.75))
    for n in range(0, 400, 7):
        _differential_crash(ops, n, n % 37 if n % 3 == 0 else None)


def _valid_state(size: int) -> Store:
    """A Python-engine store with every kind of page, some compaction done,
    and zspages of several classes."""
    store = Store(size, Codec("lz4"), reserve_frames=2, engine="python")
    _workload(store, size // PAGE, 7)
    for i in range(size // PAGE):
        if not store.table[i] & 3:
            store.write(i * PAGE, content(i * 13 + 1))
    return store


def _first(store: Store, kind: int) -> int:
    """The first page of ``kind`` (1 same, 2 compressed, 3 huge)."""
    return next(i for i in range(store.npages) if store.table[i] & 3 == kind)


def _zspage_of(store: Store, page: int) -> int:
    zspage: int = store.state.view("handle")[store.table[page] >> 32] >> 16
    return zspage


def _slot_header_at(store: Store, page: int) -> int:
    """Word index in the arena of the slot header of a compressed page."""
    loc = store.state.view("handle")[store.table[page] >> 32]
    z, slot = loc >> 16, loc & 0xFFFF
    size = CLASSES[store.state.view("zs_class")[z]].size
    offset = slot * size
    frame = store.state.view("zs_first")[z]
    for _ in range(offset // FRAME_SIZE):
        frame = store.state.view("frame_next")[frame]
    return (frame * FRAME_SIZE + offset % FRAME_SIZE) // 4


def _corrupt_persistent(store: Store, what: str) -> None:
    v = store.state.view
    table = store.table
    comp = _first(store, 2)
    other = next(
        i
        for i in range(comp + 1, store.npages)
        if table[i] & 3 == 2 and _zspage_of(store, i) != _zspage_of(store, comp)
    )
    if what == "two pages, one handle":
        table[comp] = table[other]
    elif what == "slot header names another":
        table[comp] = table[comp] ^ (1 << 33)
    elif what == "unused entry bits":
        table[comp] = table[comp] | 1 << 63
    elif what == "tier on an lz4 object":
        table[comp] = table[comp] | 7 << 17
    elif what == "class out of range":
        v("zs_class")[_zspage_of(store, comp)] = 250
    elif what == "frame owned twice":
        v("zs_first")[_zspage_of(store, comp)] = v("zs_first")[_zspage_of(store, other)]
    elif what == "huge entry not huge":
        h = table[_first(store, 3)] >> 32
        v("handle")[h] = v("handle")[h] & ~(1 << 63)
    elif what == "owned slot header lost":
        store.state.arena()[1][_slot_header_at(store, comp)] = 0x80000000 | 0xFFFF
    elif what == "handle out of range":
        table[comp] = (table[comp] & 0xFFFFFFFF) | (store.engine.max_handles + 5) << 32
    elif what == "bad length for kind":
        table[comp] = (table[comp] & ~(0x1FFF << 4)) | 4096 << 4
    else:
        raise AssertionError(what)


PERSISTENT_CORRUPTIONS = [
    "two pages, one handle", "slot header names another", "unused entry bits", "class out of range",
    "frame owned twice", "huge entry not huge", "owned slot header lost", "handle out of range",
    "bad length for kind", "tier on an lz4 object",
]  # fmt: skip


@pytest.mark.parametrize("what", PERSISTENT_CORRUPTIONS)
def test_both_rebuilds_refuse_the_same_corrupt_state(what: str) -> None:
    size = 256 * PAGE
    store = _valid_state(size)
    try:
        _corrupt_persistent(store, what)
        py, nat = _attach_each(store.state, size, 2)
        for s in (py, nat):
            if isinstance(s, Store):
                s.close()
        assert isinstance(py, str) and isinstance(nat, str), (what, py, nat)
        assert py == nat  # the same message, whichever engine attached
    finally:
        store.close()


def _corrupt_volatile(store: Store, what: str) -> None:
    """Break one index after a good rebuild: only check_invariants can tell."""
    v = store.state.view
    comp = _first(store, 2)
    z = _zspage_of(store, comp)
    eng = store.engine
    vol = eng.reference().volatile()
    if what == "inuse":
        v("zs_inuse")[z] = v("zs_inuse")[z] + 1
    elif what == "group":
        v("zs_group")[z] = (v("zs_group")[z] + 1) % 12
    elif what == "free list reaches an owned slot":
        v("zs_free")[z] = store.state.view("handle")[store.table[comp] >> 32] & 0xFFFF
    elif what == "pages_stored":
        eng.c.pages_stored += 1
    elif what == "huge_pages":
        eng.c.huge_pages += 1
    elif what == "frame on the cold stack and owned":
        vol["cold_top"] += 1
        v("cold")[vol["cold_top"] - 1] = v("zs_first")[z]
        _set_volatile(store, vol)
    elif what == "handle on the free stack and owned":
        vol["handle_free_top"] += 1
        v("handle_stack")[vol["handle_free_top"] - 1] = store.table[comp] >> 32
        _set_volatile(store, vol)
    elif what == "handles_used":
        vol["handles_used"] += 1
        _set_volatile(store, vol)
    elif what == "obj_bytes":
        vol["obj_bytes"] += 16
        _set_volatile(store, vol)
    elif what == "class totals":
        vol["cls_used"][store.state.view("zs_class")[z]] += 1
        _set_volatile(store, vol)
    elif what == "list head":
        vol["heads"] = [0] * len(vol["heads"])
        _set_volatile(store, vol)
    elif what == "list loop":
        v("zs_next")[z] = z
    elif what == "frames_used":
        vol["frames_used"] -= 1
        _set_volatile(store, vol)
    else:
        raise AssertionError(what)


def _set_volatile(store: Store, vol: dict[str, object]) -> None:
    eng = store.engine
    if eng.name == "native":
        eng.adopt(_as_pool(store, vol))
    else:
        eng.reference().set_volatile(vol)


def _as_pool(store: Store, vol: dict[str, object]) -> Pool:
    pool = store.engine.reference()
    pool.set_volatile(vol)
    return pool


VOLATILE_CORRUPTIONS = [
    "inuse", "group", "free list reaches an owned slot", "pages_stored", "huge_pages",
    "frame on the cold stack and owned", "handle on the free stack and owned", "handles_used", "obj_bytes",
    "class totals", "list head", "list loop", "frames_used",
]  # fmt: skip


@pytest.mark.parametrize("what", VOLATILE_CORRUPTIONS)
def test_both_checks_catch_the_same_broken_index(what: str) -> None:
    size = 256 * PAGE
    store = _valid_state(size)
    try:
        py, nat = _attach_each(store.state, size, 2)
        assert isinstance(py, Store) and isinstance(nat, Store)
        try:
            for s in (py, nat):
                s.check_invariants()
                _corrupt_volatile(s, what)
                with pytest.raises(StateError):
                    s.check_invariants()
        finally:
            py.close()
            nat.close()
    finally:
        store.close()


def test_takeover_settings_come_from_the_header_and_a_damaged_one_is_ignored() -> None:
    from zswapd.worker import _settings_in_force

    state = State.create(store_geometry(256 * PAGE, 2), ALGORITHMS)
    try:
        # nothing saved yet: the configuration's
        assert _settings_in_force(state, "lz4", 3, 64 << 20, 90) == ("lz4", 3, 64 << 20, 90)
        state.save_codec(ALGORITHMS.index("zstd"), 5)
        state.save_settings(48 << 20, 80)
        assert _settings_in_force(state, "lz4", 3, 64 << 20, 90) == ("zstd", 5, 48 << 20, 80)
        # a value the schema refuses is ignored, the rest still kept
        state.save_codec(ALGORITHMS.index("zstd"), 99)
        state.save_settings(48 << 20, 0)
        assert _settings_in_force(state, "lz4", 3, 64 << 20, 90) == ("zstd", 3, 48 << 20, 90)
    finally:
        state.close()


def test_locked_mapping_locks_only_resident_pages() -> None:
    """The supervisor's mlock of the state (state_mlock.py, through
    libc.py's prototypes): the pages written are locked, the holes are not
    touched (mlock over a hole would allocate it)."""
    from zswapd.state_mlock import LockedMapping

    fd = os.memfd_create("zswapd-test-mlock")
    try:
        os.ftruncate(fd, 64 * 4096)
        os.pwrite(fd, b"x" * 3 * 4096, 8 * 4096)
        m = LockedMapping(fd)
        try:
            assert m.lock_resident() == 3
            assert os.fstat(fd).st_blocks * 512 == 3 * 4096  # the holes stayed holes
        finally:
            m.close()
        assert m.addr == 0 and m.lock_resident() == 0
    finally:
        os.close(fd)
