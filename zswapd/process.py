"""What every zswapd process sets up, the supervisor and each worker alike:
logging, no core dumps, memory locking, and the
signals that must never end or stop a process in the swap path; and what
the supervisor does first of all: leave the directory it was started from
and close the fds it was started with (``settle``), and the command line
of a worker started afresh (``worker_argv``)."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys

from . import libc

log = logging.getLogger("zswapd")

PR_SET_DUMPABLE = 4
PR_SET_IO_FLUSHER = 57
# A worker's exit status meaning "the FUSE connection is gone": nothing is
# left to take over, so the supervisor does not start another.
EXIT_CONNECTION_GONE = 3

# Logged and ignored in every zswapd process: their default actions end the
# process or stop it (SIGTSTP, SIGTTIN, SIGTTOU), and a stopped or dead swap
# server stalls or kills every process with pages in it.
IGNORED_SIGNALS = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class StartupError(Exception):
    """A problem found before anything was changed; exit status 2."""


# -- where code comes from -------------------------------------------------------


def worker_argv() -> list[str]:
    """A fresh worker (`zswapd reload`): this interpreter in isolated mode.
    -I leaves the current directory and the script's off sys.path and
    ignores PYTHON* variables and the user's site-packages, so the worker
    runs the zswapd installed in site-packages, not whatever a user left in
    a directory root happened to start the daemon from."""
    return [sys.executable, "-I", "-m", "zswapd", "worker"]


def settle(keep: set[int]) -> list[int]:
    """The supervisor's first steps, once its configured paths are
    absolute: close every fd it inherited except 0-2 and ``keep`` (what
    systemd passed), so that none reaches a worker; drop the starting
    directory from sys.path (`python -m` and `-c` put it first); and
    chdir("/").  Returns the fds it closed."""
    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue  # the directory listing's own fd, closed already
            closed.append(fd)
    start = os.getcwd()
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != start]
    os.chdir("/")
    return closed


# -- process set-up shared with the worker -------------------------------------


def setup_logging(verbose: bool = False) -> None:
    # Under systemd, stderr goes to journald, which reads <N> priority prefixes.
    journal = "JOURNAL_STREAM" in os.environ
    prio = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    class Fmt(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + self.formatException(record.exc_info)
            if journal:
                return f"<{prio.get(record.levelno, 6)}>{msg}"
            return f"zswapd[{os.getpid()}]: {record.levelname.lower()}: {msg}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Fmt())
    root = logging.getLogger("zswapd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def no_core_dumps() -> None:
    """The pool holds other processes' memory: it must never reach a core
    file, and a non-dumpable process cannot be ptrace-attached by non-root."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc.prctl(PR_SET_DUMPABLE, 0)
    except OSError as e:
        log.warning("PR_SET_DUMPABLE refused: %s", os.strerror(e.errno or 0))


def harden(swap_enabled: bool) -> None:
    """Keep the process able to run while the kernel is swapping to it."""
    # MCL_ONFAULT: lock pages as they are touched, so the big lazily used
    # tables and arenas cost only what is used.
    try:
        libc.mlockall(libc.MCL_CURRENT | libc.MCL_FUTURE | libc.MCL_ONFAULT)
    except OSError as e:
        why = os.strerror(e.errno or 0)
        if swap_enabled:
            # Unlocked, our own pages could be swapped out to the swap only
            # we can serve: the first fault on one deadlocks.
            raise StartupError(
                f"mlockall failed ({why}): refusing to enable swap, because the daemon could be swapped out to "
                "itself; give it CAP_IPC_LOCK or LimitMEMLOCK=infinity, or set [swap] enable = false"
            ) from None
        log.warning("mlockall failed (%s): the daemon itself may be swapped out", why)
    try:
        libc.prctl(PR_SET_IO_FLUSHER, 1)
    except OSError as e:
        log.warning(
            "PR_SET_IO_FLUSHER refused (%s; needs CAP_SYS_RESOURCE): reclaim inside the daemon may recurse into swap",
            os.strerror(e.errno or 0),
        )
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        log.warning("cannot set oom_score_adj: %s", e)


def adopt_argv(adopt_fd: int, config_arg: str | None, verbose: bool) -> list[str]:
    """A new supervisor a worker starts when its own died (supervisor.py,
    "who restarts whom"): installed code only, as worker_argv."""
    argv = [sys.executable, "-I", "-m", "zswapd", "run", "--adopt", str(adopt_fd)]
    if config_arg:
        argv += ["--config", config_arg]
    return argv + (["--verbose"] if verbose else [])
