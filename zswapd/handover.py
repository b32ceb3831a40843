"""The handover: outside systemd, a worker whose supervisor died gives every
fd it holds, by name, to the new supervisor it starts (supervisor.py, "who
restarts whom").  The new supervisor adopts them through the path systemd's
fd store takes (held.HeldFds.adopt), and watches the worker that handed
them over by the pidfd that came with them.

Wire format: one SOCK_SEQPACKET message on a socketpair the worker made;
the new supervisor inherited the other end (`zswapd run --adopt FD`).
    payload   MAGIC, then JSON {"names": [...], "info": {...}}
    SCM_RIGHTS  one fd per name, in the order of "names"
"names" are held.py's, plus WORKER_PIDFD: the worker's own pidfd, so that a
worker that dies before the new supervisor looks is still the one watched
(a pid can be reused; a pidfd cannot).  "info" carries what the new
supervisor cannot read from the fds: the worker's pid and restart count,
the supervisor restart count, the running mountpoint.

The fds are sent before the new supervisor is started: from then on the
socket holds them, and once the child holds its end, the connection lives
even if the worker dies at once.  The new supervisor answers "adopted" (with
its pid) on the same socket, which from then on is the worker's channel to
it.  Sans I/O but for send() and receive(): encode() and decode() are
pure, and decode() closes what it refuses.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .held import known_name

MAGIC = b"zswapd-handover 1\n"
WORKER_PIDFD = "worker-pidfd"
# SCM_MAX_FD: the kernel passes at most this many fds in one message.
MAX_FDS = 253
# The JSON part: names (at most MAX_FDS, each short) and a few numbers.
MAX_PAYLOAD = 16384


class HandoverError(Exception):
    """A handover message this code cannot use."""


@dataclass
class Handover:
    fds: dict[str, int]  # the held fds by name
    worker_pidfd: int
    info: dict[str, Any]


def encode(named: dict[str, int], worker_pidfd: int, info: dict[str, Any]) -> tuple[bytes, list[int]]:
    names = [*named, WORKER_PIDFD]
    fds = [*named.values(), worker_pidfd]
    if len(fds) > MAX_FDS:
        raise HandoverError(f"{len(fds)} fds to hand over; one message carries at most {MAX_FDS}")
    for name in named:
        if not known_name(name):
            raise HandoverError(f"no held fd is named {name!r}")
    payload = MAGIC + json.dumps({"names": names, "info": info}).encode()
    if len(payload) > MAX_PAYLOAD:
        raise HandoverError(f"handover message of {len(payload)} bytes; at most {MAX_PAYLOAD}")
    return payload, fds


def decode(payload: bytes, fds: list[int]) -> Handover:
    """The handover in ``payload`` with the ``fds`` that came with it.  On
    any error every fd is closed, and HandoverError says what was wrong."""
    try:
        if not payload.startswith(MAGIC):
            raise HandoverError(f"not a zswapd handover (starts {payload[:24]!r})")
        try:
            body = json.loads(payload[len(MAGIC) :])
        except ValueError as e:
            raise HandoverError(f"handover is not JSON: {e}") from None
        names, info = (body.get("names"), body.get("info")) if isinstance(body, dict) else (None, None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(info, dict):
            raise HandoverError("handover lacks its list of names or its info")
        if len(names) != len(fds):
            raise HandoverError(f"handover names {len(names)} fds but carries {len(fds)}")
        if len(set(names)) != len(names):
            raise HandoverError("handover names an fd twice")
        named = dict(zip(names, fds))
        pidfd = named.pop(WORKER_PIDFD, -1)
        if pidfd < 0:
            raise HandoverError("handover carries no pidfd of the worker")
        unknown = [n for n in named if not known_name(n)]
        if unknown:
            raise HandoverError(f"handover names fds this version does not know: {', '.join(unknown)}")
    except HandoverError:
        for fd in fds:
            os.close(fd)
        raise
    return Handover(named, pidfd, info)


def send(sock: socket.socket, named: dict[str, int], worker_pidfd: int, info: dict[str, Any]) -> None:
    payload, fds = encode(named, worker_pidfd, info)
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def receive(sock: socket.socket, timeout: float) -> Handover:
    """Wait up to ``timeout`` seconds for the handover on ``sock``."""
    sock.settimeout(timeout)
    try:
        payload, anc, flags, _ = sock.recvmsg(MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * 4))
    except TimeoutError:
        raise HandoverError(f"no handover within {timeout:.0f} s") from None
    except OSError as e:
        raise HandoverError(f"cannot read the handover: {e.strerror}") from None
    finally:
        sock.settimeout(None)
    fds = received_fds(anc)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise HandoverError("handover message truncated")
    if not payload:
        raise HandoverError("the worker closed the handover socket without a word")
    return decode(payload, fds)


def received_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in recvmsg's ancillary data (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % struct.calcsize("i")
            fds.extend(array.array("i", data[:usable]))
    return fds
