"""The sans-I/O FUSE codec, byte for byte, against a store in memory, and the
session loop over a socket pair standing in for /dev/fuse.

Privilege: none (the real-mount version of the bug test is in
test_control.py, with the control-side one).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from zswapd.fuse import protocol as p
from zswapd.fuse.session import serve
from zswapd.store import Store

SIZE = 64 * 4096


def init_body(minor: int = 45, flags: int = 0xFFFFFFFF) -> bytes:
    return struct.pack("<IIII", 7, minor, 131072, flags) + bytes(48)


@pytest.fixture
def fs() -> p.FuseFS:
    f = p.FuseFS(Store(SIZE))
    r = f.handle(p.pack_request(p.INIT, 1, 0, init_body()))
    assert r is not None
    return f


def test_init_reply_bytes() -> None:
    f = p.FuseFS(Store(SIZE))
    kernel_flags = p.ASYNC_READ | p.BIG_WRITES | p.MAX_PAGES | (1 << 10)  # plus one we do not want
    out = f.handle(p.pack_request(p.INIT, 7, 0, init_body(45, kernel_flags)))
    assert out is not None
    expected = (
        struct.pack("<IiQ", 16 + 64, 0, 7)
        + struct.pack(
            "<IIIIHHIIHHI", 7, 38, 131072, p.ASYNC_READ | p.BIG_WRITES | p.MAX_PAGES, 64, 48, 1 << 20, 1, 256, 0, 0
        )
        + bytes(28)
    )
    assert bytes(out) == expected
    assert f.initialized and f.minor == 38


def test_init_too_old_kernel() -> None:
    f = p.FuseFS(Store(SIZE))
    err, unique, body = p.unpack_reply(f.handle(p.pack_request(p.INIT, 3, 0, init_body(minor=26))))  # type: ignore[arg-type]
    assert (err, unique, body) == (-errno.EPROTO, 3, b"")


def test_write_then_read_bytes(fs: p.FuseFS) -> None:
    data = b"hello zswapd" * 100
    write_in = struct.pack("<QQIIQII", 1, 5000, len(data), 0, 0, 0, 0)
    out = fs.handle(p.pack_request(p.WRITE, 9, p.FILE_ID, write_in + data))
    assert bytes(out) == struct.pack("<IiQ", 24, 0, 9) + struct.pack("<II", len(data), 0)  # type: ignore[arg-type]
    read_in = struct.pack("<QQIIQII", 1, 5000, len(data), 0, 0, 0, 0)
    out = fs.handle(p.pack_request(p.READ, 10, p.FILE_ID, read_in))
    assert bytes(out) == struct.pack("<IiQ", 16 + len(data), 0, 10) + data  # type: ignore[arg-type]


def test_read_past_end_is_short(fs: p.FuseFS) -> None:
    read_in = struct.pack("<QQIIQII", 1, SIZE - 100, 4096, 0, 0, 0, 0)
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.READ, 2, p.FILE_ID, read_in)))  # type: ignore[arg-type]
    assert err == 0 and len(body) == 100
    read_in = struct.pack("<QQIIQII", 1, SIZE + 4096, 4096, 0, 0, 0, 0)
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.READ, 3, p.FILE_ID, read_in)))  # type: ignore[arg-type]
    assert err == 0 and body == b""


def test_write_past_end(fs: p.FuseFS) -> None:
    data = b"x" * 4096
    w = struct.pack("<QQIIQII", 1, SIZE - 1000, 4096, 0, 0, 0, 0)
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.WRITE, 2, p.FILE_ID, w + data)))  # type: ignore[arg-type]
    assert err == 0 and struct.unpack("<II", body)[0] == 1000  # short write
    w = struct.pack("<QQIIQII", 1, SIZE, 4096, 0, 0, 0, 0)
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.WRITE, 3, p.FILE_ID, w + data)))  # type: ignore[arg-type]
    assert err == -errno.ENOSPC


def test_fallocate_modes(fs: p.FuseFS) -> None:
    store = fs.device
    assert isinstance(store, Store)
    store.write(0, b"\x55" * 3 + bytes(1000) + b"abc" * 5000)
    assert store.c.pages_stored == 4
    fa = struct.pack("<QQQII", 1, 0, 8192, 0x3, 0)
    out = fs.handle(p.pack_request(p.FALLOCATE, 4, p.FILE_ID, fa))
    assert bytes(out) == struct.pack("<IiQ", 16, 0, 4)  # type: ignore[arg-type]
    assert store.c.notify_free == 2
    assert store.read(0, 8192) == bytes(8192)
    fa = struct.pack("<QQQII", 1, 8192, 100, p.FALLOC_FL_ZERO_RANGE, 0)
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.FALLOCATE, 5, p.FILE_ID, fa)))  # type: ignore[arg-type]
    assert err == 0 and store.read(8192, 100) == bytes(100)
    for mode in (0, 0x1, 0x2, 0x8, 0x20):
        fa = struct.pack("<QQQII", 1, 0, 4096, mode, 0)
        err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.FALLOCATE, 6, p.FILE_ID, fa)))  # type: ignore[arg-type]
        assert err == -errno.EOPNOTSUPP, mode  # never ENOSYS: that disables discard for good


def test_unknown_opcode_is_enosys(fs: p.FuseFS) -> None:
    out = fs.handle(p.pack_request(99, 77, p.FILE_ID, b"whatever"))
    assert bytes(out) == struct.pack("<IiQ", 16, -errno.ENOSYS, 77)  # type: ignore[arg-type]
    out = fs.handle(p.pack_request(p.STATX, 78, p.FILE_ID, bytes(24)))
    assert bytes(out) == struct.pack("<IiQ", 16, -errno.ENOSYS, 78)  # type: ignore[arg-type]


def test_malformed_requests_get_einval(fs: p.FuseFS) -> None:
    # a body too short for its opcode
    out = fs.handle(p.pack_request(p.READ, 5, p.FILE_ID, b"\x00" * 8))
    assert bytes(out) == struct.pack("<IiQ", 16, -errno.EINVAL, 5)  # type: ignore[arg-type]
    # a length field that disagrees with the bytes read
    req = bytearray(p.pack_request(p.GETATTR, 6, p.FILE_ID, bytes(16)))
    req[0] = 200
    out = fs.handle(req)
    assert bytes(out) == struct.pack("<IiQ", 16, -errno.EINVAL, 6)  # type: ignore[arg-type]
    # a write whose size field lies
    w = struct.pack("<QQIIQII", 1, 0, 5000, 0, 0, 0, 0)
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.WRITE, 7, p.FILE_ID, w + b"abc")))  # type: ignore[arg-type]
    assert err == -errno.EINVAL
    assert fs.handle(b"short") is None


def test_open_is_root_only_and_direct_io(fs: p.FuseFS) -> None:
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.OPEN, 2, p.FILE_ID, bytes(8), uid=65534)))  # type: ignore[arg-type]
    assert err == -errno.EACCES
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.OPEN, 3, p.FILE_ID, bytes(8))))  # type: ignore[arg-type]
    assert err == 0 and struct.unpack("<QII", body)[1] & p.FOPEN_DIRECT_IO


def test_lookup_getattr_statfs(fs: p.FuseFS) -> None:
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.LOOKUP, 2, p.ROOT_ID, b"swap\0")))  # type: ignore[arg-type]
    assert err == 0
    nodeid = struct.unpack_from("<Q", body)[0]
    attr = p.ATTR.unpack_from(body, p.ENTRY_OUT_HEAD.size)
    assert nodeid == p.FILE_ID and attr[1] == SIZE and attr[9] == 0o100600 and attr[11:13] == (0, 0)
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.LOOKUP, 3, p.ROOT_ID, b"nope\0")))  # type: ignore[arg-type]
    assert err == -errno.ENOENT
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.STATFS, 4, p.ROOT_ID)))  # type: ignore[arg-type]
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _ = p.STATFS_OUT.unpack(body)
    assert bsize == 4096 and blocks == SIZE // 4096 and bfree == blocks


def test_setattr_refuses_resize_accepts_times(fs: p.FuseFS) -> None:
    body = bytearray(p.SETATTR_IN.size)
    struct.pack_into("<I", body, 0, p.FATTR_SIZE)
    struct.pack_into("<Q", body, 16, 0)
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.SETATTR, 2, p.FILE_ID, bytes(body))))  # type: ignore[arg-type]
    assert err == -errno.EPERM
    struct.pack_into("<I", body, 0, p.FATTR_MTIME)
    struct.pack_into("<Q", body, 40, 1234567)  # mtime
    err, _, reply = p.unpack_reply(fs.handle(p.pack_request(p.SETATTR, 3, p.FILE_ID, bytes(body))))  # type: ignore[arg-type]
    assert err == 0 and p.ATTR.unpack_from(reply, p.ATTR_OUT_HEAD.size)[4] == 1234567


def test_readdir_lists_the_file(fs: p.FuseFS) -> None:
    rd = struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0)
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.READDIR, 2, p.ROOT_ID, rd)))  # type: ignore[arg-type]
    assert err == 0 and b"swap" in body and b".." in body
    err, _, body = p.unpack_reply(fs.handle(p.pack_request(p.READDIRPLUS, 3, p.ROOT_ID, rd)))  # type: ignore[arg-type]
    assert err == 0 and b"swap" in body


def test_no_reply_for_forget_and_interrupt(fs: p.FuseFS) -> None:
    assert fs.handle(p.pack_request(p.FORGET, 2, p.FILE_ID, bytes(8))) is None
    assert fs.handle(p.pack_request(p.BATCH_FORGET, 3, 0, bytes(8))) is None
    assert fs.handle(p.pack_request(p.INTERRUPT, 4, 0, bytes(8))) is None


@settings(max_examples=300, deadline=None)
@given(
    opcode=st.one_of(st.integers(0, 60), st.sampled_from(sorted(p._HANDLERS))),
    nodeid=st.integers(0, 3),
    body=st.binary(max_size=200),
    uid=st.sampled_from([0, 65534]),
)
def test_fuzz_never_raises(opcode: int, nodeid: int, body: bytes, uid: int) -> None:
    """Any request gets a well-formed reply (or none) and no exception: handle
    lets bugs raise, so an internal error fails this test, not passes as EIO."""
    f = p.FuseFS(Store(SIZE))
    f.handle(p.pack_request(p.INIT, 1, 0, init_body()))
    out = f.handle(p.pack_request(opcode, 2, nodeid, body, uid=uid))
    if out is not None:
        err, unique, _ = p.unpack_reply(out)
        assert unique == 2 and err <= 0
        assert err != -errno.EIO, (opcode, nodeid, body)  # EIO only for "not initialised"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120), header_only=st.booleans())
def test_fuzz_raw_bytes_never_raise(data: bytes, header_only: bool) -> None:
    """Bytes that are not even a consistent header: no exception either."""
    f = p.FuseFS(Store(SIZE))
    f.handle(p.pack_request(p.INIT, 1, 0, init_body()))
    out = f.handle(data[: p.IN_HEADER.size] if header_only else data)
    if out is not None:
        p.unpack_reply(out)


def _boom(fs: p.FuseFS, hdr: p.InHeader, body: memoryview) -> bytes:
    raise RuntimeError("injected bug")


def test_a_handler_bug_raises_and_error_reply_answers_it(fs: p.FuseFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(p._HANDLERS, p.GETATTR, _boom)
    req = p.pack_request(p.GETATTR, 42, p.FILE_ID, bytes(16))
    with pytest.raises(RuntimeError, match="injected bug"):
        fs.handle(req)
    assert bytes(p.error_reply(req) or b"") == struct.pack("<IiQ", 16, -errno.EIO, 42)
    assert p.error_reply(memoryview(req), errno.ENOSPC) == struct.pack("<IiQ", 16, -errno.ENOSPC, 42)
    assert p.error_reply(req[:20]) is None  # cannot name the request
    assert p.error_reply(p.pack_request(p.FORGET, 43, p.FILE_ID, bytes(8))) is None  # gets no reply
    # expected errors stay replies
    err, _, _ = p.unpack_reply(fs.handle(p.pack_request(p.READ, 44, p.FILE_ID, bytes(8))))  # type: ignore[arg-type]
    assert err == -errno.EINVAL


@pytest.fixture
def fuse_pair() -> Iterator[tuple[int, socket.socket]]:
    """A SOCK_SEQPACKET pair: one read() is one request, as on /dev/fuse."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    kernel.settimeout(30)
    try:
        yield ours.fileno(), kernel
    finally:
        ours.close()
        kernel.close()


def test_session_answers_a_bug_with_eio_and_serves_on(
    fuse_pair: tuple[int, socket.socket], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fd, kernel = fuse_pair
    fs = p.FuseFS(Store(SIZE))
    monkeypatch.setitem(p._HANDLERS, p.GETATTR, _boom)
    replies: list[tuple[int, int, bytes]] = []

    async def kernel_side() -> None:
        def call(req: bytes) -> None:
            kernel.send(req)
            replies.append(p.unpack_reply(kernel.recv(p.READ_BUFFER)))

        await trio.to_thread.run_sync(call, p.pack_request(p.INIT, 1, 0, init_body()))
        for unique in (2, 3):  # the bug, twice: each gets EIO, neither ends the session
            await trio.to_thread.run_sync(call, p.pack_request(p.GETATTR, unique, p.FILE_ID, bytes(16)))
        await trio.to_thread.run_sync(kernel.send, p.pack_request(p.FORGET, 4, p.FILE_ID, bytes(8)))
        await trio.to_thread.run_sync(call, p.pack_request(p.STATFS, 5, p.ROOT_ID))
        data = b"after the bug" * 100
        w = struct.pack("<QQIIQII", 1, 4096, len(data), 0, 0, 0, 0)
        await trio.to_thread.run_sync(call, p.pack_request(p.WRITE, 6, p.FILE_ID, w + data))
        r = struct.pack("<QQIIQII", 1, 4096, len(data), 0, 0, 0, 0)
        await trio.to_thread.run_sync(call, p.pack_request(p.READ, 7, p.FILE_ID, r))
        await trio.to_thread.run_sync(call, p.pack_request(p.DESTROY, 8, 0))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel_side)
            await serve(fd, fs)  # returns at DESTROY

    with caplog.at_level(logging.ERROR, logger="zswapd.fuse"):
        trio.run(main)
    assert [(err, unique) for err, unique, _ in replies] == [
        (0, 1), (-errno.EIO, 2), (-errno.EIO, 3), (0, 5), (0, 6), (0, 7), (0, 8),
    ]  # fmt: skip
    assert replies[5][2] == b"after the bug" * 100
    assert fs.internal_errors == 2 and fs.errors == 2
    # one traceback: the second bug inside the same interval is only counted
    bug_logs = [r for r in caplog.records if "bug handling FUSE opcode 3" in r.getMessage()]
    assert len(bug_logs) == 1 and bug_logs[0].exc_info is not None
    assert "injected bug" in caplog.text


def test_session_survives_an_unexpected_read_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error other than ENODEV is logged and retried, never the end."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    fs = p.FuseFS(Store(SIZE))
    real_readv = os.readv
    failures = iter([OSError(errno.EIO, "injected"), OSError(errno.ENOMEM, "injected")])

    def flaky_readv(fd: int, buffers: list[bytearray]) -> int:
        e = next(failures, None)
        if e is not None:
            raise e
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", flaky_readv)
    try:
        kernel.send(p.pack_request(p.INIT, 1, 0, init_body()))
        kernel.send(p.pack_request(p.DESTROY, 2, 0))
        trio.run(serve, ours.fileno(), fs)
        kernel.settimeout(30)
        assert [p.unpack_reply(kernel.recv(4096))[:2] for _ in range(2)] == [(0, 1), (0, 2)]
    finally:
        ours.close()
        kernel.close()
