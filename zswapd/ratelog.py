"""Rate-limited logging: the one way to log a line that a client or the
kernel can trigger once per request (a bug hit by every FUSE request, a
refused connection, a failed control command).  Such a line logged each time
would fill the journal and take the CPU from serving swap; held back, it is
counted, and the next line logged says how many were not.

Owns ``RateLimitedLog``.  Safe from any thread (the C FUSE threads call into
Python with the GIL, but a check-then-set could still interleave).
"""

from __future__ import annotations

import logging
import threading
import time

# One line per interval: a bug or a refusal hit by every request shows in
# the log within seconds of starting, and costs one line per interval after.
INTERVAL = 10.0


class RateLimitedLog:
    """At most one message per ``interval`` seconds through ``logger``; the
    next one logged says how many were held back since the last."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.next = 0.0
        self.held = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log unless one was logged less than ``interval`` ago; True if it was."""
        with self._lock:
            now = time.monotonic()
            if now < self.next:
                self.held += 1
                return False
            held, self.held, self.next = self.held, 0, now + self.interval
        if held:
            msg += f" ({held} more like this not logged since the last)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
