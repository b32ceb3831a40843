"""TOML configuration: schema, defaults and validation.

Every error names the file, the key, the bad value and what is expected, e.g.
``/etc/zswapd/zswapd.toml: [pool] memory_limit = '12Q': expected a size ...``.
Without a file the embedded defaults apply; they follow zram-generator
(device size min(MemTotal / 2, 4 GiB)) and zswap (pool limit 20% of RAM).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_PATH = "/etc/zswapd/zswapd.toml"
PAGE = 4096
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    pass


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")


def parse_size(value: object) -> int:
    """Bytes from an int or a string with an optional K/M/G/T (binary) suffix,
    as zram's disksize reads them.  Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise ValueError("not a size")


def parse_limit(value: object, total: int) -> int:
    """A size, a percentage of MemTotal ("25%"), or 0 for no limit."""
    if isinstance(value, str) and value.strip().endswith("%"):
        text = value.strip()[:-1].strip()
        try:
            pct = float(text)
        except ValueError:
            raise ValueError("not a percentage") from None
        if not 0 <= pct <= 100:
            raise ValueError("percentage out of range")
        return int(total * pct / 100) // PAGE * PAGE
    return parse_size(value)


def _default_size() -> int:
    return min(mem_total() // 2, 4 << 30) // PAGE * PAGE


@dataclass
class DeviceConfig:
    size: int = 0  # 0 until resolved: min(MemTotal / 2, 4 GiB)
    mountpoint: str = "/run/zswapd/mnt"


@dataclass
class PoolConfig:
    algorithm: str = "lz4"
    zstd_level: int = 1
    memory_limit: int = -1  # -1 until resolved from "20%"
    accept_percent: int = 90
    reserve: int = 1 << 20


@dataclass
class CompactionConfig:
    background: bool = True
    waste_threshold: int = 8 << 20
    watermark: int = 90
    interval: float = 1.0


@dataclass
class SwapConfig:
    enable: bool = True
    priority: int = 100
    discard: str = "pages"


@dataclass
class ControlConfig:
    socket: str = "/run/zswapd/control.sock"
    group: str = ""
    metrics_listen: str = ""


@dataclass
class FuseConfig:
    backend: str = "native"


@dataclass
class Config:
    path: str = "<defaults>"
    device: DeviceConfig = field(default_factory=DeviceConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)


Check = Callable[[object], Any]


def _int_in(lo: int, hi: int) -> Check:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return v

    return check


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _choice(*options: str) -> Check:
    def check(v: object) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return str(v)

    return check


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _abs_path(v: object) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError("an absolute path")
    return os.path.normpath(v)


def _device_size(v: object) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        raise ValueError('a size in bytes or with a K/M/G/T suffix, e.g. "4G"') from None
    if n < PAGE * 16 or n % PAGE:
        raise ValueError("a multiple of 4096 bytes, at least 64K")
    return n


def _limit(v: object) -> int:
    try:
        return parse_limit(v, mem_total())
    except ValueError:
        raise ValueError('a size ("512M", "2G"), a percentage of RAM from 0% to 100% ("25%"), or 0 for none') from None


def _small_size(v: object) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError('a size in bytes or with a K/M/G/T suffix, e.g. "8M"') from None


def _seconds(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.01 <= v <= 3600:
        raise ValueError("a number of seconds from 0.01 to 3600")
    return float(v)


def _listen(v: object) -> str:
    if not isinstance(v, str) or (v and not re.match(r"^[\w.\-\[\]:]+:\d{1,5}$", v)):
        raise ValueError('"" or "HOST:PORT"')
    return v


SCHEMA: dict[str, dict[str, Check]] = {
    "device": {"size": _device_size, "mountpoint": _abs_path},
    "pool": {
        "algorithm": _choice("lz4", "zstd"),
        "zstd_level": _int_in(-7, 22),
        "memory_limit": _limit,
        "accept_percent": _int_in(1, 100),
        "reserve": _small_size,
    },
    "compaction": {
        "background": _bool,
        "waste_threshold": _small_size,
        "watermark": _int_in(1, 100),
        "interval": _seconds,
    },
    "swap": {"enable": _bool, "priority": _int_in(-1, 32767), "discard": _choice("pages", "once", "both", "none")},
    "control": {"socket": _abs_path, "group": _str, "metrics_listen": _listen},
    "fuse": {"backend": _choice("native", "pyfuse3")},
}

# Keys that the control socket's `set` may change while running.
RUNTIME_KEYS = {
    "memory_limit": ("pool", "memory_limit"),
    "accept_percent": ("pool", "accept_percent"),
    # Every page records its algorithm, so a switch applies to new writes and
    # old pages stay readable (zram needs a reset for this).
    "algorithm": ("pool", "algorithm"),
    "zstd_level": ("pool", "zstd_level"),
}


def check_value(path: str, section: str, key: str, value: object) -> Any:
    try:
        return SCHEMA[section][key](value)
    except ValueError as e:
        raise ConfigError(f"{path}: [{section}] {key} = {value!r}: expected {e}") from None


def from_dict(data: dict[str, Any], path: str) -> Config:
    cfg = Config(path=path)
    for section, values in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{path}: unknown section [{section}]; expected one of {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section} = {values!r}: expected a [{section}] table")
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in SCHEMA[section]:
                allowed = ", ".join(f.name for f in fields(target))
                raise ConfigError(f"{path}: unknown key [{section}] {key}; expected one of {allowed}")
            setattr(target, key, check_value(path, section, key, value))
    if cfg.device.size == 0:
        cfg.device.size = _default_size()
    if cfg.pool.memory_limit < 0:
        cfg.pool.memory_limit = parse_limit("20%", mem_total())
    return cfg


def load(path: str | None = None) -> Config:
    """Read ``path``; with None, the default path if it exists, else the
    embedded defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return from_dict({}, "<defaults>")
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return from_dict(data, path)
