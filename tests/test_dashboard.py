"""docs/grafana-dashboard.json queries only metrics that a real daemon
exports (`zswapd stats --prometheus`, the same text the metrics listener
serves).  The tiers' panels query what every daemon exports (the
recompression counters and gauges, zram's bd_stat names), not the
``zswapd_writeback_*`` gauges that only a daemon with a backing file has."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bzswapd_[a-zA-Z0-9_]+")


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template variables."""
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"])
    return out


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "zswapd" and dashboard["id"] is None and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in (
        "limit",
        "ratio",
        "restarts",
        "refused",
        "swap i/o",
        "pages in the pool",
        "size class",
        "recompress",
        "backing file",
    ):
        assert subject in titles, subject


@pytest.mark.root
def test_every_metric_the_dashboard_queries_is_exported(daemon: Daemon) -> None:
    r = subprocess.run([sys.executable, "-m", "zswapd", "stats", "--prometheus", "--socket", daemon.socket],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    exported = {line.split("{")[0].split()[0] for line in r.stdout.splitlines() if line and not line.startswith("#")}
    queried = {name for expr in _queries(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(expr)}
    assert queried and queried <= exported, sorted(queried - exported)
    # What the dashboard shows beyond the mm_stat gauges, which zswapd added for it.
    assert {"zswapd_num_reads_total", "zswapd_num_writes_total", "zswapd_worker_restarts_total"} <= queried
