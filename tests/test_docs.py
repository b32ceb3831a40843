"""The shipped example config stays in step with the schema."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from zswapd.config import SCHEMA, from_dict

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_key_and_parses() -> None:
    text = (ROOT / "systemd" / "zswapd.toml").read_text()
    uncommented = "\n".join(re.sub(r"^#(\w)", r"\1", line) for line in text.splitlines())
    data = tomllib.loads(uncommented)
    assert {s: set(v) for s, v in data.items()} == {s: set(v) for s, v in SCHEMA.items()}
    from_dict(data, "systemd/zswapd.toml")


def test_unit_file_has_what_swap_needs() -> None:
    unit = (ROOT / "systemd" / "zswapd.service").read_text()
    for line in (
        "Type=notify",
        "LimitMEMLOCK=infinity",
        "OOMScoreAdjust=-1000",
        "Before=swap.target",
        "TimeoutStopSec=",
    ):
        assert line in unit
