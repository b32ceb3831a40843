"""Whether a daemon is serving well: `zswapd status` and top's warnings.

Sans-I/O: ``assess`` reads one ``stats`` reply and names every reason the
daemon is *degraded*: still serving, but something needs a look.  The exit
codes follow ``systemctl is-active`` and the LSB's status codes, so a
monitoring script can use them:

- ``SERVING`` (0): it answers and none of the reasons below holds;
- ``DEGRADED`` (1): it answers and one holds, or its control socket takes
  the connection but no reply comes in time (a worker starting or stuck);
- ``NOT_RUNNING`` (3): no control socket, or nobody listening on it;
- ``UNKNOWN`` (4): the state cannot be told (permission denied, a reply
  that is not one).

Degraded means any of:

- the pool is full and refuses writes (the kernel gets write errors);
- swap was set up (a loop device is attached) but is not on;
- reads failed (a page could not be given back);
- a task of the worker failed and was restarted, or a request hit a bug
  (an internal error): contained, but a bug to report;
- C FUSE threads stopped, or hit a bug;
- ``[pool] engine = "auto"`` fell back to the Python engine because the
  native one is not built (several times slower; the reason is given).

Not degraded: a worker replaced by a takeover or a reload (the restart
count and the last recovery are shown, but a takeover is zswapd working
as designed), or an engine, backend or swap setting chosen in the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SERVING = 0
DEGRADED = 1
NOT_RUNNING = 3
UNKNOWN = 4


def assess(s: Mapping[str, Any]) -> list[str]:
    """Why the daemon that sent ``s`` is degraded; [] when it is not."""
    out = []
    if s.get("full"):
        out.append(f"pool full: writes refused until usage falls below {s.get('accept_percent', '?')}% of the limit")
    dev = s.get("device") or {}
    if dev.get("loop") and not dev.get("swap"):
        out.append(f"swap is off on {dev['loop']}")
    if s.get("failed_reads"):
        out.append(f"{s['failed_reads']} failed reads")
    failures = s.get("task_failures") or {}
    if failures:
        listed = ", ".join(f"{name} {n}" for name, n in sorted(failures.items()))
        out.append(f"tasks failed and were restarted ({listed}); see the log")
    for key, what in (("fuse_internal_errors", "FUSE"), ("control_internal_errors", "control")):
        if s.get(key):
            out.append(f"{s[key]} internal errors answering {what} requests; see the log")
    threads = s.get("fuse_threads") or {}
    if threads and threads.get("alive", 0) < threads.get("threads", 0):
        out.append(f"{threads['threads'] - threads['alive']} of {threads['threads']} C FUSE threads stopped")
    if threads.get("bugs"):
        out.append(f"C FUSE threads hit {threads['bugs']} bugs; see the log")
    proc = s.get("process") or {}
    if proc.get("supervisor_pid") == 0:
        out.append("no supervisor: the worker serves alone (a new one is starting, or cannot start: see the log)")
    if s.get("engine_fallback"):
        out.append(f"Python engine: the native engine is not built ({s['engine_fallback']})")
    return out


def summary(s: Mapping[str, Any]) -> tuple[int, str]:
    """`zswapd status`'s exit code and line for a stats reply."""
    from .cli import _human as human

    used, data, limit = s["mem_used_total"], s["orig_data_size"], s["mem_limit"]
    dev = s.get("device") or {}
    proc = s.get("process") or {}
    parts = [
        f"{human(data)} in {human(used)} (ratio {data / used if used else 0.0:.2f})",
        f"limit {human(limit)} ({100 * used / limit:.0f}%)" if limit else "no limit",
        (f"swap on {dev['loop']}" if dev.get("swap") else f"swap off on {dev['loop']}")
        if dev.get("loop")
        else "no swap (a plain file)",
        f"engine {s.get('engine', '?')}",
    ]
    if proc:
        parts.append(f"worker {proc['worker_pid']} ({proc['worker_restarts']} restarts)")
    problems = assess(s)
    if problems:
        return DEGRADED, "degraded: " + "; ".join(problems) + " -- " + ", ".join(parts)
    return SERVING, "serving: " + ", ".join(parts)
