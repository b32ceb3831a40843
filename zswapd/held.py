"""The fds that keep a zswapd device alive, by name: the one list of them,
used wherever they travel (a worker's args, a fork, systemd's fd store and
what it gives back, the handover to a new supervisor, teardown and close).

A FUSE connection, and so every page in the swap on it, lives while any
process holds an fd on /dev/fuse's open file description; the state memfds
hold the device's contents.  Whoever holds these fds holds the device.

Names
-----
fuse             /dev/fuse, the connection's own fd (non-blocking)
fuse-clone-N     FUSE_DEV_IOC_CLONEs, one per serving thread, made and kept
                 by the supervisor: requests a dead worker had read on a
                 clone stay in flight on it until the next worker's RESEND
control          the control socket's listening socket
state-meta       the state memfds (state.py): header and tables,
state-arena      and the compressed objects
loop             the loop device the swap is on.  The supervisor's alone: a
                 worker holding it would defer the detach at shutdown
backing          [writeback] file (backing.py), O_DIRECT: pages written back
lock-N           the instance lock files (startup.InstanceLock); the lock
                 belongs to the open file, so passing the fd passes the lock

systemd's fd store keeps every name but the lock: a supervisor it restarts
first makes sure no process of the old instance is left, then takes the
lock anew (run.main_run).  A handover passes the lock too: the worker
that hands over goes on serving, and holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import swap

FUSE = "fuse"
CLONE_PREFIX = "fuse-clone-"
CONTROL = "control"
STATE_NAMES = ("state-meta", "state-arena")
LOOP = "loop"
BACKING = "backing"
LOCK_PREFIX = "lock-"
# The names with one fd each; clones and locks are numbered from 0.
FD_NAMES = (FUSE, CONTROL, *STATE_NAMES, LOOP, BACKING)


def _numbered(name: str, prefix: str) -> int:
    """N of PREFIX-N, or -1."""
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else -1


def known_name(name: str) -> bool:
    return name in FD_NAMES or _numbered(name, CLONE_PREFIX) >= 0 or _numbered(name, LOCK_PREFIX) >= 0


def _in_order(named: dict[str, int], prefix: str) -> list[int]:
    return [named[n] for n in sorted(named, key=lambda n: _numbered(n, prefix)) if _numbered(n, prefix) >= 0]


@dataclass
class HeldFds:
    """Every fd of the device one process holds.  -1, [] or None: not held."""

    fuse: int = -1
    clones: list[int] = field(default_factory=list)
    control: int = -1
    state: list[int] = field(default_factory=list)  # [meta, arena] once the first worker made them
    loop: swap.Loop | None = None
    lock: list[int] = field(default_factory=list)
    backing: int = -1

    def named(self, loop: bool = True, lock: bool = True) -> dict[str, int]:
        """name -> fd, for every fd held (without the loop device or the
        lock, if asked)."""
        out: dict[str, int] = {}
        if self.fuse >= 0:
            out[FUSE] = self.fuse
        out.update((f"{CLONE_PREFIX}{i}", fd) for i, fd in enumerate(self.clones))
        if self.control >= 0:
            out[CONTROL] = self.control
        out.update(zip(STATE_NAMES, self.state))
        if self.backing >= 0:
            out[BACKING] = self.backing
        if loop and self.loop is not None:
            out[LOOP] = self.loop.fd
        if lock:
            out.update((f"{LOCK_PREFIX}{i}", fd) for i, fd in enumerate(self.lock))
        return out

    def stored(self) -> dict[str, int]:
        """What systemd's fd store keeps (see the module docstring)."""
        return self.named(lock=False)

    def for_worker(self) -> dict[str, int]:
        """What a worker gets: everything but the loop device."""
        return self.named(loop=False)

    @classmethod
    def adopt(cls, named: dict[str, int]) -> HeldFds:
        """From fds received by name (systemd's LISTEN_FDS, a handover, a
        worker's args).  Clones and locks keep their numbers' order; a
        state is taken only whole."""
        held = cls(fuse=named.get(FUSE, -1), control=named.get(CONTROL, -1), backing=named.get(BACKING, -1))
        held.clones = _in_order(named, CLONE_PREFIX)
        held.lock = _in_order(named, LOCK_PREFIX)
        if all(n in named for n in STATE_NAMES):
            held.state = [named[n] for n in STATE_NAMES]
        else:  # half a state is none (the first worker sends both at once)
            for n in STATE_NAMES:
                if n in named:
                    os.close(named[n])
        if LOOP in named:
            held.loop = swap.Loop(os.readlink(f"/proc/self/fd/{named[LOOP]}"), named[LOOP])
        return held

    def remove_backing_file(self, path: str) -> bool:
        """Unlink ``path`` if it is the backing file held: swap lives one
        boot, so at a stop (after swapoff) its contents go.  Only that very
        file (the same inode): a path that now names another file is left
        alone.  True if removed; OSError if it cannot be."""
        if self.backing < 0 or not path:
            return False
        try:
            same = os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(self.backing))
        except FileNotFoundError:
            return False
        if same:
            os.unlink(path)
        return same

    def close_loop(self) -> None:
        if self.loop is not None:
            os.close(self.loop.fd)
            self.loop = None

    def close(self) -> None:
        """Close every fd held.  Only at the very end: /dev/fuse and the
        state are closed while swap is on only after a successful swapoff
        (supervisor.py, rule 1)."""
        for fd in self.named().values():
            os.close(fd)
        self.fuse, self.clones, self.control, self.state, self.loop, self.lock = -1, [], -1, [], None, []
        self.backing = -1
