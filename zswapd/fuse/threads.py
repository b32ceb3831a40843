"""The C FUSE threads: N threads of the native engine on /dev/fuse.

``FuseThreads`` starts N threads in the native engine
(zswapd/engine/fuse_loop.c, ``serve_fuse``), each reading /dev/fuse on its
own fd: one of the clones the supervisor made and keeps
(``mount.clone_fuse``), or, without them, the connection's fd shared.
READ, WRITE and FALLOCATE(PUNCH_HOLE) of the device file are served in C
without the GIL (the rule is ``admit`` in zswapd/engine/fuse_ops.c); every
other request is handed up here, whole, to ``FuseFS.handle``, which answers
every opcode and whose rules the C path follows byte for byte.  Where a
write served in C stops (the store is full, or has no room), C asks the
store's policy through ``_decide`` and goes on or answers ENOSPC itself.
Serving in C starts once FuseFS has answered INIT (or had it restored after
a takeover).

The connection's fd must be O_NONBLOCK (``mount.open_fuse``); clones are
blocking, so each request wakes one thread (see zswapd/engine/fuse_loop.c).
``stop()`` must run before the store is closed.  This module knows FuseFS
and the native engine (and its ``policy``, the store's), never Store: the
worker passes both in.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from ..ratelog import RateLimitedLog
from .protocol import IN_HEADER, FuseFS, error_reply

log = logging.getLogger("zswapd")


class FuseThreads:
    def __init__(
        self, fd: int, fs: FuseFS, engine: Any, threads: int | None = None, clones: Sequence[int] = ()
    ) -> None:
        from .. import _engine  # the threads are the native engine's

        if not isinstance(engine, _engine.Engine):
            raise TypeError("the C FUSE threads need the native engine ([pool] engine = native or auto)")
        self.fs = fs
        self.engine: Any = engine  # the engine.NativeEngine serving the store
        # FuseFS is sans-I/O and single-threaded: it builds READ replies in
        # one buffer of its own.  Requests are handed up from several C
        # threads, and the GIL does not keep them apart (the engine releases
        # it inside a read), so they take turns here.
        self._turn = threading.Lock()
        self.bugs = 0
        # A bug hit by every request would log a traceback per request.
        self._bug_log = RateLimitedLog(log)
        self._enabled = False
        n = threads or os.cpu_count() or 1
        for c in clones:
            # A worker killed while spinning leaves its clone O_NONBLOCK;
            # a clone is served blocking (it is how C tells it from the
            # connection's own fd, which stays O_NONBLOCK).
            os.set_blocking(c, True)
        # Thread i reads clone i; with fewer clones than threads, they share
        # (only one thread reads at a time anyway).
        fds = [clones[i % len(clones)] for i in range(n)] if clones else [fd] * n
        # The threads start inside serve_fuse, and one may read INIT and
        # call _handle before serve_fuse returns: _handle then answers INIT
        # and leaves enabling to the turn taken here, once the server exists.
        self._server: Any = None
        server = _engine.serve_fuse(engine, fds, self._handle, self._decide)
        with self._turn:
            self._server = server
            self._maybe_enable()

    def _maybe_enable(self) -> None:
        """Serve READ, WRITE and punches in C once INIT is answered.  Called
        with the turn.  Never raises: the reply to INIT must go out whatever
        happens here (an error reply to INIT disables the connection for
        good)."""
        if self._enabled or self._server is None or not self.fs.initialized:
            return
        self._enabled = True  # tried once: on failure every request keeps going up
        try:
            self._server.enable(self.fs.max_write, self.fs.device.size)
        except Exception:
            self.bugs += 1
            log.exception("bug enabling the C threads' serving; every request is handed up to Python")

    def _handle(self, req: bytes) -> bytes | None:
        """A request handed up, from any C thread.  The reply is a copy:
        FuseFS's own buffer is the next caller's as soon as the turn is
        given up, and C writes the reply after that."""
        with self._turn:
            try:
                out = self.fs.handle(req)
                reply = None if out is None else bytes(out)
            except Exception:
                # As session.py: a bug answers EIO and serving goes on.
                self.bugs += 1
                self.fs.errors += 1
                self.fs.internal_errors += 1
                op = IN_HEADER.unpack_from(req, 0)[1] if len(req) >= IN_HEADER.size else -1
                self._bug_log(
                    logging.ERROR,
                    "bug handling FUSE opcode %d handed up by a C thread; answered EIO",
                    op,
                    exc_info=True,
                )
                reply = error_reply(req)
            self._maybe_enable()
        return reply

    def _decide(self, status: int, retried: bool) -> bool:
        """A write served in C stopped at a page (REFUSED, NOROOM): the
        store's policy says whether it goes on from there (the engine's
        ``policy``, set by the store), from any C thread, with the GIL."""
        try:
            policy = self.engine.policy
            return bool(policy is not None and policy(status, bool(retried)))
        except Exception:
            # As _handle: a bug ends this write (EIO) and serving goes on.
            self.bugs += 1
            self._bug_log(
                logging.ERROR,
                "bug in the store's policy for a write stopped with status %d; answered EIO",
                status,
                exc_info=True,
            )
            raise

    def stats(self) -> dict[str, int]:
        return {**self._server.stats(), "bugs": self.bugs}

    def stop(self) -> None:
        """Stop and join the threads (each finishes the request it holds)."""
        self._server.stop()
