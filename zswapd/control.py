"""Control socket: JSON lines over a Unix stream socket.

One request per line, ``{"cmd": ...}``; one reply per line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``.  Commands: stats, compact, set, reset_max.
Mutating commands need uid 0 (checked with SO_PEERCRED); stats is also open to
``[control] group``.  ``Controller.handle`` is separate from the socket code so
it can be fuzzed without I/O.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import trio

from . import __version__
from .config import RUNTIME_KEYS, ConfigError, check_value
from .store import Store

log = logging.getLogger("zswapd.control")

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 10.0
MAX_CLIENTS = 512
READ_ONLY = {"stats", "ping"}
MUTATING = {"compact", "set", "reset_max"}
COMPACT_STEP = 256


class Controller:
    def __init__(
        self, store: Store, device_info: Callable[[], dict[str, Any]], config_path: str, group_gid: int | None = None
    ) -> None:
        self.store = store
        self.device_info = device_info
        self.config_path = config_path
        self.group_gid = group_gid
        self.started = time.monotonic()
        self.extra_stats: Callable[[], dict[str, Any]] = dict

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        s.update(self.extra_stats())
        s["device"] = self.device_info()
        s["uptime"] = round(time.monotonic() - self.started, 3)
        s["version"] = __version__
        return s

    def _allowed(self, cmd: str, uid: int, gid: int, groups: list[int]) -> bool:
        if uid == 0:
            return True
        if cmd in READ_ONLY and self.group_gid is not None:
            return gid == self.group_gid or self.group_gid in groups
        return False

    async def handle(self, line: bytes, uid: int = 0, gid: int = 0, groups: list[int] | None = None) -> dict[str, Any]:
        """Answer one request line.  Never raises for bad input."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"invalid JSON: {e}"}
        if not isinstance(req, dict):
            return {"ok": False, "error": 'a request is a JSON object like {"cmd": "stats"}'}
        cmd = req.get("cmd")
        if not isinstance(cmd, str) or cmd not in READ_ONLY | MUTATING:
            return {
                "ok": False,
                "error": f"unknown command {cmd!r}; expected one of {', '.join(sorted(READ_ONLY | MUTATING))}",
            }
        if not self._allowed(cmd, uid, gid, groups or []):
            return {"ok": False, "error": f"permission denied: {cmd} needs root"}
        try:
            return {"ok": True, **(await getattr(self, "_cmd_" + cmd)(req))}
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not take the daemon down
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"internal error: {e}"}

    async def _cmd_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__}

    async def _cmd_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.stats()

    async def _cmd_compact(self, req: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        before = self.store.frames_used
        moved = 0
        for step in self.store.compact_steps(COMPACT_STEP):
            moved += step
            await trio.sleep(0)  # serve FUSE requests between steps
        return {
            "frames_freed": before - self.store.frames_used,
            "objects_moved": moved,
            "seconds": round(time.monotonic() - start, 6),
        }

    async def _cmd_set(self, req: dict[str, Any]) -> dict[str, Any]:
        key, value = req.get("key"), req.get("value")
        if not isinstance(key, str) or key not in RUNTIME_KEYS:
            return {"ok": False, "error": f"cannot set {key!r} at runtime; settable: {', '.join(sorted(RUNTIME_KEYS))}"}
        section, name = RUNTIME_KEYS[key]
        checked = check_value("<control>", section, name, value)
        if name == "memory_limit":
            result = self.store.set_limit(checked)
            out: dict[str, Any] = {"key": key, "value": checked, **result}
            if not result["met"]:
                out["warning"] = (
                    f"limit {checked} is below the {self.store.mem_used_total} bytes in use and compaction "
                    "cannot free enough without dropping data; nothing was dropped, new stores fail until it fits"
                )
            return out
        if name == "algorithm":
            self.store.set_algorithm(algorithm=checked)
        elif name == "zstd_level":
            self.store.set_algorithm(zstd_level=checked)
        else:
            self.store.set_accept_percent(checked)
        return {"key": key, "value": checked}

    async def _cmd_reset_max(self, req: dict[str, Any]) -> dict[str, Any]:
        self.store.reset_max()
        return {"mem_used_max": self.store.c.mem_used_max}


def _peercred(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _groups_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []


def resolve_group(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"[control] group = {name!r}: no such group") from None


class ControlServer:
    def __init__(self, controller: Controller, path: str) -> None:
        self.controller = controller
        self.path = path
        self.clients = 0

    def bind(self) -> trio.socket.SocketType:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale: the instance lock is already ours
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window in which the socket is world-usable
        try:
            plain.bind(self.path)
        finally:
            os.umask(old)
        sock = trio.socket.from_stdlib_socket(plain)
        gid = self.controller.group_gid
        if gid is not None:
            os.chown(self.path, 0, gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)
        sock.listen(1024)  # bursts of clients must not see EAGAIN
        return sock

    async def serve(self, sock: trio.socket.SocketType, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                if self.clients >= MAX_CLIENTS:
                    conn.close()
                    continue
                nursery.start_soon(self._client, conn)

    async def _client(self, conn: trio.socket.SocketType) -> None:
        self.clients += 1
        stream = trio.SocketStream(conn)
        try:
            pid, uid, gid = _peercred(conn)
            groups = _groups_of(pid) if uid != 0 else []
            buf = bytearray()
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as scope:
                    chunk = await stream.receive_some(65536)
                if scope.cancelled_caught or not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    if line.strip():
                        reply = await self.controller.handle(line, uid, gid, groups)
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                if len(buf) > MAX_LINE:
                    err = {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
                    await stream.send_all(json.dumps(err).encode() + b"\n")
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.clients -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()


def prometheus(s: dict[str, Any]) -> str:
    """Prometheus text exposition of the stats reply."""
    out: list[str] = []
    gauges = {
        "orig_data_size": "Bytes of pages stored, uncompressed (zram mm_stat)",
        "compr_data_size": "Bytes of compressed payload stored",
        "mem_used_total": "Bytes of pool frames in use",
        "mem_limit": "Memory limit in bytes (0 = none)",
        "mem_used_max": "Peak of mem_used_total",
        "same_pages": "Same-filled pages stored",
        "huge_pages": "Incompressible pages stored raw",
        "pages_stored": "Pages stored",
        "metadata_bytes": "Bytes of metadata (page table, handles, zspages)",
        "full": "1 while the pool refuses stores",
    }
    counters = {
        "pages_compacted": "Frames freed by compaction",
        "failed_reads": "Failed reads",
        "failed_writes": "Failed writes",
        "notify_free": "Pages freed by discard",
        "compactions": "Compaction runs",
        "limit_hits": "Stores that hit the memory limit",
    }
    for name, help_ in gauges.items():
        out += [f"# HELP zswapd_{name} {help_}", f"# TYPE zswapd_{name} gauge", f"zswapd_{name} {int(s[name])}"]
    for name, help_ in counters.items():
        out += [
            f"# HELP zswapd_{name}_total {help_}",
            f"# TYPE zswapd_{name}_total counter",
            f"zswapd_{name}_total {int(s[name])}",
        ]
    out += ["# HELP zswapd_class_frames_used Frames used per size class", "# TYPE zswapd_class_frames_used gauge"]
    for c in s["classes"]:
        out.append(f'zswapd_class_frames_used{{size="{c["size"]}"}} {c["frames_used"]}')
    return "\n".join(out) + "\n"


async def serve_metrics(controller: Controller, listen: str, render: Callable[[dict[str, Any]], str]) -> None:
    """A minimal HTTP/1.0 endpoint for Prometheus: any GET gets the metrics."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(IDLE_TIMEOUT):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
                if not head.startswith(b"GET "):
                    await stream.send_all(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    return
                body = render(controller.stats()).encode()
                await stream.send_all(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_tcp(handler, int(port), host=host or None)


def request(path: str, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Blocking client: send one request, return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(cmd).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply
