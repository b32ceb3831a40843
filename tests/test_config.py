"""Config: defaults, sizes, and errors that name file, key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from zswapd.config import ConfigError, load, mem_total, parse_size


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
