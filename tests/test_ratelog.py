"""RateLimitedLog: one line per interval, and the next line says how many
were held back.  The clock is stepped by hand: nothing here
waits or depends on the machine's speed."""

from __future__ import annotations

import logging

import pytest

from zswapd.ratelog import RateLimitedLog


def test_one_line_per_interval_and_the_count_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    limited = RateLimitedLog(logging.getLogger("zswapd.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="zswapd.test"):
        assert limited(logging.WARNING, "refused uid %d", 1000)
        for _ in range(5):
            now[0] += 1.0
            assert not limited(logging.WARNING, "refused uid %d", 1000)
        now[0] += 5.0  # 10 s after the first line
        assert limited(logging.WARNING, "refused uid %d", 1001)
        now[0] += 20.0
        assert limited(logging.WARNING, "refused uid %d", 1002)  # nothing held back: no count
    assert [r.getMessage() for r in caplog.records] == [
        "refused uid 1000",
        "refused uid 1001 (5 more like this not logged since the last)",
        "refused uid 1002",
    ]


def test_the_traceback_goes_with_the_line(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("zswapd.test"))
    with caplog.at_level(logging.ERROR, logger="zswapd.test"):
        try:
            raise KeyError("a bug")
        except KeyError:
            limited(logging.ERROR, "request failed", exc_info=True)
            limited(logging.ERROR, "request failed", exc_info=True)  # held back
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
