"""Native serving of the hot opcodes: C threads on /dev/fuse.

``NativeServer`` starts N threads in the native engine (zswapd/_engine.c,
``serve_fuse``), each reading /dev/fuse on its own fd: one of the clones the
supervisor made and keeps (``mount.clone_fuse``), or, without them, the
connection's fd shared.  READ, WRITE and
FALLOCATE(PUNCH_HOLE) of the device file are served in C without the GIL;
every other request, and any hot one the store's policy must decide (a full
pool, a bad range, an unaligned discard, a corrupt object), comes up here,
whole, to ``FuseFS.handle``: the sans-I/O protocol stays the one place where
the protocol's rules are written.  Hot serving starts once FuseFS has
answered INIT (or had it restored after a takeover).

The connection's fd must be O_NONBLOCK (``mount.open_fuse``); clones are
blocking, so each request wakes one thread (see _engine.c).  ``stop()`` must run before
the store is closed.  This module knows FuseFS and an engine object with
``serve_fuse``-compatible type, never Store: the worker passes both in.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from .protocol import IN_HEADER, FuseFS, error_reply

log = logging.getLogger("zswapd")


class NativeServer:
    def __init__(
        self, fd: int, fs: FuseFS, engine: Any, threads: int | None = None, clones: Sequence[int] = ()
    ) -> None:
        from .. import _engine  # only the native engine can serve natively

        if not isinstance(engine, _engine.Engine):
            raise TypeError("native FUSE serving needs the native engine ([pool] engine = native or auto)")
        self.fs = fs
        # FuseFS is sans-I/O and single-threaded: it builds READ replies in
        # one buffer of its own.  Cold requests come up from several C
        # threads, and the GIL does not keep them apart (the engine releases
        # it inside a read), so they take turns here.
        self._turn = threading.Lock()
        self.bugs = 0
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
        server = _engine.serve_fuse(engine, fds, self._handle)
        with self._turn:
            self._server = server
            self._maybe_enable()

    def _maybe_enable(self) -> None:
        """Serve hot opcodes in C once INIT is answered.  Called with the
        turn.  Never raises: the reply to INIT must go out whatever happens
        here (an error reply to INIT disables the connection for good)."""
        if self._enabled or self._server is None or not self.fs.initialized:
            return
        self._enabled = True  # tried once: on failure every request keeps going up
        try:
            self._server.enable(self.fs.max_write, self.fs.device.size)
        except Exception:
            self.bugs += 1
            log.exception("bug enabling native serving; every request goes up to Python")

    def _handle(self, req: bytes) -> bytes | None:
        """A cold request (or a hot one handed up), from any C thread.  The
        reply is a copy: FuseFS's own buffer is the next caller's as soon as
        the turn is given up, and C writes the reply after that."""
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
                log.exception("bug handling FUSE opcode %d natively handed up; answered EIO", op)
                reply = error_reply(req)
            self._maybe_enable()
        return reply

    def stats(self) -> dict[str, int]:
        return {**self._server.stats(), "bugs": self.bugs}

    def stop(self) -> None:
        """Stop and join the threads (each finishes the request it holds)."""
        self._server.stop()
