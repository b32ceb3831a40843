"""What zswapd asks of systemd, and nothing else: sd_notify(3) messages,
the fd store (FDSTORE=1, FDSTOREREMOVE=1) and the fds it hands back to a
restarted supervisor (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS,
LISTEN_FDNAMES).  Outside systemd (no NOTIFY_SOCKET) every call here does
nothing, and listen_fds() finds nothing.

Which fds are kept, and by what names, is held.py's: this module only
carries them."""

from __future__ import annotations

import array
import logging
import os
import socket

from .held import known_name

log = logging.getLogger("zswapd")

# sd_listen_fds(3): passed fds start at 3.
SD_LISTEN_FDS_START = 3


def under_service_manager() -> bool:
    """Whether a service manager supervises us and keeps our fds: then it,
    not the worker, restarts a supervisor that died (supervisor.py)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def sd_notify(message: str, fds: list[int] | None = None) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([message.encode()], anc, 0, path)
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


def listen_fds() -> dict[str, int]:
    """The fds systemd gave back from its fd store (a restart after the
    supervisor died), by name; {} outside systemd or on a first start.
    An fd with a name we do not know, or a second one of a name, is closed."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out: dict[str, int] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else ""
        if known_name(name) and name not in out:
            os.set_inheritable(fd, False)
            out[name] = fd
        else:
            log.warning("ignoring fd %d named %r from systemd's fd store", fd, name)
            os.close(fd)
    return out


def fd_store(name: str, fd: int) -> None:
    """Keep ``fd`` in systemd's fd store (FileDescriptorStoreMax= in the
    unit), so a supervisor restarted after a crash gets it back."""
    if under_service_manager():
        sd_notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def fd_store_remove(name: str) -> None:
    if under_service_manager():
        sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
