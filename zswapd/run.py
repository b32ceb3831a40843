"""`zswapd run`: from the command line to a running supervisor.  Which start
this is (from a shell; under systemd, first or with the fds of its fd
store; or adopted, with the fds a worker handed over), the checks before
anything changes, and the instance lock (startup.py), then Supervisor.run.
A refusal is exit status 2; a failure once started, 1."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace

from . import handover as handover_mod
from . import paths
from .config import Config, ConfigError
from .held import FUSE
from .process import StartupError, harden, no_core_dumps, settle
from .startup import InstanceLock, check_mountpoint, kill_old_instance, preflight, recover_stale
from .supervisor import Supervisor
from .systemd import fd_store_remove, listen_fds, under_service_manager

log = logging.getLogger("zswapd")

# An adopted supervisor waits this long for the worker's handover: the
# worker sends it before starting us, so it is there at once or never.
HANDOVER_TIMEOUT = 10.0


def _receive_handover(fd: int) -> tuple[handover_mod.Handover, socket.socket]:
    sock = socket.socket(fileno=fd)
    try:
        return handover_mod.receive(sock, HANDOVER_TIMEOUT), sock
    except handover_mod.HandoverError:
        sock.close()
        raise


def main_run(cfg: Config, config_arg: str | None = None, adopt_fd: int | None = None) -> int:
    """``cfg`` comes from config.load(strict=True): its paths are real and
    absolute.  So is ``config_arg`` (the CLI made it so), which every fresh
    worker reads after this process has left its starting directory.
    ``adopt_fd``: started by a worker whose supervisor died (`run --adopt`),
    the socket its handover comes on."""
    handover = None
    if adopt_fd is not None:
        closed = settle({adopt_fd})
        try:
            handover = _receive_handover(adopt_fd)
        except handover_mod.HandoverError as e:
            log.error("cannot adopt the worker's fds: %s", e)
            return 2
        adopted, start = handover[0].fds, "adopted"
        mountpoint = str(handover[0].info.get("mountpoint") or cfg.device.mountpoint)
        cfg = replace(cfg, device=replace(cfg.device, mountpoint=mountpoint))
    else:
        adopted = listen_fds()
        closed = settle(set(adopted.values()))
        start = "service" if under_service_manager() else "shell"
        if adopted and FUSE not in adopted:
            # Only a held /dev/fuse fd keeps a connection, and the swap on it,
            # alive: without one there is nothing to take over.  With one, it
            # is taken over whatever the mount table says (Supervisor._adopt).
            log.warning("systemd handed back fds, but no FUSE connection: starting afresh")
            for name, fd in adopted.items():
                os.close(fd)
                fd_store_remove(name)
            adopted = {}
    sup = Supervisor(cfg, config_arg, start, adopted, handover)
    sup.install_signals()
    if closed:
        log.info("closed fds %s inherited from the caller: a worker holds only what it is given", closed)
    no_core_dumps()
    try:
        try:
            preflight(cfg)
            if handover is None:
                if adopted:
                    # Before the lock, which a worker of the dead supervisor holds.
                    kill_old_instance()
                lock = InstanceLock([cfg.device.mountpoint.rstrip("/") + ".lock", cfg.control.socket + ".lock"])
                lock.acquire()
                sup.held.lock = lock.fds
            if not adopted:
                recover_stale(cfg.device.mountpoint)
                check_mountpoint(cfg.device.mountpoint)
            paths.safe_parent(cfg.control.socket)
            harden(cfg.swap.enable)
            # Imported now, so that a worker forked after a crash starts
            # serving without importing anything.
            from . import worker  # noqa: F401
        except paths.UnsafePath as e:
            raise StartupError(f"control socket: {e}") from None
        except OSError as e:
            raise StartupError(f"cannot start: {e}") from None
        return sup.run()
    except (StartupError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except paths.UnsafePath as e:
        log.error("control socket: %s", e)
        return 2
    except OSError as e:
        log.error("%s", e)
        return 1
    except Exception:
        log.exception("internal error; please report it")
        return 1
    finally:
        sup.held.close()
