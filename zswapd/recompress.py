"""The recompression tier's policy: when to recompress idle pages, with which
dictionary, and how much CPU it may take (issue #19; docs/design.md,
"Recompression").  The mechanics are the store's and the engine's
(Store.recompress_steps, engine/tier.c); this module only decides and paces.

Glossary:

round       every ROUND_INTERVAL seconds (PRESSED_INTERVAL under pressure):
            tick the idle clock, train a dictionary if the retrain rule
            asks, run one pass, drop dictionaries no page names.  While
            ``enable`` is off, only the idle stamps' clamp, hourly.
pass        Store.recompress_steps: candidates idle at least ``idle_age``,
            biggest objects first; bounded steps.
budget      ``[recompress] cpu_percent`` of one core.  Each step and each
            training is timed with the CPU clock of the thread that ran it
            (time.thread_time, CLOCK_THREAD_CPUTIME_ID), and the policy then
            sleeps long enough for that CPU to be the budget's share of the
            time from the end of the last sleep to the end of this one.  The CPU is counted in stats (recompress
            cpu_seconds), so the budget can be checked from outside.
ladder      before the pool is full: compaction (housekeeping), then this
            policy's passes take the oldest pages first; while writes are
            refused (the store's ``full``) they ignore the budget and the
            idle age.  Their new objects may take pool.MOVE_RESERVE frames
            past the limit, which the pass pays back by compacting
            (Store.recompress_steps), so the ladder works at the limit
            itself.  A refused write wakes this task within
            PRESSED_INTERVAL: the write path itself never recompresses (it
            is a serving thread; Store.write_stopped).

Threads: with the native engine each step and each training runs on a trio
worker thread (the C engine releases the GIL; the steps take the engine's
locks as any request does), never on a FUSE serving thread.  The Python
engine is not thread safe, so its steps run on the trio thread between
requests, as compaction's do; training (a pure function of the samples)
still runs on a worker thread.  ``lock`` (a trio lock) makes a manual
``zswapd recompress`` and a round take turns; the store's tier lock
serialises them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from . import entry
from .codec import PAGE_SIZE
from .config import RecompressConfig
from .store import TRAIN_MIN_PAGES, TRAIN_PAGES, Store

log = logging.getLogger("zswapd")

# Seconds between rounds.  A round with nothing idle enough costs one scan
# of the page table per band (milliseconds for a million pages in C).
ROUND_INTERVAL = 10.0
# Between rounds while usage is over the compaction watermark or writes are
# refused, and how often a pause looks for that: the ladder's rung must not
# wait ten seconds.
PRESSED_INTERVAL = 0.5
# After zstd could not train on the samples, wait this long before trying
# again: training costs a CPU-second or more.  (Too few idle pages to train
# on costs only a sample, and is tried again at the next round.)
RETRAIN_BACKOFF = 600.0
# While recompression is off, how often a round still clamps the idle stamps
# (Store.clamp_idle): well within the 17 hours after which one would wrap.
CLAMP_INTERVAL = 3600.0

T = TypeVar("T")


def idle_ticks(seconds: int) -> int:
    """An idle age in whole stamp ticks, rounded up (a page must have been
    idle at least that long)."""
    return math.ceil(seconds / entry.IDLE_TICK)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and the CPU it took on the calling thread."""
    start = time.thread_time()
    out = fn()
    return out, time.thread_time() - start


class _Span:
    """The wall time since the last pause: a step's CPU is paid for by the
    time it spans, the step's own (and its hand-off to a thread) included."""

    def __init__(self) -> None:
        self.start = trio.current_time()

    def take(self) -> float:
        now = trio.current_time()
        elapsed, self.start = now - self.start, now
        return elapsed


class Recompressor:
    """The policy over one store.  ``config`` and ``watermark`` are read at
    every round (a reload or ``zswapd set`` applies at the next one)."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], RecompressConfig],
        watermark: Callable[[], int],
        threaded: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        # What each round stamps as "now" for the idle ages (CLOCK_MONOTONIC
        # in the daemon; a test's own clock, so ages do not depend on uptime).
        self.clock = clock
        self.config = config
        self.watermark = watermark
        self.threaded = threaded  # steps on worker threads (the native engine)
        self.lock = trio.Lock()
        self.next_training = 0.0  # trio time before which no training is tried
        self.next_clamp = 0.0  # trio time of the next clamp-only scan while off
        self.training = False  # a training is running (tests and `zswapd stats`)

    # -- pacing -------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T], threaded: bool) -> tuple[T, float]:
        if threaded:
            return await trio.to_thread.run_sync(_timed, fn)
        return _timed(fn)

    def _account(self, cpu: float) -> None:
        self.store.engine.count("recompress_cpu_us", max(0, round(cpu * 1e6)))

    async def _pace(self, cpu: float, budget: bool, span: _Span | None = None) -> None:
        """Sleep so that ``cpu`` is cpu_percent of the time it spans: the
        wall time ``span`` measured since the last pause (the step's own),
        then the sleep."""
        if not budget:
            await trio.sleep(0)  # requests in between
            if span is not None:
                span.take()
            return
        pct = self.config().cpu_percent
        spent = span.take() if span is not None else cpu
        await trio.sleep(max(0.0, cpu * 100.0 / pct - spent))
        if span is not None:
            span.take()

    # -- what a round does ------------------------------------------------------------

    def pressure(self) -> tuple[bool, bool]:
        """(over the watermark, writes refused)."""
        store = self.store
        limit = store.memory_limit
        over = bool(limit) and store.mem_used_total * 100 >= limit * self.watermark()
        return over or store.full, store.full

    async def run_pass(
        self,
        idle: int,
        threshold: int,
        level: int,
        max_pages: int | None = None,
        budget: bool = True,
        oldest_first: bool = False,
        reserve: bool = False,
    ) -> dict[str, Any]:
        """One pass in paced steps; holds ``lock``.  Returns its totals.
        ``reserve``: the ladder's (Store.recompress_steps)."""
        async with self.lock:
            store = self.store
            dictionary = self.config().dictionary_size > 0
            steps = store.recompress_steps(
                idle, threshold, level, max_pages, dictionary=dictionary, oldest_first=oldest_first, reserve=reserve
            )
            total = {"pages": 0, "bytes_saved": 0, "candidates": 0, "cpu_seconds": 0.0}
            span = _Span()
            try:
                while True:
                    step, cpu = await self._run(lambda: next(steps, None), self.threaded)
                    self._account(cpu)
                    total["cpu_seconds"] += cpu
                    if step is None:
                        break
                    pages, saved, looked = step
                    total["pages"] += pages
                    total["bytes_saved"] += saved
                    total["candidates"] += looked
                    # writes refused: the ladder's rung, as fast as it can go
                    await self._pace(cpu, budget and not store.full, span)
            finally:
                steps.close()
            # The zspages it left sparse are housekeeping's to compact.
            total["cpu_seconds"] = round(float(total["cpu_seconds"]), 6)
            return total

    async def train(self, idle: int, size: int, budget: bool = True) -> int | None:
        """Sample idle pages, train a dictionary of ``size`` bytes on them
        (off the trio thread) and install it.  The new dictionary's id, or
        None if there were too few idle pages, or if zstd could not train or
        every slot holds a dictionary that pages still name (then no
        training is tried for RETRAIN_BACKOFF seconds: the slots free up as
        those pages are rewritten or discarded)."""
        async with self.lock:
            store = self.store
            if not store.dictionary_slot_free():
                log.warning(
                    "recompression: every dictionary slot (%d) holds a dictionary that pages still use; "
                    "not training for %.0f s",
                    entry.DICT_SLOTS,
                    RETRAIN_BACKOFF,
                )
                self.next_training = trio.current_time() + RETRAIN_BACKOFF
                return None
            self.training = True
            span = _Span()
            try:
                samples, cpu = await self._run(lambda: store.training_samples(idle, TRAIN_PAGES), self.threaded)
                self._account(cpu)
                if len(samples) < TRAIN_MIN_PAGES * PAGE_SIZE:
                    log.debug(
                        "recompression: %d idle pages, too few to train a dictionary (%d needed)",
                        len(samples) // PAGE_SIZE,
                        TRAIN_MIN_PAGES,
                    )
                    return None
                log.info("recompression: training a %d-byte dictionary on %d pages", size, len(samples) // PAGE_SIZE)
                try:
                    data, cpu2 = await self._run(lambda: store.engine.train(samples, size), True)
                except ValueError as e:
                    log.warning("recompression: no dictionary: %s", e)
                    self.next_training = trio.current_time() + RETRAIN_BACKOFF
                    return None
                self._account(cpu2)
                slot = store.install_dictionary(data)
                store.engine.count("dictionaries_trained")
                new_id = next(i for s, i, _n, _r in store.engine.dictionaries() if s == slot)
                log.info("recompression: dictionary %d (%d bytes) trained in %.2f CPU-s", new_id, len(data), cpu2)
                await self._pace(cpu + cpu2, budget, span)
                return new_id
            finally:
                self.training = False

    async def round(self) -> None:
        """One round of the policy (see the top)."""
        cfg = self.config()
        store = self.store
        if not cfg.enable:
            # no pass scans the page table: keep the idle stamps from wrapping
            # (the idle histogram, and the passes once enabled, rely on them)
            if trio.current_time() >= self.next_clamp:
                self.next_clamp = trio.current_time() + CLAMP_INTERVAL
                _, cpu = await self._run(store.clamp_idle, self.threaded)
                self._account(cpu)
            return
        store.tick(self.clock())
        pressed, refused = self.pressure()
        idle = 0 if refused else idle_ticks(cfg.idle_age)
        now = trio.current_time()
        if cfg.dictionary_size and not pressed and now >= self.next_training and store.retrain_wanted():
            await self.train(idle, cfg.dictionary_size)
        await self.run_pass(idle, cfg.threshold, cfg.level, budget=not refused, oldest_first=pressed, reserve=pressed)
        store.drop_unused_dictionaries()

    async def run(self) -> None:
        """The policy task: a round, then a pause, for ever.  The pause is
        ROUND_INTERVAL, cut short once usage passes the watermark or a
        write is refused: the ladder's rung is this task's alone, so it
        must not sleep through a burst of writes that fills the store."""
        while True:
            await self.round()
            waited = 0.0
            while True:
                await trio.sleep(PRESSED_INTERVAL)
                waited += PRESSED_INTERVAL
                if waited >= ROUND_INTERVAL or self.pressure()[0]:
                    break
