"""Config: defaults, sizes, and errors that name file, key, value and expectation.

Fail closed: whatever the file holds, ``load`` gives a Config or a
ConfigError (fuzzed below), and the CLI turns the error into exit 2 with one
line on stderr.  Privilege: none (the Store built at the size bound maps
address space only).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zswapd.config import (
    MAX_DEVICE_SIZE,
    PAGE,
    RELOADABLE,
    RUNTIME_KEYS,
    SCHEMA,
    Config,
    ConfigError,
    diff,
    from_dict,
    load,
    mem_total,
    parse_size,
)
from zswapd.pool import PoolError
from zswapd.state import StateError
from zswapd.store import Store

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "zswapd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_follow_zram_generator_and_zswap(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert cfg.device.size == min(mem_total() // 2, 4 << 30) // 4096 * 4096
    assert cfg.device.mountpoint == "/run/zswapd/mnt"
    assert cfg.pool.algorithm == "lz4"
    assert cfg.pool.memory_limit == int(mem_total() * 0.2) // 4096 * 4096
    assert cfg.swap.enable and cfg.swap.priority == 100 and cfg.swap.discard == "pages"


def test_sizes_read_like_zram_disksize() -> None:
    assert parse_size("4G") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64K") == 64 << 10
    assert parse_size("1T") == 1 << 40
    assert parse_size(8192) == 8192
    assert parse_size("2GiB") == 2 << 30


def test_full_config(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            """
[device]
size = "1G"
mountpoint = "/run/x"
[pool]
algorithm = "zstd"
zstd_level = 3
memory_limit = "25%"
[compaction]
background = false
interval = 0.5
[swap]
priority = 5
""",
        )
    )
    assert cfg.device.size == 1 << 30 and cfg.pool.algorithm == "zstd" and cfg.pool.zstd_level == 3
    assert cfg.pool.memory_limit == int(mem_total() * 0.25) // 4096 * 4096
    assert not cfg.compaction.background and cfg.compaction.interval == 0.5 and cfg.swap.priority == 5


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('[pool]\nmemory_limit = "12Q"', ["[pool] memory_limit", "'12Q'", "expected a size"]),
        ('[pool]\nmemory_limit = "-5%"', ["memory_limit", "'-5%'", "percentage"]),
        ('[pool]\nmemory_limit = "150%"', ["memory_limit", "'150%'", "0% to 100%"]),
        ('[pool]\nalgorithm = "lzo"', ["[pool] algorithm", "'lzo'", "'lz4', 'zstd'"]),
        ("[device]\nsize = 1000", ["[device] size", "1000", "multiple of 4096"]),
        ("[device]\nsize = true", ["[device] size", "True"]),
        ('[device]\nmountpoint = "relative"', ["mountpoint", "absolute path"]),
        ("[swap]\npriority = 99999", ["[swap] priority", "99999", "from -1 to 32767"]),
        ('[swap]\nenable = "yes"', ["[swap] enable", "'yes'", "true or false"]),
        ("[device]\nsise = 1", ["unknown key [device] sise", "size, mountpoint"]),
        ("[bogus]\nx = 1", ["unknown section [bogus]"]),
        ("device = 3", ["expected a [device] table"]),
        ("[device\n", ["not valid TOML"]),
        # paths
        ('[device]\nmountpoint = "/"', ["[device] mountpoint", "'/'", "not / or a system directory", "the root"]),
        ('[device]\nmountpoint = "//"', ["mountpoint", "the root"]),
        ('[device]\nmountpoint = "/etc"', ["mountpoint", "/etc is a system directory"]),
        ('[device]\nmountpoint = "/usr/../tmp/"', ["mountpoint", "/tmp is a system directory"]),
        ('[device]\nmountpoint = "/proc/zswapd"', ["mountpoint", "/proc/zswapd is under /proc"]),
        ('[device]\nmountpoint = "/dev/shm/zswapd"', ["mountpoint", "is under /dev"]),
        ('[device]\nmountpoint = "/sys/fs/x"', ["mountpoint", "is under /sys"]),
        ('[device]\nmountpoint = "/run/a\\u0000b"', ["mountpoint", "control characters (NUL, newline)"]),
        ('[device]\nmountpoint = "/run/a\\nb"', ["mountpoint", "control characters (NUL, newline)"]),
        ('[control]\nsocket = "/run"', ["[control] socket", "/run is a system directory"]),
        ('[control]\nsocket = "/run/' + "s" * 110 + '"', ["[control] socket", "at most 107 bytes"]),
        ('[control]\nsocket = "/run/zswapd/mnt/c.sock"', ["[control] socket", "outside [device] mountpoint"]),
        # sizes and numbers beyond their range
        ('[device]\nsize = "99999T"', ["[device] size", "'99999T'", "8T less 260K", str(MAX_DEVICE_SIZE)]),
        ("[device]\nsize = 99999999999999999999999", ["[device] size", "99999999999999999999999", "8T"]),
        ('[device]\nsize = "9999999999999999999999999T"', ["[device] size", "from 64K to"]),
        ("[pool]\nzstd_level = 99999999999999999999999", ["[pool] zstd_level", "from -7 to 22"]),
        ("[pool]\nmemory_limit = 99999999999999999999999", ["[pool] memory_limit", "expected a size"]),
        ("[pool]\nreserve = 9223372036854775807", ["[pool] reserve", "from 0 to 1G"]),
        ("[compaction]\nwaste_threshold = 9223372036854775808", ["[compaction] waste_threshold", "at most"]),
        ("[compaction]\ninterval = 1e999", ["[compaction] interval", "inf", "0.01 to 3600"]),
        ("[compaction]\ninterval = nan", ["[compaction] interval", "nan", "0.01 to 3600"]),
        ("[swap]\npriority = -99999999999999999999999", ["[swap] priority", "from -1 to 32767"]),
        # [recompress]
        ("[recompress]\nlevel = 23", ["[recompress] level = 23", "an integer from 1 to 22"]),
        ("[recompress]\nlevel = 0", ["[recompress] level = 0", "an integer from 1 to 22"]),
        ("[recompress]\nthreshold = 4097", ["[recompress] threshold = 4097", "an integer from 0 to 4096"]),
        ('[recompress]\nidle_age = "2d"', ["[recompress] idle_age = '2d'", '"90s", "30m", "2h"', "17 hours"]),
        ("[recompress]\nidle_age = -1", ["[recompress] idle_age = -1", "from 0 to 61440"]),
        ('[recompress]\nidle_age = "18h"', ["[recompress] idle_age = '18h'", "from 0 to 61440"]),
        ("[recompress]\ncpu_percent = 0", ["[recompress] cpu_percent = 0", "from 0.1 to 100"]),
        ("[recompress]\ncpu_percent = nan", ["[recompress] cpu_percent = nan", "from 0.1 to 100"]),
        ('[recompress]\ndictionary_size = "512K"', ["[recompress] dictionary_size", "from 1K to 256K"]),
        ("[recompress]\nenable = 1", ["[recompress] enable = 1", "true or false"]),
        # metrics_listen
        (
            '[control]\nmetrics_listen = ":9100"',
            ["metrics_listen", "bind to all addresses is refused", "127.0.0.1:9100"],
        ),
        ('[control]\nmetrics_listen = "[]:9100"', ["metrics_listen", "bind to all addresses is refused"]),
        ('[control]\nmetrics_listen = "127.0.0.1:0"', ["metrics_listen", "PORT from 1 to 65535"]),
        ('[control]\nmetrics_listen = "127.0.0.1:65536"', ["metrics_listen", "PORT from 1 to 65535"]),
        ('[control]\nmetrics_listen = "127.0.0.1"', ["metrics_listen", "HOST:PORT"]),
        ('[control]\nmetrics_listen = "::1:9100"', ["metrics_listen", "IPv6 address goes in brackets"]),
        ('[control]\nmetrics_listen = "[::g]:9100"', ["metrics_listen", "not a bracketed IPv6 address"]),
        ('[control]\nmetrics_listen = "300.1.1.1:9100"', ["metrics_listen", "not an IPv4 address"]),
        ('[control]\nmetrics_listen = "-bad-.example:9100"', ["metrics_listen", "not a host name"]),
        ('[control]\nmetrics_listen = "a b:9100"', ["metrics_listen", "not a host name"]),
        # the rest of the schema
        ('[control]\ngroup = "no-such-group-zswapd"', ["[control] group", "no such group"]),
        ('[control]\ngroup = "a:b"', ["[control] group", "name of an existing group"]),
        ('[log]\nlevel = "loud"', ["[log] level", "'loud'", "'debug', 'info', 'warning', 'error'"]),
        ('[log]\n"a\\nb" = 1', ["unknown key [log] 'a\\nb'", "level"]),
        ("a = " + "[" * 50000, ["nested too deeply"]),
    ],
)
def test_errors_name_file_key_value_and_expectation(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(path + ":"), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "absent.toml"))


def test_not_utf8_names_the_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[device]\n# Größe\nmountpoint = "/run/zsw\xe4pd"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 2:"), msg  # the comment comes first
    assert "byte 0xf6" in msg and "not UTF-8" in msg and "expected a UTF-8 TOML file" in msg


def test_not_utf8_in_a_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[device]\nmountpoint = "/run/\xff"\n')
    with pytest.raises(ConfigError, match=r"line 2 \(mountpoint = \.\.\.\): byte 0xff"):
        load(str(path))


def test_too_large_and_unreadable(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load(str(big))
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path))  # a directory


def test_accepted_values_are_normalised(tmp_path: Path) -> None:
    text = (
        '[device]\nmountpoint = "//run//zswapd/./mnt/"\nsize = "1G"\n'
        '[control]\nsocket = "/run/zswapd/x/../control.sock"\nmetrics_listen = "[::1]:9100"\ngroup = "root"\n'
        '[log]\nlevel = "debug"\n'
    )
    cfg = load(write(tmp_path, text))
    assert cfg.device.mountpoint == "/run/zswapd/mnt"
    assert cfg.control.socket == "/run/zswapd/control.sock"
    assert cfg.control.group == "root" and cfg.log.level == "debug"
    for listen in ("", "127.0.0.1:9100", "[::1]:9100", "localhost:9100", "metrics.example.org.:1", "0.0.0.0:65535"):
        assert load(write(tmp_path, f'[control]\nmetrics_listen = "{listen}"')).control.metrics_listen == listen
    assert load(write(tmp_path, "")).log.level == "info"


def test_fuse_backend_native_is_the_old_name_of_builtin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load(write(tmp_path, "")).fuse.backend == "builtin"
    with caplog.at_level(logging.WARNING, logger="zswapd"):
        assert load(write(tmp_path, '[fuse]\nbackend = "native"')).fuse.backend == "builtin"
    assert any('backend = "native" is deprecated' in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="expected one of 'builtin', 'pyfuse3'"):
        load(write(tmp_path, '[fuse]\nbackend = "libfuse"'))


def test_device_size_bound_is_the_stores() -> None:
    """MAX_DEVICE_SIZE is the largest device the store can build (its tables
    are mapped lazily, so this costs address space, not memory)."""
    store = Store(MAX_DEVICE_SIZE, memory_limit=0)
    last = MAX_DEVICE_SIZE - PAGE
    store.write(last, b"\x5a" * PAGE)
    assert store.read(last, PAGE) == b"\x5a" * PAGE
    del store
    with pytest.raises((PoolError, StateError)):  # the state's geometry check refuses it first
        Store(MAX_DEVICE_SIZE + PAGE, memory_limit=0)
    assert from_dict({"device": {"size": MAX_DEVICE_SIZE}}, "x").device.size == MAX_DEVICE_SIZE
    with pytest.raises(ConfigError):
        from_dict({"device": {"size": MAX_DEVICE_SIZE + PAGE}}, "x")


# -- reload ---------------------------------------------------------------------


def test_runtime_keys_are_reloadable_and_in_the_schema() -> None:
    assert set(RUNTIME_KEYS.values()) <= RELOADABLE
    for section, key in RELOADABLE:
        assert key in SCHEMA[section], (section, key)
    assert {k for s, k in RELOADABLE if s == "compaction"} == set(SCHEMA["compaction"])
    assert ("log", "level") in RELOADABLE and ("control", "group") in RELOADABLE
    assert ("device", "size") not in RELOADABLE and ("control", "socket") not in RELOADABLE


def test_diff_splits_runtime_changes_from_restarts() -> None:
    old = from_dict({}, "a")
    assert diff(old, from_dict({}, "b")) == ([], [])
    new = from_dict(
        {
            "pool": {"memory_limit": "64M", "algorithm": "zstd", "reserve": "2M"},
            "compaction": {"interval": 2},
            "log": {"level": "debug"},
            "device": {"size": "1G", "mountpoint": "/run/other"},
            "control": {"group": "root"},
        },
        "b",
    )
    apply, restart = diff(old, new)
    assert apply == [
        ("pool", "algorithm", "zstd"),
        ("pool", "memory_limit", 64 << 20),
        ("compaction", "interval", 2.0),
        ("control", "group", "root"),
        ("log", "level", "debug"),
    ]
    assert restart == ["[device] size", "[device] mountpoint", "[pool] reserve"]
    # every key is classified one way or the other
    every = Config()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert hasattr(getattr(every, section), key)
    assert diff(new, replace(new, path="c")) == ([], [])


# -- fuzz: a Config or a ConfigError, never anything else -----------------------


def _toml_str(v: str) -> str:
    # JSON's escapes are TOML's, except that TOML wants DEL escaped and
    # refuses surrogate pairs, so no ensure_ascii.
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


_scalars = (
    st.integers()
    | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=40)
    | st.sampled_from(["4G", "99999T", "0", "25%", "-1%", "nan%", "1e400%", "/", "/run/x", ":9100", "[]:1", "lz4"])
    | st.sampled_from(
        [1, 3, 90, 4096, 1 << 63, "zstd", "info", "pages", "root", "127.0.0.1:9100", "[::1]:1", "//srv/z/"]
    )
    | st.datetimes()
    | st.dates()
    | st.times()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_sections = st.sampled_from([*SCHEMA, "bogus"])


@st.composite
def _documents(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(_sections, max_size=4, unique=True)):
        lines.append(f"[{section}]")
        keys = list(SCHEMA.get(section, {})) + ["bogus"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(_values))}")
    return "\n".join(lines) + "\n"


def _load_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    try:
        cfg = load(str(path))
    except ConfigError as e:
        assert str(e).startswith(f"{path}:"), e
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    _load_bytes(tmp_path, data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_documents())
def test_fuzz_schema_documents(tmp_path: Path, doc: str) -> None:
    _load_bytes(tmp_path, doc.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_documents(), cut=st.integers(min_value=0, max_value=400), junk=st.binary(min_size=1, max_size=3))
def test_fuzz_damaged_documents(tmp_path: Path, doc: str, cut: int, junk: bytes) -> None:
    raw = doc.encode()
    _load_bytes(tmp_path, raw[:cut] + junk + raw[cut:])


# -- end to end: exit 2, the message on stderr, no traceback ----------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'[device]\nmountpoint = "/run/\xff"\n', "not UTF-8"),
        (b'[device]\nmountpoint = "/"\n', "[device] mountpoint = '/'"),
        (b'[device]\nsize = "99999T"\n', "[device] size = '99999T'"),
        (b"[pool]\nzstd_level = 99999999999999999999999\n", "[pool] zstd_level"),
        (b'[control]\nmetrics_listen = ":9100"\n', "bind to all addresses is refused"),
        (b"a = " + b"[" * 50000, "nested too deeply"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_cli_exits_2_with_the_message(tmp_path: Path, command: str, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    r = subprocess.run(
        [sys.executable, "-m", "zswapd", command, "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith(f"zswapd: {path}:") and fragment in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_byte_order_mark_is_accepted_and_offsets_count_it(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[log]\nlevel = "debug"\n')
    assert load(str(path)).log.level == "debug"
    path.write_bytes(b'\xef\xbb\xbf[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError, match=r"line 2 \(level = \.\.\.\): byte 0xff at offset 18 "):
        load(str(path))


def test_recompress_section_reads_ages_and_sizes(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[recompress]\nidle_age = "30m"\ndictionary_size = "64K"\ncpu_percent = 2.5\n'))
    assert (cfg.recompress.idle_age, cfg.recompress.dictionary_size, cfg.recompress.cpu_percent) == (1800, 65536, 2.5)
    cfg = load(write(tmp_path, "[recompress]\nidle_age = 90\ndictionary_size = 0\nenable = false\n"))
    assert (cfg.recompress.idle_age, cfg.recompress.dictionary_size, cfg.recompress.enable) == (90, 0, False)
    assert load(write(tmp_path, '[recompress]\nidle_age = "2h"\n')).recompress.idle_age == 7200
    assert load(write(tmp_path, "")).recompress == load(write(tmp_path, "[recompress]\n")).recompress
