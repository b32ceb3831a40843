"""Control socket: JSON lines over a Unix stream socket.

One request per line, ``{"cmd": ...}``; one reply per line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``.  Commands: stats, compact, recompress, set, reset_max.
Mutating commands need uid 0 (checked with SO_PEERCRED); stats is also open to
``[control] group``.  ``Controller.handle`` is separate from the socket code so
it can be fuzzed without I/O.

Fail closed: this module runs in the nursery that serves swap, so nothing a
client sends, and no bug in a handler, may raise out of it.  A handler bug is
logged with its traceback and answered ``internal error``; a bug in one
client's connection code closes that client only; the accept loops log their
errors and go on.

Bounded work per byte: a request line is decoded by ``json.loads`` (linear
in its length, no pre-scan that could backtrack), its length is checked as
bytes arrive, and every line, blank ones included, is a request that yields
to the other tasks and counts against its peer's rate (``PeerLimits``).  Each
peer uid other than root has a cap on its connections and on its requests
per second, on the control socket and the metrics listener alike, so one
member of ``[control] group`` can neither hold every slot nor keep the
worker's event loop busy; root's reserved slots stay free for root.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import math
import os
import pwd
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import __version__, paths
from .config import RUNTIME_KEYS, ConfigError, RecompressConfig, check_value
from .errors import BadRequest
from .ratelog import RateLimitedLog
from .recompress import Recompressor, idle_ticks
from .store import METRICS, Store

log = logging.getLogger("zswapd.control")

MAX_LINE = 64 * 1024
# Read at most this much at a time: a line and its newline fit in one read.
RECEIVE_SIZE = MAX_LINE + 1
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
# Each uid other than root: at most this many connections at once, and this
# many requests a second (blank lines count) after a burst of CONTROL_BURST.
# zswapd's own clients use one connection and a few requests a second (a
# reload polls stats 20 times a second, as root); a member of [control]
# group that goes beyond waits for its turn: its requests are answered
# later, nobody else's.
MAX_CLIENTS_PER_UID = 16
CONTROL_RATE = 50.0
CONTROL_BURST = 100
# json.loads recurses per nesting level (RecursionError near 1000) and turns
# digit strings over 4300 long into a ValueError: the depth is checked on the
# decoded value, numbers by the parse hooks before int() or float() sees
# them.  No request needs more than 2 levels or a 20-digit number.
MAX_DEPTH = 32
MAX_NUMBER = 40
# The widest integer any setting takes: a 64-bit byte count.
MAX_INT = (1 << 63) - 1
READ_ONLY = {"stats", "ping"}
MUTATING = {"compact", "recompress", "set", "reset_max", "reload", "writeback"}
COMPACT_STEP = 256
# After a failed accept (EMFILE, ENFILE, ENOBUFS...): wait, then try again.
ACCEPT_RETRY = 0.1


class RequestError(ValueError):
    """A request refused before it reaches a command: the reply's error."""


def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not allowed; expected a finite number")


_LONG_NUMBER = f"a number in the request is longer than {MAX_NUMBER} characters; expected a 64-bit value"


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER:
        raise RequestError(_LONG_NUMBER)
    return int(text)


def _finite_float(text: str) -> float:
    if len(text) > MAX_NUMBER:
        raise RequestError(_LONG_NUMBER)
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"number {text} is out of range; expected a finite number")
    return value


def _too_deep(value: Any) -> bool:
    """Whether a decoded value nests deeper than MAX_DEPTH (an object or a
    list is one level).  Iterative: linear in the value's size."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return False


def decode_request(line: bytes) -> Any:
    """The JSON value of a request line.  Raises RequestError naming what is
    wrong, never anything else, whatever the bytes.  Linear in the line's
    length: json.loads scans once, the hooks see each number once, and the
    depth check visits each container once."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request is not valid UTF-8 (byte {e.start}); expected a UTF-8 JSON object") from None
    deep = RequestError(f"request nests more than {MAX_DEPTH} levels deep; expected at most {MAX_DEPTH}")
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_reject_constant)
    except RequestError:
        raise
    except RecursionError:
        raise deep from None
    except ValueError as e:
        raise RequestError(f"invalid JSON: {e}") from None
    if _too_deep(value):
        raise deep
    return value


def _check_width(key: str, value: Any) -> None:
    """Config checks ranges per key; this keeps every setting within 64 bits
    where the key has no upper bound of its own (memory_limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
        raise RequestError(f"{key} = {value}: out of range; expected at most {MAX_INT} (64 bits)")


# A reply that cannot be encoded is a bug a client can hit again and again.
_encode_log = RateLimitedLog(log)


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line.  A reply that is not plain JSON is a bug: it becomes an
    error reply, never a broken line or an exception."""
    try:
        return json.dumps(reply, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as e:
        _encode_log(logging.ERROR, "control reply not encodable", exc_info=True)
        return json.dumps({"ok": False, "error": f"internal error: reply not encodable: {e}"}).encode() + b"\n"


class Controller:
    def __init__(
        self, store: Store, device_info: Callable[[], dict[str, Any]], config_path: str, group_gid: int | None = None
    ) -> None:
        self.store = store
        self.device_info = device_info
        self.config_path = config_path
        self.group_gid = group_gid
        # Who the metrics listener answers: "group" (root and group_gid's
        # members, on this machine) or "any" ([control] metrics_access).
        self.metrics_access = "group"
        self.started = time.monotonic()
        self.extra_stats: Callable[[], dict[str, Any]] = dict
        # Set by the worker: ask the supervisor for a worker running the
        # code installed now.  None where there is no supervisor.
        self.replace_worker: Callable[[], None] | None = None
        # Set by the worker: one writeback pass (max_pages, idle_age) ->
        # (pages, bytes, why it stopped), run in bounded steps.
        self.writeback_pass: Callable[[int, int | None], Awaitable[tuple[int, int, str]]] | None = None
        # Set by the worker: the recompression policy, and how `set` changes
        # one of its [recompress] keys.  None: a pass runs on the store alone.
        self.recompressor: Recompressor | None = None
        self.set_recompress: Callable[[str, Any], None] | None = None
        self.internal_errors = 0
        # A request that hits a bug can be sent again and again.
        self._bug_log = RateLimitedLog(log)

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
            shown = cmd if isinstance(cmd, str) else "(unparsed)"
            self._bug_log(logging.ERROR, "control command %s failed", shown, exc_info=True)
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

    async def _cmd_recompress(self, req: dict[str, Any]) -> dict[str, Any]:
        """A recompression pass now, outside the budget (zram's recompress):
        ``idle_age`` seconds (default [recompress] idle_age), ``max_pages``,
        ``threshold`` bytes.  Trains a dictionary first if there is none
        and one is configured (not past the watermark).  Answers when the
        pass is done."""
        rec = self.recompressor
        cfg = rec.config() if rec is not None else RecompressConfig()
        idle = check_value("<control>", "recompress", "idle_age", req.get("idle_age", cfg.idle_age))
        threshold = check_value("<control>", "recompress", "threshold", req.get("threshold", cfg.threshold))
        max_pages = req.get("max_pages")
        if max_pages is not None and (isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 0):
            raise RequestError(f"max_pages = {max_pages!r}: expected a non-negative integer")
        start = time.monotonic()
        if rec is None:  # a bare controller (tests): the store's pass, inline
            out: dict[str, Any] = {**self.store.recompress(idle_ticks(idle), threshold, cfg.level, max_pages)}
            out["cpu_seconds"] = 0.0
        else:
            self.store.tick(time.monotonic())
            # as the policy: no training past the watermark (its samples and
            # zstd's trainer take tens of MiB, locked in)
            if cfg.dictionary_size and not self.store.dictionary_slot() and not rec.pressure()[0]:
                await rec.train(idle_ticks(idle), cfg.dictionary_size, budget=False)
            out = await rec.run_pass(idle_ticks(idle), threshold, cfg.level, max_pages, budget=False)
        dicts = self.store.engine.dictionaries()
        slot = self.store.dictionary_slot()
        out["dictionary"] = next((i for s, i, _n, _r in dicts if s == slot), None)
        out["seconds"] = round(time.monotonic() - start, 6)
        return out

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
        if section == "recompress":
            if self.set_recompress is None:
                raise RequestError(f"{key}: this server has no recompression policy")
            self.set_recompress(name, checked)
            return {"key": key, "value": checked}
        return {"key": key, "value": checked, **self.store.apply_setting(name, checked)}

    async def _cmd_writeback(self, req: dict[str, Any]) -> dict[str, Any]:
        """zram's `echo idle > writeback`: one pass, answered when done."""
        max_pages, idle_age = req.get("max_pages", 0), req.get("idle_age")
        for name, v in (("max_pages", max_pages), ("idle_age", idle_age)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT):
                raise RequestError(f"{name} must be an integer >= 0, got {v!r}")
        if not self.store.backed or self.writeback_pass is None:
            raise RequestError("no backing file: set [writeback] enable, file and size, and restart zswapd")
        start = time.monotonic()
        pages, nbytes, stopped = await self.writeback_pass(max_pages or 0, idle_age)
        return {"pages": pages, "bytes": nbytes, "stopped": stopped, "seconds": round(time.monotonic() - start, 6)}

    async def _cmd_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.replace_worker is None:
            return {"ok": False, "error": "reload needs the supervisor (zswapd run); this server has none"}
        self.replace_worker()
        return {"replacing_worker": os.getpid()}

    async def _cmd_reset_max(self, req: dict[str, Any]) -> dict[str, Any]:
        self.store.reset_max()
        return {"mem_used_max": self.store.c.mem_used_max}


class PeerLimits:
    """Per-uid caps for one listener: connections at once, and requests per
    second.  The rate is a virtual schedule (GCRA): each request takes the
    next slot, ``1 / rate`` after the last one taken, and may run as soon as
    its slot is at most ``burst`` slots ahead of now.  Root is not capped
    here; the listener's reserved slots keep root served."""

    def __init__(self, max_conns: int, rate: float, burst: int) -> None:
        self.max_conns = max_conns
        self.interval = 1.0 / rate
        self.burst = burst
        self.conns: Counter[int] = Counter()
        self._next: dict[int, float] = {}  # per uid: the next free slot

    def admit(self, uid: int) -> bool:
        """Count a new connection of ``uid``; False if it is at its cap."""
        if uid == 0:
            return True
        if self.conns[uid] >= self.max_conns:
            return False
        self.conns[uid] += 1
        return True

    def release(self, uid: int) -> None:
        if uid == 0:
            return
        self.conns[uid] -= 1
        if self.conns[uid] <= 0:
            del self.conns[uid]
            if self._next.get(uid, 0.0) <= trio.current_time():
                self._next.pop(uid, None)  # back on schedule: nothing to remember

    def _slot(self, uid: int) -> tuple[float, float]:
        """(the uid's next slot, the time a request in it may run)."""
        now = trio.current_time()
        slot = max(self._next.get(uid, now), now)
        return slot, slot - (self.burst - 1) * self.interval

    async def request(self, uid: int) -> None:
        """Wait for ``uid``'s turn; for root, only yield.  Either way the
        other tasks run before the request does."""
        if uid == 0:
            await trio.lowlevel.checkpoint()
            return
        slot, start = self._slot(uid)
        self._next[uid] = slot + self.interval
        await trio.sleep_until(start)

    def try_request(self, uid: int) -> bool:
        """Take ``uid``'s next slot if it may run now; never waits."""
        if uid == 0:
            return True
        slot, start = self._slot(uid)
        if start > trio.current_time():
            return False
        self._next[uid] = slot + self.interval
        return True


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
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise paths.UnsafePath(f"{path} exists and is not a socket; expected the control socket's path, free")
        os.unlink(path)
    except FileNotFoundError:
        pass
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # no window in which the socket is world-usable
        try:
            plain.bind(path)
        finally:
            os.umask(old)
        set_socket_access(path, gid)
        plain.listen(1024)  # bursts of clients must not see EAGAIN
    except BaseException:
        plain.close()
        raise
    return plain


def set_socket_access(path: str, gid: int | None) -> None:
    """Give the socket bound at ``path`` to root and ``gid`` (0660), or to
    root alone (0600).  The directory is checked again (paths.safe_parent),
    the name is opened without following a symlink and must be a socket,
    and owner and mode are set on that inode (through /proc/self/fd), so
    nothing put at the name in its place is chowned.  Raises
    paths.UnsafePath or OSError."""
    paths.safe_parent(path)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise paths.UnsafePath(f"{path} is not a socket (a symlink?); expected the control socket the daemon bound")
        os.chown(f"/proc/self/fd/{fd}", 0, gid if gid is not None else 0)
        os.chmod(f"/proc/self/fd/{fd}", 0o660 if gid is not None else 0o600)
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, controller: Controller, path: str) -> None:
        self.controller = controller
        self.path = path
        self.clients = 0
        self.non_root_clients = 0
        self.limits = PeerLimits(MAX_CLIENTS_PER_UID, CONTROL_RATE, CONTROL_BURST)
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
                why = f"{limit} open for {'root' if uid == 0 else 'non-root'} peers"
            elif not self.limits.admit(uid):
                why = f"{MAX_CLIENTS_PER_UID} open for uid {uid}"
            else:
                why = ""
            if why:
                self._refuse_log(logging.WARNING, "control socket: too many connections (%s); refused pid %d uid %d",
                                 why, pid, uid)  # fmt: skip
                _refuse(conn, f"too many connections ({why}); try again later")
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
            self.limits.release(uid)
            await _close(stream, conn)

    async def _converse(self, stream: trio.SocketStream, pid: int, uid: int, gid: int) -> None:
        """Lines in, replies out.  The buffer holds at most one unfinished
        line of MAX_LINE bytes plus one chunk: a line is refused once it is
        longer, finished or not, and lines are cut without copying the rest
        of the buffer.  Each line, blank or not, waits for its peer's turn
        (PeerLimits.request), which also lets every other task run first."""
        groups = _groups_of(pid) if uid != 0 else []
        buf = bytearray()
        line_deadline = math.inf
        while True:
            with trio.move_on_at(min(trio.current_time() + IDLE_TIMEOUT, line_deadline)) as scope:
                chunk = await stream.receive_some(RECEIVE_SIZE)
            if scope.cancelled_caught and trio.current_time() >= line_deadline:
                err = {"ok": False, "error": f"request line not finished within {LINE_TIMEOUT:g} s; closing"}
                await self._send(stream, encode_reply(err), pid, uid)
                return
            if scope.cancelled_caught or not chunk:
                return
            searched = len(buf)  # no newline in what was there before
            buf += chunk
            start = 0
            while (end := buf.find(b"\n", max(start, searched))) >= 0:
                if end - start > MAX_LINE:
                    break
                line = bytes(buf[start:end])
                start = end + 1
                await self.limits.request(uid)
                if line.strip():
                    reply = await self.controller.handle(line, uid, gid, groups)
                    if not await self._send(stream, encode_reply(reply), pid, uid):
                        return
            if len(buf) - start > MAX_LINE:  # what is left has no newline within MAX_LINE
                err = {
                    "ok": False,
                    "error": f"request line longer than {MAX_LINE} bytes; expected one JSON object per line",
                }
                await self._send(stream, encode_reply(err), pid, uid)
                return
            del buf[:start]
            if not buf:
                line_deadline = math.inf
            elif start or line_deadline == math.inf:
                line_deadline = trio.current_time() + LINE_TIMEOUT

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
    for key, (name, kind, help_) in METRICS.items():
        metric = f"zswapd_{name}_total" if kind == "counter" else f"zswapd_{name}"
        out += [f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}", f"{metric} {int(s[key])}"]
    proc = s.get("process")
    if isinstance(proc, dict):  # a worker under a supervisor (zswapd run)
        out += [
            "# HELP zswapd_worker_restarts_total Workers replaced, by a crash or a reload, since the device was made",
            "# TYPE zswapd_worker_restarts_total counter",
            f"zswapd_worker_restarts_total {int(proc['worker_restarts'])}",
            "# HELP zswapd_supervisor_restarts_total Supervisors replaced (by systemd, or adopted) since the device was made",
            "# TYPE zswapd_supervisor_restarts_total counter",
            f"zswapd_supervisor_restarts_total {int(proc.get('supervisor_restarts', 0))}",
        ]
    wb = s.get("writeback")
    if isinstance(wb, dict):
        for name, help_ in (
            ("size", "Backing file size in bytes"),
            ("live_bytes", "Bytes of live objects in the backing file"),
            ("dead_bytes", "Bytes of dead objects in the backing file, for cleaning"),
            ("written_today", "Bytes written back today (UTC), against daily_limit"),
            ("daily_limit", "Bytes writeback may write per day (0 = none)"),
            ("read_latency_p99_us", "Bound of the 99th percentile of backed page reads, microseconds"),
        ):
            value = wb.get(name)
            if value is not None:
                out += [
                    f"# HELP zswapd_writeback_{name} {help_}",
                    f"# TYPE zswapd_writeback_{name} gauge",
                    f"zswapd_writeback_{name} {int(value)}",
                ]
    out += ["# HELP zswapd_class_frames_used Frames used per size class", "# TYPE zswapd_class_frames_used gauge"]
    for c in s["classes"]:
        out.append(f'zswapd_class_frames_used{{size="{c["size"]}"}} {c["frames_used"]}')
    out += _tier_metrics(s)
    return "\n".join(out) + "\n"


def _tier_metrics(s: dict[str, Any]) -> list[str]:
    """The recompression tier's metrics: pages recompressed now and the CPU
    spent, pages and bytes per codec, the dictionaries and the idle
    histogram (its counters are engine.Counters', exported with the rest)."""
    r = s.get("recompress")
    if not isinstance(r, dict):
        return []
    out: list[str] = []
    for name, key, kind, help_ in (
        ("recompressed_pages", "pages", "gauge", "Pages stored recompressed now"),
        # only grows (saved across takeovers): a counter, so rate() applies
        ("recompress_cpu_seconds_total", "cpu_seconds", "counter", "CPU seconds spent recompressing and training"),
    ):
        out += [f"# HELP zswapd_{name} {help_}", f"# TYPE zswapd_{name} {kind}", f"zswapd_{name} {r[key]}"]
    out += ["# HELP zswapd_codec_pages Pages stored per codec", "# TYPE zswapd_codec_pages gauge"]
    out += ["# HELP zswapd_codec_bytes Payload bytes stored per codec", "# TYPE zswapd_codec_bytes gauge"]
    for c in s.get("codecs", []):
        labels = f'codec="{c["codec"]}",tier="{c["tier"]}",dictionary="{c["dictionary"] or ""}"'
        out.append(f"zswapd_codec_pages{{{labels}}} {c['pages']}")
        out.append(f"zswapd_codec_bytes{{{labels}}} {c['bytes']}")
    out += ["# HELP zswapd_dictionary_bytes Bytes of each dictionary", "# TYPE zswapd_dictionary_bytes gauge"]
    out += ["# HELP zswapd_dictionary_pages Pages using each dictionary", "# TYPE zswapd_dictionary_pages gauge"]
    for d in r.get("dictionaries", []):
        out.append(f'zswapd_dictionary_bytes{{id="{d["id"]}"}} {d["bytes"]}')
        out.append(f'zswapd_dictionary_pages{{id="{d["id"]}"}} {d["pages"]}')
    out += [
        "# HELP zswapd_idle_pages Stored pages by idle age (lower bound, seconds)",
        "# TYPE zswapd_idle_pages gauge",
    ]
    for b in s.get("idle", []):
        out.append(f'zswapd_idle_pages{{min_age_seconds="{b["min_age_seconds"]}"}} {b["pages"]}')
    return out


METRICS_MAX_CLIENTS = 16
# Of METRICS_MAX_CLIENTS, peers other than root hold at most this many, each
# uid (remote peers together count as one) at most METRICS_MAX_PER_UID and
# METRICS_RATE new connections a second after a burst: a scraper needs one
# every few seconds.
METRICS_MAX_CLIENTS_NON_ROOT = 12
METRICS_MAX_PER_UID = 4
METRICS_RATE = 2.0
METRICS_BURST = 10
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


# sock_diag(7): the kernel's socket table, asked for one TCP socket by its
# addresses (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_INET_DIAG_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, (pad), states; then the socket id
_INET_DIAG_MSG_UID = 4 + 48 + 12  # struct inet_diag_msg: 4 bytes, the socket id, expires/rqueue/wqueue, uid
# A peer whose socket is not on this machine: no uid to know.
REMOTE_UID = -1


def _diag_address(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host.partition("%")[0]).ljust(16, b"\0")


async def tcp_peer_uid(conn: trio.socket.SocketType) -> int:
    """The uid that owns the other end of a TCP connection when that end is
    on this machine (any local address): the kernel's sock_diag lookup of
    the socket whose local address is our peer's.  REMOTE_UID otherwise."""
    try:
        family = conn.family
        ours, theirs = conn.getsockname(), conn.getpeername()
        sockid = (
            struct.pack(">HH", theirs[1], ours[1])
            + _diag_address(family, theirs[0])
            + _diag_address(family, ours[0])
            + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        )
        body = _INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
        request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
        with trio.socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            await nl.sendto(request, (0, 0))
            with trio.move_on_after(1.0):
                reply = await nl.recv(4096)
                at = _NLMSGHDR.size + _INET_DIAG_MSG_UID
                if len(reply) >= at + 4 and _NLMSGHDR.unpack_from(reply)[1] == SOCK_DIAG_BY_FAMILY:
                    return int(struct.unpack_from("=I", reply, at)[0])
    except (OSError, ValueError, IndexError):
        pass
    return REMOTE_UID


def _metrics_allowed(controller: Controller, uid: int) -> bool:
    """[control] metrics_access: "any", or "group": root and the members of
    [control] group (by the user database: a TCP peer has no process to
    read groups from), both only on this machine."""
    if controller.metrics_access == "any" or uid == 0:
        return True
    if controller.group_gid is None or uid < 0:
        return False
    try:
        user = pwd.getpwuid(uid)
        return controller.group_gid in os.getgrouplist(user.pw_name, user.pw_gid)
    except (KeyError, OSError):
        return False


def _refuse_http(conn: trio.socket.SocketType, status: str, why: str) -> None:
    """Best effort, never blocking: say why, then close."""
    body = why.encode() + b"\n"
    try:
        os.write(conn.fileno(), f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    except OSError:
        pass
    conn.close()


async def _metrics_accept_loop(
    sock: trio.socket.SocketType, controller: Controller, render: Callable[[dict[str, Any]], str]
) -> None:
    active = 0
    non_root = 0
    limits = PeerLimits(METRICS_MAX_PER_UID, METRICS_RATE, METRICS_BURST)
    accept_log = RateLimitedLog(log)
    refuse_log = RateLimitedLog(log)
    bug_log = RateLimitedLog(log)

    async def handler(conn: trio.socket.SocketType, uid: int) -> None:
        nonlocal active, non_root
        stream: trio.SocketStream | None = None
        try:
            stream = trio.SocketStream(conn)
            await _metrics_exchange(stream, controller, render, bug_log)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            bug_log(logging.ERROR, "metrics request failed", exc_info=True)
        finally:
            active -= 1
            non_root -= uid != 0
            limits.release(uid)
            await _close(stream, conn)

    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                accept_log(logging.ERROR, "metrics: accept failed: %s%s", e, _accept_error_hint(e))
                await trio.sleep(ACCEPT_RETRY)
                continue
            uid = await tcp_peer_uid(conn)
            if not _metrics_allowed(controller, uid):
                who = f"uid {uid}" if uid != REMOTE_UID else "a peer on another machine"
                refuse_log(logging.WARNING, "metrics: refused %s ([control] metrics_access = %r)", who,
                           controller.metrics_access)  # fmt: skip
                _refuse_http(conn, "403 Forbidden", "zswapd answers metrics to root and [control] group only "
                             '(metrics_access = "group"; "any" opens them to every peer)')  # fmt: skip
                continue
            if active >= METRICS_MAX_CLIENTS or (uid != 0 and non_root >= METRICS_MAX_CLIENTS_NON_ROOT):
                refuse_log(logging.WARNING, "metrics: %d connections open; closing new ones", active)
                conn.close()
                continue
            if not limits.admit(uid):
                refuse_log(logging.WARNING, "metrics: uid %d has %d connections open; closing new ones", uid,
                           METRICS_MAX_PER_UID)  # fmt: skip
                conn.close()
                continue
            if not limits.try_request(uid):
                limits.release(uid)
                refuse_log(logging.WARNING, "metrics: uid %d connects more than %g times a second; closing", uid,
                           METRICS_RATE)  # fmt: skip
                _refuse_http(conn, "429 Too Many Requests", f"at most {METRICS_RATE:g} scrapes a second per user")
                continue
            # Counted here, not in the task: a burst must not get past the cap.
            active += 1
            non_root += uid != 0
            nursery.start_soon(handler, conn, uid)


async def _metrics_exchange(
    stream: trio.SocketStream,
    controller: Controller,
    render: Callable[[dict[str, Any]], str],
    bug_log: RateLimitedLog,
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
            bug_log(logging.ERROR, "metrics: rendering the stats failed", exc_info=True)
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
