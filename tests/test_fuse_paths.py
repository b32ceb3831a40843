"""A FUSE request takes one of two paths: served in C by the FUSE threads
(zswapd/engine/fuse_ops.c, whose ``admit`` decides), or handed up to the
sans-I/O codec (``FuseFS.handle``, as the trio session and the hand-up
call it).  For every request, whichever path it takes, the reply must be
the same bytes.  This sends the edge cases of the admission rule through
both, on two stores that start alike, and compares each reply and, at the
end, every byte of the two devices.

The C threads read a socket pair standing in for /dev/fuse (one request
per message, a reply on the fd the request came from), so this needs no
mount and no root.

Privilege: none.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import corrupt_object
from zswapd.bench import sample_pages
from zswapd.fuse import protocol as p
from zswapd.store import Store

PAGE = 4096
SIZE = 256 * PAGE
# Smaller than the protocol's 1 MiB, so a request beyond it stays small
# enough for a socket's message (both paths get the same max_write).
MAX_WRITE = 64 << 10
IN_C, UP = "served in C", "handed up"


def _session_reply(fs: p.FuseFS, req: bytes) -> bytes | None:
    """What the trio session (fuse/session.py) writes back for ``req``."""
    try:
        out = fs.handle(req)
    except Exception:
        out = p.error_reply(req)
    return None if out is None else bytes(out)


@dataclass
class Paths:
    """The C threads over one store, FuseFS over another."""

    c_store: Store
    py_store: Store
    c_sock: socket.socket
    server: object
    py_fs: p.FuseFS
    unique: int = 0

    def stats(self) -> dict[str, int]:
        return self.server.stats()  # type: ignore[attr-defined, no-any-return]

    def send(self, opcode: int, body: bytes, nodeid: int = p.FILE_ID) -> tuple[bytes, bytes, str]:
        """(reply from C's side, reply from FuseFS, the path C's side took)."""
        self.unique += 1
        req = p.pack_request(opcode, self.unique, nodeid, body)
        before = self.stats()
        self.c_sock.send(req)
        c_reply = self.c_sock.recv(p.OUT_HEADER.size + MAX_WRITE + PAGE)
        # The thread counts the request after it has replied.
        deadline = time.monotonic() + 10
        while (after := self.stats())["served_in_c"] + after["handed_up"] == before["served_in_c"] + before[
            "handed_up"
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        path = IN_C if after["served_in_c"] > before["served_in_c"] else UP
        py_reply = _session_reply(self.py_fs, req)
        assert py_reply is not None
        return c_reply, py_reply, path


def _sockets() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # SO_*BUFFORCE, as root
            try:
                s.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    return a, b


@pytest.fixture
def paths() -> Iterator[Paths]:
    from zswapd.fuse.threads import FuseThreads

    pages = sample_pages(64)
    stores = [Store(SIZE, engine="native") for _ in range(2)]
    for s in stores:
        for i in range(0, SIZE // PAGE, 3):
            s.write(i * PAGE, pages[i % len(pages)])
    fss = [p.FuseFS(s) for s in stores]
    for fs in fss:
        fs.restore_init(p.OUR_MINOR)  # as after a takeover: serving from the first request
        fs.max_write = MAX_WRITE
    mine, theirs = _sockets()
    server = FuseThreads(theirs.fileno(), fss[0], stores[0].engine, threads=1, clones=[theirs.fileno()])
    try:
        assert server.stats()["serving"] == 1
        yield Paths(stores[0], stores[1], mine, server, fss[1])
    finally:
        server.stop()
        mine.close()
        theirs.close()
    assert stores[0].read(0, SIZE) == stores[1].read(0, SIZE)  # the devices stayed alike
    for s in stores:
        s.check_invariants()
        s.close()


def read(offset: int, size: int) -> bytes:
    return p.READ_IN.pack(0, offset, size, 0, 0, 0, 0)


def write(offset: int, data: bytes, size: int | None = None) -> bytes:
    return p.WRITE_IN.pack(0, offset, len(data) if size is None else size, 0, 0, 0, 0) + data


def fallocate(offset: int, length: int, mode: int = p.FALLOC_FL_PUNCH_HOLE | p.FALLOC_FL_KEEP_SIZE) -> bytes:
    return p.FALLOCATE_IN.pack(0, offset, length, mode, 0)


DATA = bytes(range(256)) * 48  # 3 pages, not same-filled

# (name, opcode, body, the path C takes, the error both answer (0: none))
CASES: list[tuple[str, int, bytes, str, int]] = [
    ("read inside", p.READ, read(8 * PAGE, 4 * PAGE), IN_C, 0),
    ("read of max_write", p.READ, read(0, MAX_WRITE), IN_C, 0),
    ("read beyond max_write", p.READ, read(0, MAX_WRITE + PAGE), UP, errno.EINVAL),
    ("read unaligned", p.READ, read(PAGE + 100, 5000), IN_C, 0),
    ("read of the last page", p.READ, read(SIZE - PAGE, PAGE), IN_C, 0),
    ("read across the end", p.READ, read(SIZE - PAGE, 2 * PAGE), UP, 0),
    ("read at the end", p.READ, read(SIZE, PAGE), UP, 0),
    ("read of nothing at the end", p.READ, read(SIZE, 0), IN_C, 0),
    ("read past the end", p.READ, read(SIZE + PAGE, PAGE), UP, 0),
    ("read of the directory", p.READ, read(0, PAGE), UP, errno.EISDIR),
    ("write inside", p.WRITE, write(2 * PAGE, DATA), IN_C, 0),
    ("write unaligned", p.WRITE, write(5 * PAGE + 7, DATA[:5000]), IN_C, 0),
    ("write beyond max_write", p.WRITE, write(0, DATA * 6), IN_C, 0),
    ("write of the last page", p.WRITE, write(SIZE - PAGE, DATA[:PAGE]), IN_C, 0),
    ("write across the end", p.WRITE, write(SIZE - PAGE, DATA[: 2 * PAGE]), UP, 0),
    ("write at the end", p.WRITE, write(SIZE, DATA[:PAGE]), UP, errno.ENOSPC),
    ("write of nothing at the end", p.WRITE, write(SIZE, b""), UP, errno.ENOSPC),
    ("write whose size field lies", p.WRITE, write(0, DATA[:PAGE], PAGE + 1), UP, errno.EINVAL),
    ("punch of whole pages", p.FALLOCATE, fallocate(3 * PAGE, 6 * PAGE), IN_C, 0),
    ("punch unaligned", p.FALLOCATE, fallocate(12 * PAGE + 100, 2 * PAGE), UP, 0),
    ("punch of the last pages", p.FALLOCATE, fallocate(SIZE - 2 * PAGE, 2 * PAGE), IN_C, 0),
    ("punch across the end", p.FALLOCATE, fallocate(SIZE - 2 * PAGE, 4 * PAGE), UP, 0),
    ("punch at the end", p.FALLOCATE, fallocate(SIZE, PAGE), UP, 0),
    ("zero range", p.FALLOCATE, fallocate(20 * PAGE, 3 * PAGE, p.FALLOC_FL_ZERO_RANGE), UP, 0),
    ("allocate", p.FALLOCATE, fallocate(0, PAGE, 0), UP, errno.EOPNOTSUPP),
]


@pytest.mark.parametrize(("name", "opcode", "body", "path", "error"), CASES, ids=[c[0] for c in CASES])
def test_both_paths_answer_alike(paths: Paths, name: str, opcode: int, body: bytes, path: str, error: int) -> None:
    nodeid = p.ROOT_ID if name == "read of the directory" else p.FILE_ID
    c_reply, py_reply, took = paths.send(opcode, body, nodeid)
    assert took == path
    assert c_reply == py_reply
    assert p.unpack_reply(c_reply)[0] == -error
    # and the same request once more, now that it changed what it changes
    c_reply, py_reply, _ = paths.send(opcode, body, nodeid)
    assert c_reply == py_reply


def test_the_cases_in_one_run(paths: Paths) -> None:
    """Every case, one after another on the same two devices, reads between."""
    for name, opcode, body, _path, _error in CASES:
        nodeid = p.ROOT_ID if name == "read of the directory" else p.FILE_ID
        c_reply, py_reply, _ = paths.send(opcode, body, nodeid)
        assert c_reply == py_reply, name
        for off in range(0, SIZE, 32 * PAGE):
            c_reply, py_reply, _ = paths.send(p.READ, read(off, 32 * PAGE))
            assert c_reply == py_reply, (name, off)
    assert paths.stats()["bugs"] == 0


def test_a_corrupt_object_is_eio_counted_once_and_serving_goes_on(paths: Paths) -> None:
    """A READ served in C that meets an object that does not decompress is
    answered EIO, as FuseFS answers it, counted once in failed_reads, and the
    next requests are served as before."""
    page = (b"zswapd corrupt test " * 300)[:PAGE]
    c_reply, py_reply, _ = paths.send(p.WRITE, write(PAGE, page))
    assert c_reply == py_reply
    for s in (paths.c_store, paths.py_store):
        corrupt_object(s.state, 1)
    failed = paths.c_store.c.failed_reads
    c_reply, py_reply, took = paths.send(p.READ, read(0, 4 * PAGE))
    assert took == IN_C and c_reply == py_reply and p.unpack_reply(c_reply)[0] == -errno.EIO
    assert paths.c_store.c.failed_reads == failed + 1
    c_reply, py_reply, took = paths.send(p.READ, read(2 * PAGE, 8 * PAGE))
    assert took == IN_C and c_reply == py_reply and p.unpack_reply(c_reply)[0] == 0
    # a punch frees the bad object: the device reads whole again
    c_reply, py_reply, _ = paths.send(p.FALLOCATE, fallocate(PAGE, PAGE))
    assert c_reply == py_reply
    assert paths.stats()["bugs"] == 0


def test_a_write_the_store_refuses_is_enospc_in_c(paths: Paths) -> None:
    """The store is full and stays full (usage at the limit): C asks the
    policy where the write stops, which says no; the reply is FuseFS's
    ENOSPC, the refused page was compressed once, failed_writes counts it."""
    for s in (paths.c_store, paths.py_store):
        s.set_limit(s.pool.mem_used_total)
        s.full = True
    before, failed = paths.c_store.pool.compressions, paths.c_store.c.failed_writes
    c_reply, py_reply, took = paths.send(p.WRITE, write(PAGE, DATA[:PAGE] * 4))
    assert took == IN_C and c_reply == py_reply and p.unpack_reply(c_reply)[0] == -errno.ENOSPC
    assert paths.c_store.pool.compressions - before == 1
    assert paths.c_store.c.failed_writes == failed + 1 == paths.py_store.c.failed_writes


def test_a_write_that_runs_out_of_room_goes_on_in_c(paths: Paths) -> None:
    """At its limit with half its objects freed, a write runs out of frames
    part way (NOROOM): C asks the policy, which compacts, and the write goes
    on from that page in C: one reply, each page compressed once."""
    for s in (paths.c_store, paths.py_store):
        for i in range(0, SIZE // PAGE, 2):
            s.discard(i * PAGE, PAGE)
        s.set_limit(s.pool.mem_used_total)
    data = b"".join(page_content(i) for i in range(16))
    before, hits = paths.c_store.pool.compressions, paths.c_store.c.limit_hits
    c_reply, py_reply, took = paths.send(p.WRITE, write(64 * PAGE, data))
    assert took == IN_C and c_reply == py_reply and p.unpack_reply(c_reply)[0] == 0
    assert paths.c_store.c.limit_hits > hits  # it did stop for room
    assert paths.c_store.pool.compressions - before == 16


def page_content(seed: int) -> bytes:
    """A page that lz4 compresses to about half, unlike its neighbours."""
    return (b"zswapd %d " % seed * 300)[: PAGE // 2] + bytes((seed * 31 + i * i) % 251 for i in range(PAGE // 2))
