"""TOML configuration: schema, defaults and validation.

Every error names the file, the key, the bad value and what is expected, e.g.
``/etc/zswapd/zswapd.toml: [pool] memory_limit = '12Q': expected a size ...``.
Without a file the embedded defaults apply; they follow zram-generator
(device size min(MemTotal / 2, 4 GiB)) and zswap (pool limit 20% of RAM).

Nothing in a file may reach the daemon as a traceback: ``load`` returns a
``Config`` or raises ``ConfigError``, whatever the bytes (tests/test_config.py
fuzzes it).  The rules that are not obvious from the schema:

- The file is UTF-8 TOML of at most ``MAX_FILE_SIZE`` bytes.
- Paths (``[device] mountpoint``, ``[control] socket``) are absolute, are
  normalised lexically (``//run/./x/`` is ``/run/x``; symlinks are not
  resolved), hold no control characters (NUL, newline...), and are neither
  ``/``, a top-level system directory (``/etc``, ``/usr``, ``/tmp``...), nor
  anything under ``/proc``, ``/sys`` or ``/dev``: a FUSE mount there would
  shadow what the system needs.  The socket must fit ``sun_path`` and may not
  lie inside the mountpoint, which the mount would hide.
- Every number has a range; TOML integers are arbitrary here (tomllib reads
  ``1e30``-sized ones), and none may reach the daemon as an OverflowError.
- ``[device] size`` is at most ``MAX_DEVICE_SIZE`` (see there).
- ``[control] metrics_listen`` names the address to bind: an empty host
  (``:9100``, ``[]:9100``) is refused rather than read as "all addresses".
- ``[control] group`` must exist when the file is checked, so that
  ``check-config`` reports it rather than the daemon's start.
- ``RELOADABLE`` and ``diff`` say what a reload (SIGHUP) may apply.
- The daemon reads its file with ``load(..., strict=True)``, as sshd's
  StrictModes: the file must be root's and writable by root alone, and so
  must every directory on its way (sticky ones such as /tmp aside, see
  paths.py), or the file is refused with the fix in the message: whoever
  can change it could choose what root mounts, binds and chowns.  Strict
  loading also resolves ``[device] mountpoint`` and ``[control] socket`` to
  their real paths (paths.resolve_parent), once: every later comparison
  (the mount table, the lock files) is of those strings.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from . import paths

DEFAULT_PATH = "/etc/zswapd/zswapd.toml"
PAGE = 4096
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# ASCII digits only, and no more than a 64-bit count could need, so that no
# string turns into a huge int before the range check.
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20})\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE | re.ASCII)

# A config file is a few kilobytes; the cap keeps `--config /dev/zero` from
# reading forever.
MAX_FILE_SIZE = 1 << 20
# Sizes are reported as unsigned 64-bit counters (stats, Prometheus), and
# the kernel's own byte counts are 64-bit.
MAX_SIZE = (1 << 63) - 1
# The device's upper bound.  Candidates, and which binds first:
# - the page table keeps a page's pool handle in 31 bits (bits 32-62, see
#   the glossary in store.py), and the store asks the pool for one handle per
#   page plus 64 spare (Store.__init__, Pool's _MAX_HANDLE = 2^31 - 1), so at
#   most 2^31 - 65 pages: just under 8 TiB.  This binds.
# - the swap header's last_page is a 32-bit page count (16 TiB);
# - the x86-64 swap entry's offset field and a loop device's 64-bit byte
#   size are far larger;
# - the metadata tables reserve about 56 bytes of address space per page
#   (MAP_NORESERVE, faulted lazily): 120 GiB at this bound, well inside the
#   128 TiB a 64-bit process can address.
# tests/test_config.py builds a Store at this size and checks that one page
# more is refused, so the constant follows the store.
MAX_DEVICE_PAGES = (1 << 31) - 1 - 64
MAX_DEVICE_SIZE = MAX_DEVICE_PAGES * PAGE
MIN_DEVICE_SIZE = 16 * PAGE
# The write path's resident frame reserve: memory held idle on purpose.  It
# is also added to the pool's frame count, whose tables use 32-bit numbers.
MAX_RESERVE = 1 << 30
# sun_path in struct sockaddr_un is 108 bytes including the final NUL.
MAX_SOCKET_PATH = 107

# Refused as a mountpoint or socket path: the root, these directories
# themselves, and (for the pseudo filesystems) everything below them.
SYSTEM_TREES = ("/proc", "/sys", "/dev")
SYSTEM_DIRS = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found",
        "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr",
        "/var", "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/sbin", "/usr/share",
        "/var/cache", "/var/lib", "/var/lock", "/var/log", "/var/run", "/var/spool", "/var/tmp", "/run/lock",
        "/run/user", "/run/systemd",
    }
)  # fmt: skip

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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
    as zram's disksize reads them, at most ``MAX_SIZE``.  Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    n = -1
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 0 <= n <= MAX_SIZE:
        raise ValueError("not a size")
    return n


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


# [pool] engine: "auto" (the C engine if built, else Python), "native" (the
# C engine, zswapd/engine/) or "python" (pool.py, the reference).  Written
# here, where the supervisor reads it without importing any engine;
# engine.py takes its list from here.
ENGINES = ("auto", "native", "python")


@dataclass
class PoolConfig:
    algorithm: str = "lz4"
    zstd_level: int = 1
    memory_limit: int = -1  # -1 until resolved from "20%"
    accept_percent: int = 90
    reserve: int = 1 << 20
    engine: str = "auto"  # one of ENGINES


@dataclass
class CompactionConfig:
    background: bool = True
    waste_threshold: int = 8 << 20
    watermark: int = 90
    interval: float = 1.0


@dataclass
class RecompressConfig:
    """The recompression tier (docs/operation.md, "Recompression"); the
    defaults are measured (docs/benchmarks.md, "ceiling" and "recompression")."""

    enable: bool = True
    idle_age: int = 3600  # seconds since a page's last access
    level: int = 8  # zstd's; a dictionary starts to pay from here on
    threshold: int = 128  # bytes an object must shrink by to be kept
    cpu_percent: float = 5.0  # of one core, from the policy thread's own CPU time
    dictionary_size: int = 112 << 10  # 0: no dictionary


# The oldest idle age the page table can tell (entry.IDLE_CLAMP ticks of
# entry.IDLE_TICK seconds: 17 hours 4 minutes); entry.py sits below config,
# so engine.py checks that the two agree.
MAX_IDLE_AGE = 1024 * 60
# A dictionary's size: state.DICT_MAX_BYTES at most (engine.py checks).
MAX_DICTIONARY_SIZE = 256 << 10
MIN_DICTIONARY_SIZE = 1 << 10


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
    metrics_access: str = "group"  # "group": root and group only; "any": every peer


# [fuse] threads' maximum: far beyond the cores a swap device can keep busy.
# The C FUSE threads' MAX_THREADS is the same number (engine.py checks at
# import), and the unit's FileDescriptorStoreMax leaves room for one stored
# clone per thread (tests/test_docs.py checks).
MAX_FUSE_THREADS = 64


@dataclass
class FuseConfig:
    backend: str = "builtin"
    threads: int = 0  # native serving threads on /dev/fuse; 0: one per CPU (serving_threads)

    def serving_threads(self) -> int:
        """One serving thread per CPU (up to MAX_FUSE_THREADS).  Idle ones
        sleep on a futex and join only when requests queue up, so at queue
        depth 1 two threads serve as fast as one.  Measured on 2 vCPUs
        (docs/benchmarks.md): the sort benchmark at 1.5x its memcg limit ran
        1.10x zram's wall time with two threads, 1.17x with one."""
        return self.threads or min(MAX_FUSE_THREADS, os.cpu_count() or 1)


# [writeback] size: the backing file holds segments of this many bytes
# (backing.SEG_SIZE, which asserts the two agree); it needs two, the open
# one and one kept free for cleaning, and at most what a page entry's
# 31-bit location in 16-byte units addresses.
WRITEBACK_SEGMENT = 256 << 10
WRITEBACK_MIN_SIZE = 2 * WRITEBACK_SEGMENT
WRITEBACK_MAX_SIZE = 32 << 30


@dataclass
class WritebackConfig:
    """Cold pages written to a backing file (backing.py).  Off by default:
    it needs a file on a disk, which only the administrator can name."""

    enable: bool = False
    file: str = ""
    size: int = 0
    # Background writeback of pages idle this long (zram's `writeback idle`
    # after `idle` marking; ChromeOS uses 20-25 h, beyond the 17 h the idle
    # stamp tells apart, so the oldest it tells: a page idle that long is
    # one the recompression pass has long had its go at); 0: only before full.
    idle_age: int = MAX_IDLE_AGE
    # Bytes written to the file per day at most (zram's writeback_limit);
    # 0: no limit.  When spent, the pool reports full as without writeback.
    daily_limit: int = 0


@dataclass
class LogConfig:
    level: str = "info"


@dataclass
class Config:
    path: str = "<defaults>"
    device: DeviceConfig = field(default_factory=DeviceConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    recompress: RecompressConfig = field(default_factory=RecompressConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    writeback: WritebackConfig = field(default_factory=WritebackConfig)
    log: LogConfig = field(default_factory=LogConfig)


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


def _fuse_backend(v: object) -> str:
    """ "builtin" (zswapd's own FUSE layer: the codec, and the C threads with
    the native engine) or "pyfuse3"; "native", its old name, still works."""
    if v == "native":
        logging.getLogger("zswapd").warning(
            '[fuse] backend = "native" is deprecated: the same backend is now called "builtin"'
        )
        return "builtin"
    return str(_choice("builtin", "pyfuse3")(v))


def _choice(*options: str) -> Check:
    def check(v: object) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return str(v)

    return check


_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?$", re.ASCII)


def _group(v: object) -> str:
    if v == "":
        return ""
    if not isinstance(v, str) or not _GROUP_RE.match(v):
        raise ValueError('"" (root only) or the name of an existing group')
    try:
        grp.getgrnam(v)
    except KeyError:
        raise ValueError('"" (root only) or the name of an existing group (there is no such group)') from None
    return v


_PATH_EXPECT = (
    "an absolute path that is not / or a system directory (/etc, /usr, /tmp...) and not under /proc, /sys or /dev"
)


def _path(v: object) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError(_PATH_EXPECT)
    if any(ord(c) < 0x20 or c == "\x7f" for c in v):
        raise ValueError(_PATH_EXPECT + ", without control characters (NUL, newline)")
    # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux
    # reads it as "/", and so must the checks below.
    p = "/" + os.path.normpath(v).lstrip("/")
    if p in SYSTEM_DIRS:
        raise ValueError(_PATH_EXPECT + f" ({p} is " + ("the root)" if p == "/" else "a system directory)"))
    for tree in SYSTEM_TREES:
        if p.startswith(tree + "/"):
            raise ValueError(_PATH_EXPECT + f" ({p} is under {tree})")
    return p


def _socket_path(v: object) -> str:
    p = _path(v)
    if len(os.fsencode(p)) > MAX_SOCKET_PATH:
        raise ValueError(f"{_PATH_EXPECT}, at most {MAX_SOCKET_PATH} bytes long (the limit of a unix socket's address)")
    return p


def _device_size(v: object) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        n = -1
    if not MIN_DEVICE_SIZE <= n <= MAX_DEVICE_SIZE or n % PAGE:
        raise ValueError(
            f"a size that is a multiple of 4096 bytes, from 64K to {MAX_DEVICE_SIZE} bytes (8T less 260K, "
            'the most pages the page table can address), e.g. "4G"'
        )
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
        raise ValueError(f'a size in bytes or with a K/M/G/T suffix, e.g. "8M", at most {MAX_SIZE}') from None


def _reserve(v: object) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_RESERVE:
        raise ValueError('a size in bytes or with a K/M/G/T suffix, from 0 to 1G, e.g. "1M"')
    return n


def _seconds(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.01 <= v <= 3600:
        raise ValueError("a number of seconds from 0.01 to 3600")
    return float(v)


_AGE_RE = re.compile(r"^\s*([0-9]{1,9})\s*([smh]?)\s*$", re.ASCII)
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _idle_age(v: object) -> int:
    """Seconds, as an integer or a string with an s/m/h suffix ("90s", "30m",
    "2h"), up to the oldest age the page table tells apart."""
    n = -1
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := _AGE_RE.match(v)):
        n = int(m.group(1)) * _AGE_UNITS[m.group(2)]
    if not 0 <= n <= MAX_IDLE_AGE:
        raise ValueError(
            f'seconds as an integer or a string such as "90s", "30m", "2h", from 0 to {MAX_IDLE_AGE} '
            "(17 hours: the oldest idle age a page's stamp tells apart)"
        )
    return n


def _backing_file(v: object) -> str:
    if v == "":
        return ""
    return _path(v)


def _backing_size(v: object) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        n = -1
    if n and (not WRITEBACK_MIN_SIZE <= n <= WRITEBACK_MAX_SIZE or n % PAGE):
        raise ValueError(
            "a size that is a multiple of the block size (4096 bytes), from 512K (two 256 KiB segments: the "
            'open one and one kept for cleaning) to 32G (what a page entry addresses), e.g. "8G"'
        )
    return n


def _percent(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.1 <= v <= 100:
        raise ValueError("a percentage of one CPU core from 0.1 to 100")
    return float(v)


def _dictionary_size(v: object) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        n = -1
    if not (n == 0 or MIN_DICTIONARY_SIZE <= n <= MAX_DICTIONARY_SIZE):
        raise ValueError('0 (no dictionary) or a size from 1K to 256K, e.g. "112K"')
    return n


_LISTEN_EXPECT = '"" (off) or "HOST:PORT" with an IPv4 address, [IPv6] address or host name, e.g. "127.0.0.1:9100"'
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$", re.ASCII)


def _listen(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(_LISTEN_EXPECT)
    if not v:
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(_LISTEN_EXPECT + ", PORT from 1 to 65535")
    if host in ("", "[]"):
        raise ValueError(
            "HOST:PORT with a host: bind to all addresses is refused: name the address, e.g. 127.0.0.1:9100"
        )
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(_LISTEN_EXPECT + f" ({host} is not a bracketed IPv6 address)") from None
        return v
    if ":" in host:
        raise ValueError(_LISTEN_EXPECT + " (an IPv6 address goes in brackets, e.g. [::1]:9100)")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(_LISTEN_EXPECT + f" ({host} is not an IPv4 address)") from None
        return v
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError(_LISTEN_EXPECT + f" ({host!r} is not a host name)")
    return v


SCHEMA: dict[str, dict[str, Check]] = {
    "device": {"size": _device_size, "mountpoint": _path},
    "pool": {
        "algorithm": _choice("lz4", "zstd"),
        "zstd_level": _int_in(-7, 22),
        "memory_limit": _limit,
        "accept_percent": _int_in(1, 100),
        "reserve": _reserve,
        "engine": _choice(*ENGINES),
    },
    "compaction": {
        "background": _bool,
        "waste_threshold": _small_size,
        "watermark": _int_in(1, 100),
        "interval": _seconds,
    },
    "recompress": {
        "enable": _bool,
        "idle_age": _idle_age,
        "level": _int_in(1, 22),
        "threshold": _int_in(0, PAGE),
        "cpu_percent": _percent,
        "dictionary_size": _dictionary_size,
    },
    "swap": {"enable": _bool, "priority": _int_in(-1, 32767), "discard": _choice("pages", "once", "both", "none")},
    "control": {
        "socket": _socket_path,
        "group": _group,
        "metrics_listen": _listen,
        "metrics_access": _choice("group", "any"),
    },
    # threads: with the native engine, C threads read /dev/fuse and serve
    # READ, WRITE and discards without the GIL.
    "fuse": {"backend": _fuse_backend, "threads": _int_in(0, MAX_FUSE_THREADS)},
    "writeback": {
        "enable": _bool,
        "file": _backing_file,
        "size": _backing_size,
        "idle_age": _idle_age,
        "daily_limit": _small_size,
    },
    "log": {"level": _choice(*LOG_LEVELS)},
}

# Keys that the control socket's `set` may change while running.
RUNTIME_KEYS = {
    "memory_limit": ("pool", "memory_limit"),
    "accept_percent": ("pool", "accept_percent"),
    # Every page records its algorithm, so a switch applies to new writes and
    # old pages stay readable (zram needs a reset for this).
    "algorithm": ("pool", "algorithm"),
    "zstd_level": ("pool", "zstd_level"),
    # The recompression policy reads these each round.
    "recompress": ("recompress", "enable"),
    "idle_age": ("recompress", "idle_age"),
    "recompress_level": ("recompress", "level"),
    "recompress_threshold": ("recompress", "threshold"),
    "recompress_cpu_percent": ("recompress", "cpu_percent"),
}

# Keys a reload of the file (SIGHUP) may apply to a running daemon: those of
# `set`, the compaction policy (read each housekeeping round), who may use
# the control socket, and the log level.  The rest shape the device, the
# mount, the swap area or the sockets, and take a restart.
RELOADABLE: frozenset[tuple[str, str]] = frozenset(
    {
        *RUNTIME_KEYS.values(),
        *(("compaction", key) for key in ("background", "waste_threshold", "watermark", "interval")),
        *(("recompress", f.name) for f in fields(RecompressConfig)),
        ("control", "group"),
        ("control", "metrics_access"),
        ("writeback", "idle_age"),
        ("writeback", "daily_limit"),
        ("log", "level"),
    }
)


def check_value(path: str, section: str, key: str, value: object) -> Any:
    try:
        return SCHEMA[section][key](value)
    except ValueError as e:
        raise ConfigError(f"{path}: [{section}] {key} = {_show(value)}: expected {e}") from None


def _show(value: object) -> str:
    """repr, cut short: a value in an error message is for recognising."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _name(key: str) -> str:
    """A TOML key as written, quoted when it is not a bare key."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else _show(key)


def from_dict(data: dict[str, Any], path: str) -> Config:
    cfg = Config(path=path)
    for section, values in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{path}: unknown section [{_name(section)}]; expected one of {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section} = {_show(values)}: expected a [{section}] table")
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in SCHEMA[section]:
                allowed = ", ".join(f.name for f in fields(target))
                raise ConfigError(f"{path}: unknown key [{section}] {_name(key)}; expected one of {allowed}")
            setattr(target, key, check_value(path, section, key, value))
    _check_apart(cfg)
    if cfg.device.size == 0:
        cfg.device.size = _default_size()
    if cfg.pool.memory_limit < 0:
        cfg.pool.memory_limit = parse_limit("20%", mem_total())
    return cfg


def _check_writeback(cfg: Config) -> None:
    wb = cfg.writeback
    if not wb.enable:
        return
    for key in ("file", "size"):
        if not getattr(wb, key):
            raise ConfigError(
                f"{cfg.path}: [writeback] enable = true needs [writeback] {key}: "
                + ("the path of a file on a disk filesystem" if key == "file" else 'its size, e.g. "8G"')
            )
    mnt = cfg.device.mountpoint
    if wb.file == mnt or wb.file.startswith(mnt + "/"):
        raise ConfigError(
            f"{cfg.path}: [writeback] file = {wb.file!r}: expected a path outside [device] mountpoint = {mnt!r}: "
            "swap written back into zswapd's own mount would come back to it"
        )


def _check_apart(cfg: Config) -> None:
    _check_writeback(cfg)
    mnt, sock = cfg.device.mountpoint, cfg.control.socket
    if sock == mnt or sock.startswith(mnt + "/") or sock == mnt + ".lock":
        raise ConfigError(
            f"{cfg.path}: [control] socket = {sock!r}: expected a path outside [device] mountpoint = {mnt!r} "
            "(the mount would hide it) and not the mountpoint's lock file"
        )
    if mnt == sock + ".lock" or mnt.startswith(sock + "/"):
        raise ConfigError(f"{cfg.path}: [device] mountpoint = {mnt!r}: expected a path apart from [control] socket")


def _resolve_paths(cfg: Config) -> None:
    """Strict loading: the daemon's paths as their real paths, each
    checked again by the schema and against the other."""
    keys = [("device", "mountpoint"), ("control", "socket")]
    if cfg.writeback.enable:
        keys.append(("writeback", "file"))
    for section, key in keys:
        part = getattr(cfg, section)
        value = getattr(part, key)
        try:
            real = paths.resolve_parent(value)
        except paths.UnsafePath as e:
            raise ConfigError(f"{cfg.path}: [{section}] {key} = {value!r}: {e}") from None
        except OSError as e:
            raise ConfigError(f"{cfg.path}: [{section}] {key} = {value!r}: cannot resolve: {e.strerror}") from None
        if real != value:
            setattr(part, key, check_value(cfg.path, section, key, real))
    _check_apart(cfg)


def diff(old: Config, new: Config) -> tuple[list[tuple[str, str, object]], list[str]]:
    """What a reload from ``old`` to ``new`` means: (section, key, new value)
    for each changed key that can be applied while running, in schema order,
    and the names ("[device] size") of changed keys that need a restart."""
    apply: list[tuple[str, str, object]] = []
    restart: list[str] = []
    for section, keys in SCHEMA.items():
        for key in keys:
            before, after = getattr(getattr(old, section), key), getattr(getattr(new, section), key)
            if before == after:
                continue
            if (section, key) in RELOADABLE:
                apply.append((section, key, after))
            else:
                restart.append(f"[{section}] {key}")
    return apply, restart


_BOM = b"\xef\xbb\xbf"


def _not_utf8(path: str, raw: bytes, e: UnicodeDecodeError) -> ConfigError:
    at = e.start + (len(_BOM) if raw.startswith(_BOM) else 0)  # e counts from after the mark
    line_no = raw.count(b"\n", 0, at) + 1
    start = raw.rfind(b"\n", 0, at) + 1
    end = raw.find(b"\n", at)
    line = raw[start : end if end >= 0 else len(raw)].decode("utf-8", "replace").strip()
    key = line.split("=", 1)[0].strip() if "=" in line else ""
    where = f"line {line_no}" + (f" ({_name(key)} = ...)" if key else "")
    return ConfigError(f"{path}: {where}: byte 0x{raw[at]:02x} at offset {at} is not UTF-8; expected a UTF-8 TOML file")


def load(path: str | None = None, strict: bool = False) -> Config:
    """Read ``path``; with None, the default path if it exists, else the
    embedded defaults.  ``strict``: the daemon's own reading (see the top of
    this file).  Raises ConfigError and nothing else."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            cfg = from_dict({}, "<defaults>")
            if strict:
                _resolve_paths(cfg)
            return cfg
        path = DEFAULT_PATH
    cfg = from_dict(_parse(path, strict), path)
    if strict:
        _resolve_paths(cfg)
    return cfg


def _parse(path: str, strict: bool) -> dict[str, Any]:
    opened = path
    try:
        if strict:
            opened = paths.resolve(os.path.abspath(path))
        with open(opened, "rb") as f:
            if strict:  # the file read, not a name: its directories were checked on the way
                paths.root_only(path, os.fstat(f.fileno()), "regular file")
            raw = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except paths.UnsafePath as e:
        raise ConfigError(f"{path}: {e}; zswapd runs as root and takes its paths from this file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:  # a path with a NUL in it
        raise ConfigError(f"{path!r}: not a usable path: {e}") from None
    if len(raw) > MAX_FILE_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_FILE_SIZE >> 20} MiB; expected a small TOML file")
    try:
        # A byte-order mark, as some editors write, is harmless.  (Not the
        # utf-8-sig codec: it is imported on first use, which fails once
        # privileges are dropped and the interpreter's files are root's.)
        text = raw.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML here: arrays or tables nested too deeply") from None


_SECTION_LINE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(?:#.*)?$")
_SOCKET_LINE = re.compile(r"""^\s*socket\s*=\s*("(?:[^"\\]|\\.)*"|'[^']*')\s*(?:#.*)?$""")


def _salvage_socket(path: str) -> object:
    """[control] socket as written in a file that does not load, or None:
    from the TOML if it parses, else from a ``socket = "..."`` line under
    ``[control]``, so that a typo elsewhere does not hide it."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_FILE_SIZE).removeprefix(_BOM).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    try:
        control = tomllib.loads(text).get("control")
        return control.get("socket") if isinstance(control, dict) else None
    except (tomllib.TOMLDecodeError, RecursionError):
        pass
    section = None
    for line in text.splitlines():
        if m := _SECTION_LINE.match(line):
            section = m.group(1)
        elif section == "control" and (m := _SOCKET_LINE.match(line)):
            try:
                return tomllib.loads(f"v = {m.group(1)}")["v"]
            except tomllib.TOMLDecodeError:
                return None
    return None


def control_socket(path: str | None = None) -> tuple[str, str | None]:
    """The control socket's path for the commands that only talk to the
    daemon (stats, top, status), and a warning or None.  They must work
    while the file holds an error that the running daemon refused at
    SIGHUP: if the file does not load, the warning names its error and the
    path comes from the file's [control] socket where that much can be read
    and is valid, else it is the default."""
    try:
        return load(path).control.socket, None
    except ConfigError as e:
        error = str(e)
    default = ControlConfig().socket
    raw = _salvage_socket(path or DEFAULT_PATH)
    if raw is None:
        return default, f"{error}; using the default control socket {default}"
    try:
        sock = _socket_path(raw)
    except ValueError as e:
        return default, f"{error}; [control] socket = {_show(raw)} is not usable either (expected {e}); using {default}"
    return sock, f"{error}; using its [control] socket = {sock!r}"
