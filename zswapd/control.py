"""Control socket: JSON lines over a Unix stream socket.

One request per line, ``{"cmd": ...}``; one reply per line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``.  Commands: stats, compact, set, reset_max.
Mutating commands need uid 0 (checked with SO_PEERCRED); stats is also open to
``[control] group``.  ``Controller.handle`` is separate from the socket code so
it can be fuzzed without I/O.

Fail closed: this module runs in the nursery that serves swap, so nothing a
client sends, and no bug in a handler, may raise out of it.  A handler bug is
logged with its traceback and answered ``internal error``; a bug in one
client's connection code closes that client only; the accept loops log their
errors and go on.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import math
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable
from itertools import accumulate
from typing import Any

import trio

from . import __version__
from .config import RUNTIME_KEYS, ConfigError, check_value
from .errors import BadRequest
from .store import Store

log = logging.getLogger("zswapd.control")

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 10.0
# A request line must be complete this long after its first byte: the idle
# timeout alone lets a client that sends a byte every few seconds keep its
# slot for ever.  zswapd's own client sends a line in one write.
LINE_TIMEOUT = 30.0
# A client that has not taken a reply within this long is dropped: replies
# are small, so only a client that stopped reading gets near it.
SEND_TIMEOUT = 5.0
# Connections at once.  Peers other than root get at most MAX_CLIENTS_NON_ROOT
# of them, so members of [control] group cannot lock root out.  The sum stays
# well under the usual 1024 open files.
MAX_CLIENTS = 512
MAX_CLIENTS_NON_ROOT = 256
# json.loads recurses per nesting level (RecursionError near 1000) and turns
# digit strings over 4300 long into a ValueError: bound both before decoding.
# No request needs more than 2 levels or a 20-digit number.
MAX_DEPTH = 32
MAX_NUMBER = 40
# The widest integer any setting takes: a 64-bit byte count.
MAX_INT = (1 << 63) - 1
READ_ONLY = {"stats", "ping"}
MUTATING = {"compact", "set", "reset_max", "reload"}
COMPACT_STEP = 256
# After a failed accept (EMFILE, ENFILE, ENOBUFS...): wait, then try again.
ACCEPT_RETRY = 0.1

# A JSON string, or an unterminated one up to the end of the line.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|$)', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_LONG_NUMBER = re.compile(rf"[0-9.eE+-]{{{MAX_NUMBER + 1},}}")


class RequestError(ValueError):
    """A request refused before it reaches a command: the reply's error."""


class RateLimitedLog:
    """At most one message per interval; says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self.next = 0.0
        self.held = 0

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self.next:
            self.held += 1
            return
        if self.held:
            msg += f" ({self.held} more like this in the last {self.interval:g} s not logged)"
            self.held = 0
        self.next = now + self.interval
        self.logger.log(level, msg, *args, exc_info=exc_info)


def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not allowed; expected a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"number {text} is out of range; expected a finite number")
    return value


def decode_request(line: bytes) -> Any:
    """The JSON value of a request line.  Raises RequestError naming what is
    wrong, never anything else, whatever the bytes."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request is not valid UTF-8 (byte {e.start}); expected a UTF-8 JSON object") from None
    # Strings may hold any brackets and digits: only what is outside counts.
    bare = _STRING.sub('""', text)
    if bare.count("[") + bare.count("{") > MAX_DEPTH:
        depths = accumulate(1 if c in "[{" else -1 for c in _BRACKET.findall(bare))
        if any(depth > MAX_DEPTH for depth in depths):
            raise RequestError(f"request nests more than {MAX_DEPTH} levels deep; expected at most {MAX_DEPTH}")
    if _LONG_NUMBER.search(bare):
        raise RequestError(f"a number in the request is longer than {MAX_NUMBER} characters; expected a 64-bit value")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RequestError:
        raise
    except (ValueError, RecursionError) as e:
        raise RequestError(f"invalid JSON: {e}") from None


def _check_width(key: str, value: Any) -> None:
    """Config checks ranges per key; this keeps every setting within 64 bits
    where the key has no upper bound of its own (memory_limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
        raise RequestError(f"{key} = {value}: out of range; expected at most {MAX_INT} (64 bits)")


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line.  A reply that is not plain JSON is a bug: it becomes an
    error reply, never a broken line or an exception."""
    try:
        return json.dumps(reply, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as e:
        log.exception("control reply not encodable")
        return json.dumps({"ok": False, "error": f"internal error: reply not encodable: {e}"}).encode() + b"\n"


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
        # Set by the worker: ask the supervisor for a worker running the
        # code installed now.  None where there is no supervisor.
        self.replace_worker: Callable[[], None] | None = None
        self.internal_errors = 0

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
        """Answer one request line.  Never raises for bad input; a bug is
        logged with its traceback and answered ``internal error: ...``."""
        cmd: object = None
        try:
            req = decode_request(line)
            if not isinstance(req, dict):
                return {"ok": False, "error": 'a request is a JSON object like {"cmd": "stats"}'}
            cmd = req.get("cmd")
            if not isinstance(cmd, str) or cmd not in READ_ONLY | MUTATING:
                shown = repr(cmd)
                if len(shown) > 80:
                    shown = shown[:77] + "..."
                return {
                    "ok": False,
                    "error": f"unknown command {shown}; expected one of {', '.join(sorted(READ_ONLY | MUTATING))}",
                }
            if not self._allowed(cmd, uid, gid, groups or []):
                return {"ok": False, "error": f"permission denied: {cmd} needs root"}
            return {"ok": True, **(await getattr(self, "_cmd_" + cmd)(req))}
        except (RequestError, ConfigError, BadRequest) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not take the daemon down
            self.internal_errors += 1
            log.exception("control command %s failed", cmd if isinstance(cmd, str) else "(unparsed)")
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

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
            shown = repr(key)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise RequestError(f"cannot set {shown} at runtime; settable: {', '.join(sorted(RUNTIME_KEYS))}")
        section, name = RUNTIME_KEYS[key]
        checked = check_value("<control>", section, name, value)
        _check_width(key, checked)
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

    async def _cmd_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.replace_worker is None:
            return {"ok": False, "error": "reload needs the supervisor (zswapd run); this server has none"}
        self.replace_worker()
        return {"replacing_worker": os.getpid()}

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
    except (OSError, ValueError):
        pass
    return []


def resolve_group(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"[control] group = {name!r}: no such group") from None


def _refuse(conn: trio.socket.SocketType, message: str) -> None:
    """Best effort, never blocking: say why, then close."""
    try:
        os.write(conn.fileno(), json.dumps({"ok": False, "error": message}).encode() + b"\n")  # non-blocking fd
    except OSError:
        pass
    conn.close()


async def _close(stream: trio.SocketStream | None, conn: trio.socket.SocketType) -> None:
    with trio.CancelScope(shield=True):
        try:
            if stream is not None:
                await stream.aclose()
            else:
                conn.close()
        except Exception:
            pass


def _accept_error_hint(e: OSError) -> str:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return " (out of file descriptors; new connections wait)"
    return ""


def bind_control_socket(path: str, gid: int | None) -> socket.socket:
    """The listening socket, root's, mode 0600 (0660 for ``gid``).  Its
    directory was checked by paths.safe_parent; a leftover socket there is a
    dead instance's (the instance lock is ours)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which the socket is world-usable
    try:
        plain.bind(path)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    plain.listen(1024)  # bursts of clients must not see EAGAIN
    return plain


class ControlServer:
    def __init__(self, controller: Controller, path: str) -> None:
        self.controller = controller
        self.path = path
        self.clients = 0
        self.non_root_clients = 0
        self._accept_log = RateLimitedLog(log)
        self._refuse_log = RateLimitedLog(log)
        self._client_log = RateLimitedLog(log, 1.0)

    def bind(self) -> trio.socket.SocketType:
        return trio.socket.from_stdlib_socket(bind_control_socket(self.path, self.controller.group_gid))

    async def serve(self, sock: trio.socket.SocketType, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled.  Never raises: every client runs isolated,
        and if the accept loop itself fails it is logged and started again."""
        task_status.started()
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    await self._accept_loop(sock, nursery)
            except Exception:
                log.exception("control server failed; restarting it")
                await trio.sleep(ACCEPT_RETRY)

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                self._accept_log(logging.ERROR, "control socket: accept failed: %s%s", e, _accept_error_hint(e))
                await trio.sleep(ACCEPT_RETRY)
                continue
            try:
                pid, uid, gid = _peercred(conn)
            except OSError as e:
                self._refuse_log(logging.WARNING, "control socket: no peer credentials (%s); connection closed", e)
                conn.close()
                continue
            if self.clients >= MAX_CLIENTS or (uid != 0 and self.non_root_clients >= MAX_CLIENTS_NON_ROOT):
                limit = MAX_CLIENTS if uid == 0 else MAX_CLIENTS_NON_ROOT
                self._refuse_log(
                    logging.WARNING,
                    "control socket: %d connections open; refused pid %d uid %d",
                    self.clients,
                    pid,
                    uid,
                )
                _refuse(
                    conn,
                    f"too many connections ({limit} open for {'root' if uid == 0 else 'non-root'} peers); try again later",
                )
                continue
            # Counted here, not in the task: a burst is accepted before any
            # client task runs, and must not get past the cap.
            self.clients += 1
            if uid != 0:
                self.non_root_clients += 1
            nursery.start_soon(self._client, conn, pid, uid, gid)

    async def _client(self, conn: trio.socket.SocketType, pid: int, uid: int, gid: int) -> None:
        """Runs with its slot already counted by the accept loop."""
        stream: trio.SocketStream | None = None
        try:
            stream = trio.SocketStream(conn)
            await self._converse(stream, pid, uid, gid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug here closes this client only
            self._client_log(logging.ERROR, "control client pid %d uid %d failed; closed it", pid, uid, exc_info=True)
        finally:
            self.clients -= 1
            if uid != 0:
                self.non_root_clients -= 1
            await _close(stream, conn)

    async def _converse(self, stream: trio.SocketStream, pid: int, uid: int, gid: int) -> None:
        groups = _groups_of(pid) if uid != 0 else []
        buf = bytearray()
        line_deadline = math.inf
        while True:
            with trio.move_on_at(min(trio.current_time() + IDLE_TIMEOUT, line_deadline)) as scope:
                chunk = await stream.receive_some(65536)
            if scope.cancelled_caught and trio.current_time() >= line_deadline:
                err = {"ok": False, "error": f"request line not finished within {LINE_TIMEOUT:g} s; closing"}
                await self._send(stream, encode_reply(err), pid, uid)
                return
            if scope.cancelled_caught or not chunk:
                return
            buf += chunk
            consumed = b"\n" in buf
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf = bytearray(rest)
                if line.strip():
                    reply = await self.controller.handle(line, uid, gid, groups)
                    if not await self._send(stream, encode_reply(reply), pid, uid):
                        return
            if not buf:
                line_deadline = math.inf
            elif consumed or line_deadline == math.inf:
                line_deadline = trio.current_time() + LINE_TIMEOUT
            if len(buf) > MAX_LINE:
                err = {
                    "ok": False,
                    "error": f"request line longer than {MAX_LINE} bytes; expected one JSON object per line",
                }
                await self._send(stream, encode_reply(err), pid, uid)
                return

    async def _send(self, stream: trio.SocketStream, data: bytes, pid: int, uid: int) -> bool:
        """False if the client did not take the reply in SEND_TIMEOUT: it is
        then dropped, so it holds up nothing but itself."""
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(data)
            return True
        self._client_log(
            logging.WARNING,
            "control client pid %d uid %d did not read its replies for %g s; dropped",
            pid,
            uid,
            SEND_TIMEOUT,
        )
        return False


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
        "num_reads": "Read requests served (swap-ins; a request is one or more pages)",
        "num_writes": "Write requests served (swap-outs; a request is one or more pages)",
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
    proc = s.get("process")
    if isinstance(proc, dict):  # a worker under a supervisor (zswapd run)
        out += [
            "# HELP zswapd_worker_restarts_total Workers replaced, by a crash or a reload, since the device was made",
            "# TYPE zswapd_worker_restarts_total counter",
            f"zswapd_worker_restarts_total {int(proc['worker_restarts'])}",
        ]
    out += ["# HELP zswapd_class_frames_used Frames used per size class", "# TYPE zswapd_class_frames_used gauge"]
    for c in s["classes"]:
        out.append(f'zswapd_class_frames_used{{size="{c["size"]}"}} {c["frames_used"]}')
    return "\n".join(out) + "\n"


METRICS_MAX_CLIENTS = 16
METRICS_TIMEOUT = 5.0
METRICS_MAX_HEAD = 8192
METRICS_RETRY_MAX = 60.0


def _metrics_address(listen: str) -> tuple[str, int]:
    """HOST:PORT, IPv6 in brackets (config.py has checked the form)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


async def _bind_metrics(host: str, port: int) -> trio.socket.SocketType:
    """One listening socket on the one address given: trio.serve_tcp would
    bind every address a name resolves to."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    family, type_, proto, _, addr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(addr)
        sock.listen(METRICS_MAX_CLIENTS)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_metrics(controller: Controller, listen: str, render: Callable[[dict[str, Any]], str]) -> None:
    """A minimal HTTP/1.0 endpoint for Prometheus: any GET gets the metrics.

    Never raises: a bind failure (port in use) is logged and retried with
    backoff; at most METRICS_MAX_CLIENTS connections are served at once, each
    for at most METRICS_TIMEOUT reading and as long sending, so the listener
    cannot be used to exhaust the daemon's file descriptors or stall it."""
    try:
        host, port = _metrics_address(listen)
    except ValueError:
        log.error("metrics_listen = %r: expected HOST:PORT; metrics are off", listen)
        return
    if not host:
        log.error("metrics_listen = %r: no host; expected HOST:PORT (e.g. 127.0.0.1:9577); metrics are off", listen)
        return
    delay = 1.0
    failed = False
    while True:
        try:
            sock = await _bind_metrics(host, port)
        except OSError as e:
            level = logging.DEBUG if failed else logging.ERROR
            log.log(level, "metrics_listen = %r: cannot listen: %s; metrics are off, retrying in %g s "
                    "(then at most every %g s)", listen, e.strerror or e, delay, METRICS_RETRY_MAX)  # fmt: skip
            failed = True
            await trio.sleep(delay)
            delay = min(delay * 2, METRICS_RETRY_MAX)
            continue
        except Exception:
            log.exception("metrics_listen = %r: cannot listen", listen)
            await trio.sleep(delay)
            delay = min(delay * 2, METRICS_RETRY_MAX)
            continue
        log.info("metrics on %s", listen if not failed else f"{listen} (after retrying)")
        try:
            await _metrics_accept_loop(sock, controller, render)
        except Exception:
            log.exception("metrics listener failed; restarting it")
        finally:
            sock.close()
        await trio.sleep(delay)


async def _metrics_accept_loop(
    sock: trio.socket.SocketType, controller: Controller, render: Callable[[dict[str, Any]], str]
) -> None:
    active = 0
    accept_log = RateLimitedLog(log)
    refuse_log = RateLimitedLog(log)

    async def handler(conn: trio.socket.SocketType) -> None:
        nonlocal active
        stream: trio.SocketStream | None = None
        try:
            stream = trio.SocketStream(conn)
            await _metrics_exchange(stream, controller, render)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            active -= 1
            await _close(stream, conn)

    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                accept_log(logging.ERROR, "metrics: accept failed: %s%s", e, _accept_error_hint(e))
                await trio.sleep(ACCEPT_RETRY)
                continue
            if active >= METRICS_MAX_CLIENTS:
                refuse_log(logging.WARNING, "metrics: %d connections open; closing new ones", active)
                conn.close()
                continue
            active += 1  # here, not in the task: a burst must not get past the cap
            nursery.start_soon(handler, conn)


async def _metrics_exchange(
    stream: trio.SocketStream, controller: Controller, render: Callable[[dict[str, Any]], str]
) -> None:
    head = b""
    with trio.move_on_after(METRICS_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < METRICS_MAX_HEAD:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
    if not head:
        return
    if not head.startswith(b"GET "):
        response = b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
    else:
        try:
            body = render(controller.stats()).encode()
        except Exception:
            log.exception("metrics: rendering the stats failed")
            response = b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
        else:
            response = (
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
    with trio.move_on_after(METRICS_TIMEOUT):
        await stream.send_all(response)


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
