"""The sans-I/O FUSE codec, byte for byte, against a store in memory."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zswapd.fuse import protocol as p
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
@given(opcode=st.integers(0, 60), nodeid=st.integers(0, 3), body=st.binary(max_size=200))
def test_fuzz_never_raises(opcode: int, nodeid: int, body: bytes) -> None:
    f = p.FuseFS(Store(SIZE))
    f.handle(p.pack_request(p.INIT, 1, 0, init_body()))
    out = f.handle(p.pack_request(opcode, 2, nodeid, body))
    if out is not None:
        err, unique, _ = p.unpack_reply(out)
        assert unique == 2 and err <= 0
