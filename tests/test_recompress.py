"""The recompression tier at the engine and store level, in both engines:
idle stamps, candidates biggest first, the keep rule, the tried bit, the
crash-safe switch (crash points in tests/test_state.py), and the native
engine against the Python reference byte for byte.

The two engines compress with different libzstd builds (python-zstandard
bundles its own; the C engine links the system's), so a page may compress
to other bytes, another length and another keep decision in each.  The
differential tests therefore hand the Python engine the C engine's
secondary codec (_engine.recompress_page, the exact function tier.c
calls): the decisions, tables and arena must then be equal byte for byte,
which checks everything the engines own (the scan, the keep rule, the
order of allocation, switch and free) without depending on the codec
library's version.  Round trips through each engine's own codec are
checked separately, by reading every page back."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from zswapd import entry
from zswapd.bench import sample_pages
from zswapd.codec import KIND_COMPRESSED, KIND_HUGE, Codec
from zswapd.engine import _engine
from zswapd.errors import DeviceFull
from zswapd.state import State, StateError
from zswapd.store import Store, StoreError

PAGE = 4096
ENGINES = ["python", "native"]


def _words(seed: int) -> bytes:
    """A page of words from a small vocabulary: lz4 gets about 2x, zstd at
    level 8 clearly more, so recompression keeps it."""
    rnd = random.Random(seed)
    vocab = [rnd.randbytes(rnd.randrange(2, 9)) for _ in range(rnd.randrange(16, 120))]
    return b" ".join(rnd.choice(vocab) for _ in range(PAGE))[:PAGE]


def _fill(store: Store, pages: list[bytes]) -> bytes:
    for i, p in enumerate(pages):
        store.write(i * PAGE, p)
    return b"".join(pages)


def _entries(store: Store) -> list[int]:
    return list(store.table.tolist())


@pytest.mark.parametrize("engine", ENGINES)
def test_idle_pages_are_recompressed_and_read_back(engine: str) -> None:
    pages = sample_pages(300) + [_words(i) for i in range(60)] + [random.Random(i).randbytes(PAGE) for i in range(8)]
    s = Store(512 * PAGE, Codec("lz4"), engine=engine)
    try:
        model = _fill(s, pages)
        before = s.stats()
        got = s.recompress(0)
        s.check_invariants()
        after = s.stats()
        assert got["pages"] > 200 and got["bytes_saved"] > 0
        assert after["recompress"]["pages"] == got["pages"] == after["recompressed"]
        assert after["recompress"]["bytes_saved"] == got["bytes_saved"]
        assert after["compr_data_size"] == before["compr_data_size"] - got["bytes_saved"]
        assert after["mem_used_total"] < before["mem_used_total"]
        # random pages stay huge and are marked tried, never compressed again
        assert after["recompress_incompressible"] >= 8
        assert s.read(0, len(model)) == model
        again = s.recompress(0)
        assert again["candidates"] == 0
        recompressed = [e for e in _entries(s) if entry.tier(e)]
        assert all(entry.tier(e) == entry.TIER_PLAIN and entry.algo(e) == 1 for e in recompressed)
        assert {c["tier"] for c in after["codecs"]} == {"primary", "recompressed"}
        # a recompressed page that is read stays recompressed; one written is primary again
        s.read(0, 10 * PAGE)
        assert sum(1 for e in _entries(s) if entry.tier(e)) == len(recompressed)
        rewritten = next(i for i, e in enumerate(_entries(s)) if entry.tier(e))
        s.write(rewritten * PAGE, pages[rewritten])
        e = s.table[rewritten]
        assert entry.tier(e) == 0 and entry.algo(e) == 0 and not entry.tried(e)
        s.check_invariants()
        assert s.read(0, len(model)) == model
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_idle_age_stamps_and_wraparound(engine: str) -> None:
    pages = [_words(i) for i in range(40)]
    s = Store(64 * PAGE, Codec("lz4"), engine=engine)
    try:
        s.engine.now_tick = 100
        model = _fill(s, pages)
        assert {entry.idle(e) for e in _entries(s)[:40]} == {100}
        s.engine.now_tick = 104
        assert s.recompress(5)["candidates"] == 0  # 4 ticks idle, 5 asked
        s.read(0, 10 * PAGE)  # pages 0-9 are used again at tick 104
        assert {entry.idle(e) for e in _entries(s)[:10]} == {104}
        s.engine.now_tick = 105
        got = s.recompress(5)
        assert got["candidates"] == 30  # 10..39
        assert all(entry.tier(e) == 0 and not entry.tried(e) for e in _entries(s)[:10])
        # ages past the clamp are clamped by the scan, so they never wrap to look fresh
        s.engine.now_tick = (105 + entry.IDLE_CLAMP + 500) & entry.IDLE_MASK
        s.recompress(entry.IDLE_CLAMP)
        assert {entry.age(e, s.engine.now_tick) for e in _entries(s)[:40]} == {entry.IDLE_CLAMP}
        assert all(entry.tier(e) for e in _entries(s)[:10])
        s.check_invariants()
        assert s.read(0, len(model)) == model
        # the census reports them in the oldest bucket
        idle = s.stats()["idle"]
        assert idle[-1]["pages"] == 0 and sum(b["pages"] for b in idle) == 40  # just read: all fresh again
    finally:
        s.close()


def _band(bands: list[tuple[int, int]], n: int) -> int | None:
    return next((i for i, (low, high) in enumerate(bands) if low <= n <= high), None)


@pytest.mark.parametrize("engine", ENGINES)
def test_biggest_objects_go_first_and_max_pages_bounds_a_pass(engine: str) -> None:
    pages = sample_pages(400) + [random.Random(i).randbytes(PAGE) for i in range(10)]
    s = Store(512 * PAGE, Codec("lz4"), engine=engine)
    try:
        _fill(s, pages)
        bands = s.recompress_bands(128)
        assert bands[0] == (PAGE, PAGE) and all(low > 128 for low, _ in bands)
        lengths = {i: entry.length(e) for i, e in enumerate(_entries(s)) if entry.kind(e) in (2, 3)}
        ranked = sorted((b, i) for i, n in lengths.items() if (b := _band(bands, n)) is not None)
        got = s.recompress(0, max_pages=50)
        assert got["candidates"] == 50
        taken = {i for i, e in enumerate(_entries(s)) if entry.tier(e) or entry.tried(e)}
        assert taken == {i for _, i in ranked[:50]}
    finally:
        s.close()


def _secondary(s: Store) -> object:
    """The engine's own secondary codec, as recompress_page(page, level, room)."""
    if s.engine.name == "python":
        return lambda page, level, room: s.engine._secondary(page, level, room, 0)  # type: ignore[attr-defined]
    return _engine.recompress_page


@pytest.mark.parametrize("engine", ENGINES)
def test_keep_rule_threshold_and_smaller_class(engine: str) -> None:
    """Kept exactly when the new object is ``threshold`` bytes smaller and
    in a smaller size class; otherwise tried (or incompressible)."""
    from zswapd.pool import _CLASS_OF, CLASSES, HEADER

    rnd = random.Random(3)
    # words shrink; random bytes followed by zeros do not shrink enough;
    # wholly random pages do not compress at all
    pages = [_words(i) for i in range(40)] + [rnd.randbytes(k) + bytes(PAGE - k) for k in range(400, 3400, 100)]
    pages += sample_pages(200) + [rnd.randbytes(PAGE) for i in range(5)]
    s = Store(512 * PAGE, Codec("lz4"), engine=engine)
    try:
        model = _fill(s, pages)
        old = _entries(s)
        threshold, room = 300, s.engine.huge_threshold - 1
        compress = _secondary(s)
        s.recompress(0, threshold=threshold, level=5)
        kept = skipped = incompressible = 0
        for i, (e0, e1) in enumerate(zip(old, _entries(s))):
            kind, n = entry.kind(e0), entry.length(e0)
            if kind not in (KIND_COMPRESSED, KIND_HUGE) or n <= threshold:
                assert e1 == e0
                continue
            out = compress(pages[i], 5, room)  # type: ignore[operator]
            m = len(out) if out else 0
            old_cls = len(CLASSES) if kind == KIND_HUGE else _CLASS_OF[n + HEADER]
            if m and m + threshold <= n and _CLASS_OF[m + HEADER] < old_cls:
                kept += 1
                assert entry.tier(e1) == entry.TIER_PLAIN and entry.length(e1) == m and not entry.tried(e1)
            else:
                assert e1 == e0 | entry.TRIED
                skipped += bool(m)
                incompressible += not m
        assert kept and skipped and incompressible
        assert (s.c.recompressed, s.c.recompress_skipped, s.c.recompress_incompressible) == (
            kept,
            skipped,
            incompressible,
        )
        with pytest.raises(StoreError, match="threshold must be in 0..4096"):
            s.recompress(0, threshold=5000)
        with pytest.raises(ValueError, match="zstd level 40 is outside"):
            s.recompress(0, level=40)
        s.check_invariants()
        assert s.read(0, len(model)) == model
    finally:
        s.close()


def _clone(state: State) -> State:
    new = State.create(state.geometry, state.algorithms())
    for src, dst in zip(state.fds(), new.fds()):
        size = os.fstat(src).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src, data, os.SEEK_HOLE)
            os.pwrite(dst, os.pread(src, hole - data, data), data)
            pos = hole
    return new


def _digest(store: Store) -> dict[str, str]:
    state = store.state
    out = {t.name: hashlib.sha256(bytes(state.view(t.name))).hexdigest() for t in state.tables}
    out["arena"] = hashlib.sha256(bytes(state.arena()[0])).hexdigest()
    return out


@pytest.mark.skipif(_engine is None, reason="the native engine is not built")
@pytest.mark.parametrize("seed", [1, 2])
def test_native_recompression_equals_the_reference_byte_for_byte(seed: int) -> None:
    """One state, cloned; each engine runs the same passes with the same
    secondary codec (the C one: see the top of this file).  Tables, arena,
    counters and stats must be equal."""
    rnd = random.Random(seed)
    corpus = sample_pages(300) + [_words(i) for i in range(100)] + [rnd.randbytes(PAGE) for i in range(10)]
    npages = 600
    base = Store(npages * PAGE, Codec("lz4"), reserve_frames=4, engine="native")
    try:
        model = bytearray(npages * PAGE)
        for step in range(1500):
            i = rnd.randrange(npages)
            page = corpus[rnd.randrange(len(corpus))]
            base.engine.now_tick = step // 100
            base.write(i * PAGE, page)
            model[i * PAGE : (i + 1) * PAGE] = page
            if step % 300 == 0:
                base.discard(rnd.randrange(npages) * PAGE, 3 * PAGE)
                model[:] = base.read(0, npages * PAGE)
        stores = []
        for engine in ENGINES:
            st = Store(npages * PAGE, Codec("lz4"), reserve_frames=4, state=_clone(base.state), engine=engine)
            st.engine.now_tick = 20
            if engine == "python":
                st.engine.recompress_page = _engine.recompress_page  # type: ignore[attr-defined]
            stores.append(st)
        try:
            results = []
            for st in stores:
                r = [st.recompress(8, max_pages=120), st.recompress(3, threshold=64, level=3)]
                st.discard(0, 50 * PAGE)
                r.append(st.recompress(0, threshold=1, level=12))
                st.compact()
                st.check_invariants()
                results.append(r)
            py, nat = stores
            assert results[0] == results[1]
            assert results[0][0]["pages"] > 0
            assert _digest(py) == _digest(nat)
            assert py.engine.reference().volatile() == nat.engine.reference().volatile()
            a, b = py.stats(), nat.stats()
            a.pop("engine"), b.pop("engine")
            assert a == b
            assert py.read(0, npages * PAGE) == nat.read(0, npages * PAGE) == bytes(50 * PAGE) + model[50 * PAGE :]
        finally:
            for st in stores:
                st.close()
    finally:
        base.close()


@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python")])
def test_takeover_keeps_stamps_and_tiers(writer: str, reader: str) -> None:
    pages = sample_pages(200) + [_words(i) for i in range(50)]
    a = Store(256 * PAGE, Codec("lz4"), engine=writer)
    a.engine.now_tick = 7
    model = _fill(a, pages)
    a.recompress(0, max_pages=100)
    entries = _entries(a)
    before = a.stats()
    b = Store(256 * PAGE, Codec("lz4"), state=State.attach(a.state.fds()), engine=reader)
    a.close()
    try:
        assert _entries(b) == entries  # stamps, tiers and tried bits as they were
        after = b.stats()
        for key in ("recompress", "codecs", "recompressed", "recompress_saved", "compr_data_size", "mem_used_total"):
            assert after[key] == before[key], key
        assert b.read(0, len(model)) == model
        b.engine.now_tick = 7
        b.recompress(0)
        b.check_invariants()
        assert b.read(0, len(model)) == model
    finally:
        b.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_rebuild_refuses_a_tier_on_a_page_that_cannot_have_one(engine: str) -> None:
    s = Store(16 * PAGE, Codec("lz4"), engine="python")
    try:
        s.write(0, _words(1))
        s.write(PAGE, random.Random(1).randbytes(PAGE))
        table = s.state.view("page")
        good = table[0], table[1]
        table[0] = good[0] | 3 << entry.TIER_SHIFT  # an lz4 object naming a dictionary
        with pytest.raises(StateError, match="names tier 3 but is not a zstd object"):
            Store(16 * PAGE, state=State.attach(s.state.fds()), engine=engine)
        table[0] = good[0]
        assert entry.kind(good[1]) == KIND_HUGE
        table[1] = good[1] | entry.TIER_PLAIN << entry.TIER_SHIFT
        with pytest.raises(StateError, match="is not a zstd object"):
            Store(16 * PAGE, state=State.attach(s.state.fds()), engine=engine)
        table[1] = good[1] | entry.BACKED  # bit 63: then its bits 32-62 must name an object in the backing file
        with pytest.raises(StateError, match="backed entry 0x[0-9a-f]+ points past what segment 0 holds"):
            Store(16 * PAGE, state=State.attach(s.state.fds()), engine=engine)
    finally:
        s.close()


# -- dictionaries ------------------------------------------------------------------


def _trained(s: Store, pages: int = 600) -> bytes:
    """A dictionary trained by the store's engine on its idle pages."""
    samples = s.training_samples(0, pages)
    assert len(samples) >= 100 * PAGE
    return s.engine.train(samples, 16 << 10)


def _word_corpus(n: int, seed: int = 0) -> list[bytes]:
    """Pages of words from one shared vocabulary: what a dictionary learns."""
    rnd = random.Random(seed)
    vocab = [rnd.randbytes(rnd.randrange(3, 12)) for _ in range(400)]
    return [b" ".join(rnd.choice(vocab) for _ in range(PAGE))[:PAGE] for _ in range(n)]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dictionary_beats_plain_zstd_and_lives_while_pages_name_it(engine: str) -> None:
    pages = _word_corpus(700)
    s = Store(1024 * PAGE, Codec("lz4"), engine=engine)
    try:
        model = _fill(s, pages)
        plain = Store(1024 * PAGE, Codec("lz4"), engine=engine)
        _fill(plain, pages)
        without = plain.recompress(0)["bytes_saved"]
        plain.close()

        slot = s.install_dictionary(_trained(s))
        assert s.dictionary_slot() == slot
        got = s.recompress(0)
        assert got["bytes_saved"] > without * 1.05, (got, without)  # the dictionary pays
        assert s.probe_base[0] > 0  # the retrain rule measured it
        named = sum(1 for e in _entries(s) if entry.tier(e) == slot)
        assert named == got["pages"] > 600
        [(slot_, id1, nbytes, refs)] = s.engine.dictionaries()
        assert (slot_, refs) == (slot, named) and nbytes <= 16 << 10
        st = s.stats()["recompress"]
        assert st["dictionaries"] == [{"id": id1, "bytes": nbytes, "pages": named, "current": True}]
        s.check_invariants()
        assert s.read(0, len(model)) == model

        # rewritten pages are primary again and no longer name it
        half = len(pages) // 2
        for i in range(half):
            s.write(i * PAGE, pages[i])
        named = sum(1 for e in _entries(s) if entry.tier(e) == slot)
        assert [d[3] for d in s.engine.dictionaries()] == [named]
        # a second dictionary: the first stays while pages name it
        slot2 = s.install_dictionary(_trained(s, 300))
        assert slot2 != slot and s.dictionary_slot() == slot2
        assert [d[0] for d in s.engine.dictionaries()] == sorted([slot, slot2])
        with pytest.raises(ValueError, match=f"slot {slot} is still named by {named} pages"):
            s.engine.drop_dictionary(slot)
        assert s.drop_unused_dictionaries() == 0
        # discarding its last pages releases it; then it is dropped
        s.discard(half * PAGE, (len(pages) - half) * PAGE)
        model = model[: half * PAGE] + bytes(len(model) - half * PAGE)
        s.check_invariants()
        assert [d[3] for d in s.engine.dictionaries() if d[0] == slot] == [0]
        assert s.drop_unused_dictionaries() == 1
        assert [d[0] for d in s.engine.dictionaries()] == [slot2]
        s.recompress(0)
        assert all(entry.tier(e) in (0, slot2) for e in _entries(s))
        s.check_invariants()
        assert s.read(0, len(model)) == model
        with pytest.raises(ValueError, match="holds no dictionary"):
            s.engine.drop_dictionary(slot)
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dropped_dictionary_gives_its_memory_back(engine: str) -> None:
    """Measured from what is resident (mincore of the state's dict_bytes):
    a dictionary's bytes stay resident while pages name it; once its last
    page is rewritten and it is dropped, they are punched out of the memfd;
    a takeover releases slots an older worker dropped but left resident."""
    pages = _word_corpus(500, seed=4)
    s = Store(512 * PAGE, Codec("lz4"), engine=engine)
    try:
        model = _fill(s, pages)
        resident = lambda: s.state.resident_bytes(["dict_bytes"])  # noqa: E731
        assert resident() == 0
        first = s.install_dictionary(_trained(s, 300))
        size = next(n for slot, _i, n, _r in s.engine.dictionaries() if slot == first)
        assert resident() >= size // PAGE * PAGE > 0
        s.recompress(0, max_pages=100)
        second = s.install_dictionary(_trained(s, 300))  # the current one now
        s.recompress(0, max_pages=100)
        both = resident()
        assert both >= 2 * (size // PAGE * PAGE)
        named = [i for i, e in enumerate(_entries(s)) if entry.tier(e) == first]
        assert named and s.drop_unused_dictionaries() == 0  # pages still name it
        assert resident() == both
        for i in named:
            s.write(i * PAGE, pages[i])
        assert s.drop_unused_dictionaries() == 1
        assert resident() <= both - size // PAGE * PAGE  # that slot's pages are gone
        assert [d[0] for d in s.engine.dictionaries()] == [second]
        assert s.read(0, len(model)) == model
        s.check_invariants()
        # a slot dropped (head zeroed) while its bytes stayed resident, as an
        # older worker left it: the next worker releases them
        heads = s.state.view("dict_head")
        third = s.install_dictionary(_trained(s, 300))
        heads[third] = 0  # dropped, by hand, without the release
        held = resident()
        b = Store(512 * PAGE, Codec("lz4"), state=State.attach(s.state.fds()), engine=engine)
        try:
            assert b.state.resident_bytes(["dict_bytes"]) < held
            assert b.read(0, len(model)) == model
        finally:
            b.close()
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_slots_run_out_and_bad_dictionaries_are_refused(engine: str) -> None:
    s = Store(64 * PAGE, Codec("lz4"), engine=engine)
    try:
        for i in range(entry.DICT_SLOTS):
            s.engine.add_dictionary(random.Random(i).randbytes(2048))
        with pytest.raises(ValueError, match=f"every dictionary slot \\({entry.DICT_SLOTS}\\) is in use"):
            s.engine.add_dictionary(b"x" * 2048)
        with pytest.raises(ValueError, match="a dictionary must be 1..262144 bytes"):
            s.engine.add_dictionary(b"")
        with pytest.raises(ValueError, match="dictionary slot 0 holds no dictionary"):
            s.engine.drop_dictionary(0)
        ids = [d[1] for d in s.engine.dictionaries()]
        assert ids == list(range(1, entry.DICT_SLOTS + 1))
        assert s.drop_unused_dictionaries() == entry.DICT_SLOTS - 1  # all but the newest
        s.engine.add_dictionary(b"y" * 4096)
        assert max(d[1] for d in s.engine.dictionaries()) == entry.DICT_SLOTS + 1
        with pytest.raises(ValueError, match="zstd could not train"):
            s.engine.train(bytes(PAGE) * 3, 16 << 10)
    finally:
        s.close()


@pytest.mark.skipif(_engine is None, reason="the native engine is not built")
def test_native_dictionary_recompression_equals_the_reference_byte_for_byte() -> None:
    pages = _word_corpus(500, seed=4) + sample_pages(100)
    base = Store(700 * PAGE, Codec("lz4"), reserve_frames=4, engine="native")
    try:
        _fill(base, pages)
        dictionary = _trained(base, 400)
        stores = []
        for engine in ENGINES:
            st = Store(700 * PAGE, Codec("lz4"), reserve_frames=4, state=_clone(base.state), engine=engine)
            if engine == "python":
                st.engine.recompress_page = _engine.recompress_page  # type: ignore[attr-defined]
            stores.append(st)
        try:
            results = []
            for st in stores:
                st.install_dictionary(dictionary)
                r = [st.recompress(0, max_pages=300)]
                st.discard(0, 40 * PAGE)
                st.install_dictionary(dictionary[: len(dictionary) // 2])
                r.append(st.recompress(0, threshold=32))
                r.append(st.drop_unused_dictionaries())
                r.append((st.probe_base, st.probe_recent))
                st.check_invariants()
                results.append(r)
            py, nat = stores
            assert results[0] == results[1]
            assert _digest(py) == _digest(nat)
            a, b = py.stats(), nat.stats()
            a.pop("engine"), b.pop("engine")
            assert a == b
            assert py.read(0, 700 * PAGE) == nat.read(0, 700 * PAGE)
        finally:
            for st in stores:
                st.close()
    finally:
        base.close()


@pytest.mark.parametrize(("writer", "reader"), [("python", "native"), ("native", "python")])
def test_takeover_keeps_dictionaries_and_their_pages(writer: str, reader: str) -> None:
    pages = _word_corpus(500, seed=2)
    a = Store(512 * PAGE, Codec("lz4"), engine=writer)
    model = _fill(a, pages)
    slot = a.install_dictionary(_trained(a, 400))
    a.recompress(0, max_pages=300)
    before = a.stats()
    b = Store(512 * PAGE, Codec("lz4"), state=State.attach(a.state.fds()), engine=reader)
    a.close()
    try:
        assert b.dictionary_slot() == slot
        after = b.stats()
        for key in ("recompress", "codecs", "compr_data_size", "mem_used_total"):
            if key == "recompress":
                before[key].pop("dictionary_gain"), after[key].pop("dictionary_gain")  # type: ignore[attr-defined]
            assert after[key] == before[key], key
        assert b.read(0, len(model)) == model
        b.recompress(0)
        b.check_invariants()
        assert b.read(0, len(model)) == model
    finally:
        b.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
@pytest.mark.parametrize("reader", ENGINES)
def test_a_corrupt_dictionary_at_takeover_costs_only_its_own_pages(reader: str, damage: str) -> None:
    """A dictionary whose bytes in the state zstd refuses (overwritten, or
    cut short by its head) at a takeover: the new worker serves, with no
    MemoryError or other exception; the pages recompressed with it read as
    corrupt objects (failed_reads: an I/O error, as any corrupt object);
    every other page, those of a sound older dictionary included, reads
    back byte for byte; the policy trains and uses a new dictionary; and
    the broken slot is dropped once its last page is rewritten."""
    from zswapd.errors import CorruptObject

    pages = _word_corpus(500, seed=2)
    a = Store(512 * PAGE, Codec("lz4"), engine="native")
    model = _fill(a, pages)
    good = a.install_dictionary(_trained(a, 300))
    a.recompress(0, max_pages=100)  # pages 0..99 with the sound dictionary
    bad = a.install_dictionary(_trained(a, 300))
    a.recompress(0, max_pages=150)  # the next 150 with the one we damage
    named = [i for i, e in enumerate(_entries(a)) if entry.tier(e) == bad]
    assert len(named) == 150 and any(entry.tier(e) == good for e in _entries(a))
    at = (bad - 1) * (256 << 10)
    heads = a.state.view("dict_head")
    if damage == "corrupt":
        a.state.view("dict_bytes")[at + 8 : at + 4096] = b"\xff" * 4088
    else:  # its head says fewer bytes than its entropy tables need
        heads[bad] = heads[bad] >> 32 << 32 | 64
    b = Store(512 * PAGE, Codec("lz4"), state=State.attach(a.state.fds()), engine=reader)
    a.close()
    try:
        assert b.engine.broken_dictionaries() == [bad]
        (problem,) = b.broken_dictionaries()
        assert f"slot {bad}" in problem and "150 pages" in problem and "every other page is served" in problem
        assert b.dictionary_slot() == good  # the newest one zstd loads
        for i, p in enumerate(pages):
            if i in named:
                with pytest.raises(CorruptObject):
                    b.read(i * PAGE, PAGE)
            else:
                assert b.read(i * PAGE, PAGE) == p, i
        assert b.c.failed_reads == len(named)
        b.check_invariants()
        # the policy goes on: a new dictionary, recompression with it
        new = b.install_dictionary(_trained(b, 200))
        assert new not in (good, bad) and b.dictionary_slot() == new
        assert b.recompress(0)["pages"] > 0
        # the broken slot goes with its last page
        for i in named:
            b.write(i * PAGE, pages[i])
        b.drop_unused_dictionaries()
        assert bad not in [d[0] for d in b.engine.dictionaries()] and b.engine.broken_dictionaries() == []
        assert b.read(0, len(model)) == model
        b.check_invariants()
    finally:
        b.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_rebuild_refuses_a_missing_dictionary_and_check_counts_references(engine: str) -> None:
    pages = _word_corpus(300, seed=5)
    s = Store(512 * PAGE, Codec("lz4"), engine="python")
    try:
        _fill(s, pages)
        slot = s.install_dictionary(_trained(s, 300))
        s.recompress(0)
        heads = s.state.view("dict_head")
        head = heads[slot]
        heads[slot] = 0
        with pytest.raises(StateError, match=f"names dictionary slot {slot}, which the state does not hold"):
            Store(512 * PAGE, state=State.attach(s.state.fds()), engine=engine)
        heads[slot] = 1 << 32 | (1 << 20)
        with pytest.raises(StateError, match=f"dictionary slot {slot} has a bad head"):
            Store(512 * PAGE, state=State.attach(s.state.fds()), engine=engine)
        heads[slot] = head
        again = Store(512 * PAGE, state=State.attach(s.state.fds()), engine=engine)
        try:
            again.check_invariants()
            refs = again.state.view("dict_refs")
            refs[slot] += 1
            with pytest.raises(StateError, match=f"dictionary slot {slot}: .* references counted"):
                again.check_invariants()
            refs[slot] -= 1
        finally:
            again.close()
    finally:
        s.close()


def test_recompress_settings_in_the_state_header_and_what_a_takeover_keeps(caplog: pytest.LogCaptureFixture) -> None:
    """The header keeps the policy's settings in force; a takeover keeps
    those that differ from the config, ignores (with a warning) a value the
    schema refuses, and an older state (none saved) gives the config's."""
    import logging

    from zswapd.config import RecompressConfig
    from zswapd.worker import _recompress_in_force

    caplog.set_level(logging.INFO, logger="zswapd")
    configured = RecompressConfig(idle_age=1800)
    s = Store(64 * PAGE, Codec("lz4"))
    try:
        assert s.state.load_recompress() is None
        assert _recompress_in_force(s.state, configured) == configured
        s.state.save_recompress(False, 7200, 10, 256, 2.5)
        assert s.state.load_recompress() == {
            "enable": False, "idle_age": 7200, "level": 10, "threshold": 256, "cpu_percent": 2.5,
        }  # fmt: skip
        b = State.attach(s.state.fds())
        try:
            got = _recompress_in_force(b, configured)
            assert (got.enable, got.idle_age, got.level, got.threshold, got.cpu_percent) == (False, 7200, 10, 256, 2.5)
            assert got.dictionary_size == configured.dictionary_size
            assert "[recompress] idle_age 7200 where the config says 1800" in caplog.text
            b.save_recompress(True, 7200, 99, 256, 2.5)  # a damaged level
            got = _recompress_in_force(b, configured)
            assert got.level == configured.level and got.idle_age == 7200
            assert "ignoring the state header: [recompress] level = 99" in caplog.text
        finally:
            b.close()
    finally:
        s.close()


# -- the policy and the control command ----------------------------------------------


def _policy(s: Store, **cfg: object) -> object:
    import dataclasses

    from zswapd.config import RecompressConfig
    from zswapd.recompress import Recompressor

    config = dataclasses.replace(RecompressConfig(), **cfg)  # type: ignore[arg-type]
    # The round's "now" is the tick the test set (s.engine.now_tick), not
    # CLOCK_MONOTONIC, whose tick depends on the machine's uptime.
    return Recompressor(
        s, lambda: config, lambda: 90, threaded=s.engine.name == "native",
        clock=lambda: s.engine.now_tick * entry.IDLE_TICK,
    )  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_the_policy_trains_recompresses_and_keeps_its_budget(engine: str) -> None:
    """A round trains a dictionary and recompresses; the pass sleeps so that
    its CPU (each step's, on the thread that ran it) is cpu_percent of the
    time it spans.  trio's mock clock advances only by those sleeps, so the
    virtual time a round took is exactly what the pacing asked for."""
    import trio
    import trio.testing

    pages = _word_corpus(1200, seed=9)
    s = Store(2048 * PAGE, Codec("lz4"), engine=engine)
    try:
        model = _fill(s, pages)
        rec = _policy(s, idle_age=0, cpu_percent=10.0, dictionary_size=16 << 10)
        spans: list[float] = []

        async def main() -> None:
            t = trio.current_time()
            await rec.round()  # type: ignore[attr-defined]
            spans.append(trio.current_time() - t)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        st = s.stats()["recompress"]
        assert st["trainings"] == 1 and st["pages"] > 1000 and st["dictionaries"], st  # type: ignore[index]
        cpu = s.c.recompress_cpu_us / 1e6
        assert cpu > 0
        # at 10%, the round spans 10 s for each CPU-second it spent (on the
        # mock clock a step takes no time, so its sleeps are the whole span)
        assert spans[0] == pytest.approx(cpu * 10, rel=0.05), (spans, cpu)
        s.check_invariants()
        assert s.read(0, len(model)) == model
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_refused_writes_make_the_policy_take_the_oldest_first_without_budget(engine: str) -> None:
    import trio
    import trio.testing

    pages = _word_corpus(400, seed=3)
    s = Store(512 * PAGE, Codec("lz4"), engine=engine)
    try:
        s.engine.now_tick = 10
        _fill(s, pages[:200])
        s.engine.now_tick = 50
        _fill(s, pages[:0])
        for i, p in enumerate(pages[200:], 200):
            s.write(i * PAGE, p)
        s.full = True  # writes refused: the ladder's rung
        rec = _policy(s, idle_age=3600, cpu_percent=1.0, dictionary_size=0)
        spans: list[float] = []

        async def main() -> None:
            t = trio.current_time()
            out = await rec.run_pass(0, 128, 8, max_pages=100, budget=not s.full, oldest_first=True)  # type: ignore[attr-defined]
            spans.append(trio.current_time() - t)
            assert out["candidates"] == 100

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert spans == [0.0]  # no budget while writes are refused
        taken = {i for i, e in enumerate(_entries(s)) if entry.tier(e) or entry.tried(e)}
        assert taken == set(range(100))  # the oldest (stamped at tick 10) first
    finally:
        s.close()


def test_control_recompress_is_root_only_and_answers_with_its_pass() -> None:
    import trio

    from zswapd.control import Controller

    s = Store(256 * PAGE, Codec("lz4"))
    try:
        model = _fill(s, _word_corpus(200, seed=1))
        c = Controller(s, lambda: {"path": "x"}, "<test>", group_gid=65534)

        def ask(line: bytes, uid: int = 0) -> dict[str, object]:
            async def go() -> dict[str, object]:
                return await c.handle(line, uid, 65534, [])

            return trio.run(go)

        assert ask(b'{"cmd": "recompress", "idle_age": 0}', uid=65534) == {
            "ok": False,
            "error": "permission denied: recompress needs root",
        }
        r = ask(b'{"cmd": "recompress", "idle_age": 0, "max_pages": 50}')
        assert r["ok"] and r["candidates"] == 50 and r["pages"] == s.stats()["recompress"]["pages"], r  # type: ignore[index]
        bad = ask(b'{"cmd": "recompress", "threshold": 5000}')
        assert bad == {
            "ok": False,
            "error": "<control>: [recompress] threshold = 5000: expected an integer from 0 to 4096",
        }
        assert ask(b'{"cmd": "recompress", "max_pages": -1}')["error"] == (
            "max_pages = -1: expected a non-negative integer"
        )
        assert "no recompression policy" in str(ask(b'{"cmd": "set", "key": "idle_age", "value": "2h"}')["error"])
        assert s.read(0, len(model)) == model
    finally:
        s.close()


@pytest.mark.skipif(_engine is None, reason="the native engine is not built")
def test_a_write_racing_the_step_is_never_undone_by_a_reused_handle() -> None:
    """The step compresses a copy of a page's object with no lock held, then
    switches the entry only if it is unchanged.  Two writes meanwhile can
    leave an equal entry naming another object: the first write's new
    object takes a fresh handle and frees the old one, the second takes
    that handle back (the handle stack is LIFO), and a huge page always has
    the same length, kind and, within a tick, stamp.  The switch must see
    that the object is not the one it compressed: a writer that reads each
    page back right after writing it must always get what it wrote.  Pages
    of random nibbles are huge for lz4 and halve with zstd, so every step
    that wins the race moves the page (zstd 19: long in C)."""
    import threading
    import time

    def nibbles(seed: int) -> bytes:
        rnd = random.Random(seed)
        return bytes(rnd.randrange(16) * 17 for _ in range(PAGE))

    pages = [nibbles(i) for i in range(64)]
    store = Store(16 * PAGE, Codec("lz4"), engine="native")
    store.engine.now_tick = 5
    store.write(0, pages[0])
    assert entry.kind(store.table[0]) == KIND_HUGE
    stop = threading.Event()
    moved = [0]

    def recompressor() -> None:
        while not stop.is_set():
            moved[0] += store.engine.recompress_step(0, 1, 1, PAGE, 0, 0, 19, 1)[1]

    t = threading.Thread(target=recompressor)
    t.start()
    lost: list[tuple[int, int | None]] = []
    try:
        deadline = time.monotonic() + 4
        i = 0
        while time.monotonic() < deadline and not lost:
            data = pages[i % len(pages)]
            store.write(0, data)
            got = store.read(0, PAGE)
            if got != data:
                lost.append((i % len(pages), pages.index(got) if got in pages else None))
            i += 1
    finally:
        stop.set()
        t.join()
    try:
        assert not lost, f"write {lost[0][0]} read back as the older page {lost[0][1]}"
        assert moved[0] > 0  # the step really raced the writes
        store.check_invariants()
    finally:
        store.close()


# -- the ladder: compaction, then recompression, then full ------------------------------


def _full_of_idle_pages(engine: str) -> tuple[Store, dict[int, bytes]]:
    return _full_of_idle_pages_of(engine, 96)


def _full_of_idle_pages_of(engine: str, frames: int) -> tuple[Store, dict[int, bytes]]:
    """A store whose memory limit (``frames``) its idle word pages (stamped
    long ago, compressible by recompression) fill: writes from now on find
    no room."""
    s = Store(1024 * PAGE, Codec("lz4"), memory_limit=frames * PAGE, engine=engine)
    s.engine.now_tick = 10
    model: dict[int, bytes] = {}
    for i, p in enumerate(_word_corpus(1024, seed=5)):
        try:
            s.write(i * PAGE, p)
        except DeviceFull:
            break
        model[i] = p
    s.full = False  # as after usage fell below the accept threshold
    s.engine.full = 0
    s.engine.now_tick = 200
    return s, model


@pytest.mark.parametrize("engine", ENGINES)
def test_a_write_that_finds_no_room_never_recompresses_on_its_thread(engine: str) -> None:
    """The thread that asks the store's policy where a write stopped is a
    serving one (a C FUSE thread, with the native engine): it may compact
    (no allocation), but recompressing there compresses at zstd level 8 on
    the serving path and allocates the thread's secondary zstd context (and
    the dictionary's CDict) exactly when memory is short.  The write is
    refused instead, and the policy's thread takes the rung (next test)."""
    import trio
    import trio.testing

    s, model = _full_of_idle_pages(engine)
    try:
        rec = _policy(s, idle_age=3600, dictionary_size=0)

        async def one_round() -> None:
            # configures the store as the daemon's policy does, and finds
            # nothing to do: every page is younger than the idle age
            await rec.round()  # type: ignore[attr-defined]

        s.engine.now_tick = 10
        trio.run(one_round, clock=trio.testing.MockClock(autojump_threshold=0))
        s.engine.now_tick = 200  # now they are old
        before = s.c.recompressed
        assert before == 0
        with pytest.raises(DeviceFull):
            for i in range(len(model), 1024):
                s.write(i * PAGE, _words(10_000 + i))
        assert s.c.recompressed == before, "the write path recompressed on the writing thread"
        assert s.full
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_refused_write_wakes_the_policy_for_the_ladder_at_once(engine: str) -> None:
    """Usage below the watermark at a round, then a burst of writes fills
    the store: the first refused write must bring the policy's pass (oldest
    first, no idle age, no budget) within PRESSED_INTERVAL, not at the end
    of a ten-second pause."""
    import time

    import trio
    import trio.testing

    from zswapd.recompress import PRESSED_INTERVAL, ROUND_INTERVAL

    pages = _word_corpus(400, seed=6)
    s = Store(1024 * PAGE, Codec("lz4"), memory_limit=1024 * PAGE, engine=engine)
    try:
        s.tick(time.monotonic())  # as the policy's rounds stamp: these pages are fresh
        model = bytearray(_fill(s, pages[:100]))
        rec = _policy(s, idle_age=3600, dictionary_size=0)
        passes: list[tuple[float, bool]] = []
        refused_at: list[float] = []
        run_pass, round_ = rec.run_pass, rec.round  # type: ignore[attr-defined]

        async def main() -> None:
            # Events, not the clock, order the test: with the native engine
            # the steps run on threads, and the mock clock jumps while trio
            # waits for them.
            first_round, second_pass = trio.Event(), trio.Event()

            async def watched_pass(*args: object, **kw: object) -> object:
                passes.append((trio.current_time(), bool(kw.get("oldest_first"))))
                n = len(passes)
                out = await run_pass(*args, **kw)
                if n == 2:
                    second_pass.set()
                return out

            async def watched_round() -> None:
                await round_()
                first_round.set()

            rec.run_pass, rec.round = watched_pass, watched_round  # type: ignore[attr-defined]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rec.run)  # type: ignore[attr-defined]
                await first_round.wait()
                assert passes == [(0.0, False)]  # a round, nothing idle, no pressure
                s.set_limit(24 * PAGE)  # e.g. `zswapd set memory_limit`, then a burst of writes
                with pytest.raises(DeviceFull):
                    for i, p in enumerate(pages[100:], 100):
                        s.write(i * PAGE, p)
                        model.extend(p)
                refused_at.append(trio.current_time())
                await second_pass.wait()
                nursery.cancel_scope.cancel()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        at, oldest_first = passes[1]
        assert oldest_first and at - refused_at[0] <= PRESSED_INTERVAL < ROUND_INTERVAL, (passes, refused_at)
        assert s.c.recompressed > 0
        assert s.read(0, len(model)) == model
        s.check_invariants()
    finally:
        s.close()


def _nibbles(seed: int) -> bytes:
    """A page of random nibbles: huge for lz4 (a frame each), about half a
    page with zstd, so a pool full of them can only shrink by recompression,
    into a class none of its pages uses yet."""
    return random.Random(seed).randbytes(PAGE).translate(bytes((b & 15) * 17 for b in range(256)))


def _at_the_limit(engine: str, frames: int = 48) -> tuple[Store, dict[int, bytes], int]:
    """A store at its memory limit, full of idle huge pages that zstd
    halves, and a write it refuses: (store, pages, the refused page's
    index).  No class but the huge one has a zspage: a move's new object
    needs frames first."""
    s = Store(256 * PAGE, Codec("lz4"), memory_limit=frames * PAGE, engine=engine)
    s.engine.now_tick = 10
    model: dict[int, bytes] = {}
    with pytest.raises(DeviceFull):
        for i in range(256):
            s.write(i * PAGE, _nibbles(i))
            model[i] = _nibbles(i)
    s.engine.now_tick = 200
    refused = len(model)
    with pytest.raises(DeviceFull):
        s.write(refused * PAGE, _nibbles(refused))  # the write refused
    assert s.full and s.frames_used == frames and all(entry.kind(s.table[i]) == KIND_HUGE for i in model)
    return s, model, refused


@pytest.mark.parametrize("engine", ENGINES)
def test_the_ladder_makes_room_at_the_limit_itself(engine: str) -> None:
    """Issue #19's ladder at the limit: compaction has nothing to free, a
    recompression pass without the move reserve moves nothing (its first
    new object needs a frame past the limit), and the policy's round (writes
    refused: oldest first, no budget, the reserve) recompresses every page,
    pays the reserve back by compacting, brings usage under the accept
    threshold, and the refused write then succeeds.  Usage never passed
    the limit by more than MOVE_RESERVE (mem_used_max); every page reads
    back byte for byte."""
    import trio
    import trio.testing

    from zswapd.pool import MOVE_RESERVE

    s, model, refused = _at_the_limit(engine)
    try:
        limit = s.memory_limit
        assert s.compact() == 0  # the first rung has nothing to give
        assert s.recompress(0)["pages"] == 0  # without the reserve: nothing moves
        assert s.frames_used * PAGE == s.c.mem_used_max == limit
        rec = _policy(s, idle_age=3600, dictionary_size=0)
        trio.run(rec.round, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[attr-defined]
        assert s.c.recompressed == len(model)
        assert limit < s.c.mem_used_max <= limit + MOVE_RESERVE * PAGE  # the reserve, and no more
        assert s.mem_used_total * 100 < limit * s.accept_percent and not s.full  # paid back, and more
        s.write(refused * PAGE, _nibbles(refused))  # the refused write, again: it fits
        model[refused] = _nibbles(refused)
        for i, p in model.items():
            assert s.read(i * PAGE, PAGE) == p, i
        s.check_invariants()
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_every_step_of_the_ladder_stays_within_the_move_reserve(engine: str) -> None:
    """The bound, step by step: a pass at the limit in steps of one page,
    usage after each (a step's peak: its new object is stored before the
    old one is freed) at most MOVE_RESERVE frames past the limit; the pass
    ends at or under the limit (paid back); a step asking for more than
    the reserve is refused."""
    from zswapd.pool import MOVE_RESERVE

    s, model, _ = _at_the_limit(engine, frames=40)
    try:
        limit_frames = s.memory_limit // PAGE
        peak = 0
        for _step in s.recompress_steps(0, step_pages=1, oldest_first=True, reserve=True):
            peak = max(peak, s.frames_used, s.c.mem_used_max // PAGE)
            assert s.frames_used <= limit_frames + MOVE_RESERVE
        assert limit_frames < peak <= limit_frames + MOVE_RESERVE
        assert s.frames_used <= limit_frames
        assert s.c.recompressed == len(model)
        with pytest.raises(ValueError, match="at most"):
            s.engine.recompress_step(0, 1, 1, PAGE, 0, 0, 8, 1, 0, MOVE_RESERVE + 1)
        for i, p in model.items():
            assert s.read(i * PAGE, PAGE) == p, i
        s.check_invariants()
    finally:
        s.close()


@pytest.mark.skipif(_engine is None, reason="the native engine is not built")
def test_native_ladder_at_the_limit_equals_the_reference_byte_for_byte() -> None:
    """The ladder's pass (reserve, pay-back compaction) in both engines on
    clones of one state at its limit, with the C secondary codec: tables,
    arena, counters and stats equal."""
    base, model, _ = _at_the_limit("native")
    try:
        stores = []
        for engine in ENGINES:
            st = Store(
                256 * PAGE, Codec("lz4"), memory_limit=base.memory_limit, state=_clone(base.state), engine=engine
            )
            st.engine.now_tick = 200
            st.full = True
            if engine == "python":
                st.engine.recompress_page = _engine.recompress_page  # type: ignore[attr-defined]
            stores.append(st)
        try:
            results = [list(st.recompress_steps(0, step_pages=4, oldest_first=True, reserve=True)) for st in stores]
            py, nat = stores
            assert results[0] == results[1] and py.c.recompressed == len(model)
            assert _digest(py) == _digest(nat)
            assert py.engine.reference().volatile() == nat.engine.reference().volatile()
            a, b = py.stats(), nat.stats()
            a.pop("engine"), b.pop("engine")
            assert a == b
            want = b"".join(model[i] for i in range(len(model)))
            assert py.read(0, len(want)) == nat.read(0, len(want)) == want
        finally:
            for st in stores:
                st.close()
    finally:
        base.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_retrain_with_every_slot_pinned_by_pages_leaves_the_policy_running(engine: str) -> None:
    """Each retraining takes a new slot, and a dictionary is freed only when
    its last page is rewritten or discarded; idle pages, the very ones it
    recompressed, can keep all six slots named for days.  The retrain rule
    then asks for a seventh: the policy must go on recompressing with the
    current dictionary and not train again for RETRAIN_BACKOFF (a CPU-second
    each time), instead of failing every round on the full slot table (the
    pass never ran, the training's CPU was spent and not paced)."""
    import time

    import trio
    import trio.testing

    from zswapd.recompress import RETRAIN_BACKOFF

    pages = _word_corpus(600, seed=8)
    s = Store(1024 * PAGE, Codec("lz4"), engine=engine)
    try:
        s.tick(time.monotonic())
        model = _fill(s, pages)
        for k in range(entry.DICT_SLOTS):  # six dictionaries, each named by pages
            s.install_dictionary(bytes([k + 1]) * 64 + b"".join(pages[k * 4 : k * 4 + 4]))
            assert s.recompress(0, threshold=16, max_pages=8)["pages"] > 0
        assert len(s.engine.dictionaries()) == entry.DICT_SLOTS
        assert all(refs for *_, refs in s.engine.dictionaries())
        s.probe_base, s.probe_recent = (32, 100_000, 50_000), (32, 100_000, 99_000)  # the gain fell: retrain
        assert s.retrain_wanted()
        rec = _policy(s, idle_age=0, dictionary_size=16 << 10, cpu_percent=100.0)
        before = s.c.recompressed

        async def main() -> None:
            await rec.round()  # type: ignore[attr-defined]
            assert rec.next_training >= trio.current_time() + RETRAIN_BACKOFF / 2  # type: ignore[attr-defined]

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert s.c.recompressed > before  # the round's pass ran, with the current dictionary
        assert len(s.engine.dictionaries()) == entry.DICT_SLOTS
        assert s.read(0, len(model)) == model
        s.check_invariants()
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_idle_stamps_do_not_wrap_while_recompression_is_off(engine: str) -> None:
    """Only a scan clamps a stamp older than IDLE_CLAMP (entry.py), and the
    scans were the recompression passes: with ``enable = false`` a page
    idle for 35 hours wrapped to look an hour old in the idle histogram
    (and to a pass enabled later).  The policy's rounds clamp while off."""
    import trio
    import trio.testing

    pages = [_words(i) for i in range(30)]
    s = Store(64 * PAGE, Codec("lz4"), engine=engine)
    try:
        s.engine.now_tick = 100
        model = _fill(s, pages)
        rec = _policy(s, enable=False)
        s.engine.now_tick = 100 + entry.IDLE_CLAMP + 100  # 18.7 hours later: a round while off

        async def one_round() -> None:
            await rec.round()  # type: ignore[attr-defined]

        trio.run(one_round, clock=trio.testing.MockClock(autojump_threshold=0))
        s.engine.now_tick = (100 + 2100) & entry.IDLE_MASK  # 35 hours after the writes
        assert s.stats()["idle"][-1]["pages"] == len(pages)  # all in the oldest bucket, none wrapped
        assert s.c.recompressed == 0 and all(not entry.tier(e) and not entry.tried(e) for e in _entries(s))
        assert s.read(0, len(model)) == model
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_zswapd_recompress_under_pressure_does_not_train(engine: str) -> None:
    """`zswapd recompress` trains a dictionary first if there is none, but a
    training takes 16 MiB of samples and zstd's trainer's own memory on top,
    locked in (mlockall): the policy never trains while usage is past the
    watermark, and neither may the command.  The pass itself runs."""
    import trio

    from zswapd.control import Controller

    s, model = _full_of_idle_pages_of(engine, 448)
    try:
        c = Controller(s, lambda: {"path": "x"}, "<test>")
        c.recompressor = _policy(s, idle_age=0, dictionary_size=16 << 10)  # type: ignore[assignment]
        assert c.recompressor.pressure()[0]  # type: ignore[attr-defined]
        assert len(s.training_samples(0)) >= 256 * PAGE  # enough to train on, were it allowed

        async def ask() -> dict[str, object]:
            return await c.handle(b'{"cmd": "recompress", "idle_age": 0, "max_pages": 64}', 0, 0, [])

        r = trio.run(ask)
        assert r["ok"] and r["candidates"] and r["dictionary"] is None, r
        assert s.c.dictionaries_trained == 0 and not s.engine.dictionaries()
        assert s.read(0, len(model) * PAGE) == b"".join(model[i] for i in range(len(model)))
    finally:
        s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dictionary_is_trained_when_idle_pages_come_a_few_at_a_time(engine: str) -> None:
    """Training samples idle pages; a round with fewer than TRAIN_MIN_PAGES
    of them skips training and its pass then recompresses those pages
    without a dictionary.  If only pages stored by a write were samples,
    pages going idle at a trickle (fewer per round than the minimum) would
    never add up and no dictionary would ever be trained: the ones the pass
    recompressed plainly are idle pages too, and must count."""
    import trio
    import trio.testing

    from zswapd.store import TRAIN_MIN_PAGES

    pages = _word_corpus(600, seed=11)
    per_round = TRAIN_MIN_PAGES // 3
    s = Store(1024 * PAGE, Codec("lz4"), engine=engine)
    try:
        rec = _policy(s, idle_age=60, dictionary_size=16 << 10, cpu_percent=100.0)
        written = 0
        tick = 100

        async def rounds() -> None:
            nonlocal written, tick
            for _ in range(6):
                for p in pages[written : written + per_round]:  # a batch written now...
                    s.engine.now_tick = tick
                    s.write(written * PAGE, p)
                    written += 1
                tick += 2  # ...idle by the next round
                s.engine.now_tick = tick
                s.tick = lambda _seconds: None  # type: ignore[method-assign]  # the test keeps the clock
                await rec.round()  # type: ignore[attr-defined]

        trio.run(rounds, clock=trio.testing.MockClock(autojump_threshold=0))
        r = s.stats()["recompress"]
        assert r["trainings"] == 1 and r["dictionaries"], r  # type: ignore[index]
        assert s.read(0, written * PAGE) == b"".join(pages[:written])
        s.check_invariants()
    finally:
        s.close()
