"""The held fds by name (held.HeldFds) and the handover message that carries
them to a new supervisor (handover.py): byte-level, with real fds over a
real socketpair.  No privilege needed."""

from __future__ import annotations

import os
import socket

import pytest

from zswapd import handover
from zswapd.held import FD_NAMES, HeldFds, known_name
from zswapd.worker import WorkerArgs


def pipes(n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.extend(os.pipe())
    return out[:n]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def same_file(a: int, b: int) -> bool:
    return os.path.samestat(os.fstat(a), os.fstat(b))


def test_held_fds_round_trip_by_name() -> None:
    fds = pipes(9)
    try:
        held = HeldFds(fuse=fds[0], clones=[fds[1], fds[2]], control=fds[3], state=[fds[4], fds[5]], lock=fds[6:8])
        named = held.named()
        assert named == {"fuse": fds[0], "fuse-clone-0": fds[1], "fuse-clone-1": fds[2], "control": fds[3],
                         "state-meta": fds[4], "state-arena": fds[5], "lock-0": fds[6], "lock-1": fds[7]}  # fmt: skip
        assert all(known_name(n) for n in named) and set(FD_NAMES) - {"loop", "backing"} <= set(
            named
        )  # those two only when used
        assert "lock-0" not in held.stored() and "lock-0" in held.for_worker()
        # Any order of names (systemd gives them back in its own) makes the same set.
        back = HeldFds.adopt(dict(reversed(list(named.items()))))
        assert back == held
    finally:
        for fd in fds:
            os.close(fd)


def test_half_a_state_is_none_and_its_fd_is_closed() -> None:
    meta, fuse = pipes(2)
    held = HeldFds.adopt({"fuse": fuse, "state-meta": meta})
    assert held.state == [] and held.fuse == fuse and not is_open(meta)
    held.close()
    assert not is_open(fuse) and held.named() == {}


def test_unknown_names() -> None:
    for name in ("fuse-clone-", "fuse-clone-x", "lock", "state", "swapfile", ""):
        assert not known_name(name), name
    for name in ("fuse", "fuse-clone-12", "lock-1", "state-arena", "loop", "control", "backing"):
        assert known_name(name), name


def test_handover_over_a_socketpair_carries_every_fd_by_name() -> None:
    fds = pipes(6)
    pidfd = os.pidfd_open(os.getpid())
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        named = {"fuse": fds[0], "fuse-clone-0": fds[1], "control": fds[2], "state-meta": fds[3],
                 "state-arena": fds[4], "lock-0": fds[5]}  # fmt: skip
        info = {"worker_pid": os.getpid(), "worker_restarts": 3, "mountpoint": "/run/zswapd/mnt"}
        handover.send(a, named, pidfd, info)
        h = handover.receive(b, 5)
        assert h.info == info and set(h.fds) == set(named)
        for name, fd in named.items():
            assert h.fds[name] != fd and same_file(h.fds[name], fd), name
        assert same_file(h.worker_pidfd, pidfd)
        for fd in [*h.fds.values(), h.worker_pidfd]:
            os.close(fd)
    finally:
        for fd in [*fds, pidfd]:
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("payload", "nfds", "error"),
    [
        (b"hello", 1, "not a zswapd handover"),
        (handover.MAGIC + b"{", 1, "not JSON"),
        (handover.MAGIC + b'{"names": "fuse", "info": {}}', 1, "lacks its list of names"),
        (handover.MAGIC + b'{"names": ["fuse", "worker-pidfd"], "info": {}}', 1, "names 2 fds but carries 1"),
        (handover.MAGIC + b'{"names": ["fuse", "fuse"], "info": {}}', 2, "names an fd twice"),
        (handover.MAGIC + b'{"names": ["fuse"], "info": {}}', 1, "no pidfd of the worker"),
        (handover.MAGIC + b'{"names": ["swapfile", "worker-pidfd"], "info": {}}', 2, "does not know: swapfile"),
    ],
)
def test_a_bad_handover_is_refused_and_closes_every_fd(payload: bytes, nfds: int, error: str) -> None:
    fds = pipes(nfds)
    with pytest.raises(handover.HandoverError, match=error):
        handover.decode(payload, fds)
    assert not any(is_open(fd) for fd in fds)


def test_encode_refuses_what_one_message_cannot_carry() -> None:
    with pytest.raises(handover.HandoverError, match="no held fd is named"):
        handover.encode({"swapfile": 5}, 6, {})
    many = {f"fuse-clone-{i}": 3 for i in range(handover.MAX_FDS)}
    with pytest.raises(handover.HandoverError, match="at most 253"):
        handover.encode(many, 6, {})


def test_a_closed_or_silent_socket_is_a_clear_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with b:
        with pytest.raises(handover.HandoverError, match="no handover within"):
            handover.receive(b, 0.05)
        a.close()
        with pytest.raises(handover.HandoverError, match="without a word"):
            handover.receive(b, 1)


def test_worker_args_from_a_supervisor_before_held_fds() -> None:
    """`zswapd reload` under an older supervisor: its per-kind keys become names."""
    a = WorkerArgs.from_json({"config_arg": None, "fuse_fd": 3, "control_fd": 4, "channel_fd": 5,
                              "state_fds": [6, 7], "fuse_clones": [8, 9], "lock_fds": [10, 11]})  # fmt: skip
    assert a.fds == {"fuse": 3, "control": 4, "state-meta": 6, "state-arena": 7, "fuse-clone-0": 8,
                     "fuse-clone-1": 9, "lock-0": 10, "lock-1": 11}  # fmt: skip
    assert a.takeover and a.channel_fd == 5
    assert WorkerArgs.from_json(a.to_json()) == a
