"""Sans-I/O codec for the kernel FUSE protocol (linux/fuse.h, 7.31 and later).

Glossary:
  request   bytes read from /dev/fuse: a 40-byte ``fuse_in_header`` then the
            opcode's body;
  reply     a 16-byte ``fuse_out_header`` (error is a negative errno) then the
            opcode's reply body; FORGET, BATCH_FORGET and INTERRUPT get none;
  nodeid    1 is the root directory, 2 the one device file;
  device    what the file serves: anything with the ``Device`` interface
            (the page store, or a test double).

``FuseFS.handle(request) -> reply | None`` does no I/O and keeps no global
state.  A READ reply is built in a buffer owned by the FuseFS and is valid
until the next call.

Errors, as h11 does them: what a request can cause (a malformed body, a range
the device refuses, a full pool, a stored object that does not decompress) is
a reply (EINVAL, ENOSPC, EIO).  A genuine bug
raises out of ``handle``; the I/O loop decides what that means, and answers
with ``error_reply`` so the caller is not left waiting.
"""

from __future__ import annotations

import errno
import logging
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import BadRequest, CorruptObject, DeviceFull

log = logging.getLogger("zswapd.fuse")

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, FLUSH, INIT = 20, 22, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, INTERRUPT, DESTROY = 34, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS = 42, 43, 44
STATX = 52

# INIT flags.
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES

FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# SETATTR valid bits.
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

KERNEL_MAJOR = 7
OUR_MINOR = 38
MIN_MINOR = 31

ROOT_ID = 1
FILE_ID = 2
FILE_NAME = b"swap"
MAX_WRITE = 1 << 20
MAX_PAGES_COUNT = MAX_WRITE // 4096
# /dev/fuse read() fails with EINVAL unless the buffer holds max_write plus
# the biggest header (in header + write_in = 80 bytes); keep a page spare.
READ_BUFFER = MAX_WRITE + 4096

IN_HEADER = struct.Struct("<IIQQIIIHH")  # 40 bytes
OUT_HEADER = struct.Struct("<IiQ")  # 16 bytes
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # + ATTR = 128 bytes
ATTR_OUT_HEAD = struct.Struct("<QII")  # + ATTR = 104 bytes
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (+ flags2 ...)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")  # 40 bytes
WRITE_IN = struct.Struct("<QQIIQII")  # 40 bytes
WRITE_OUT = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")  # 32 bytes
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # 80 bytes
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
ACCESS_IN = struct.Struct("<II")
DIRENT = struct.Struct("<QQII")  # + name, padded to 8
BATCH_FORGET_IN = struct.Struct("<II")

DT_DIR, DT_REG = 4, 8
NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT))


class Device(Protocol):
    """What a FUSE backend serves: the page store satisfies it."""

    size: int

    def readinto(self, offset: int, out: memoryview) -> int: ...

    def write(self, offset: int, data: memoryview) -> int: ...

    def discard(self, offset: int, length: int) -> int: ...

    def zero_range(self, offset: int, length: int) -> int: ...

    def free_bytes_estimate(self) -> int: ...


@dataclass
class InHeader:
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def pack_request(
    opcode: int, unique: int, nodeid: int, body: bytes = b"", uid: int = 0, gid: int = 0, pid: int = 1
) -> bytes:
    """Build a request as the kernel would (for tests and tools)."""
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body


def unpack_reply(data: bytes | memoryview) -> tuple[int, int, bytes]:
    """(error, unique, body) of a reply; checks the length field."""
    length, error, unique = OUT_HEADER.unpack_from(data, 0)
    if length != len(data):
        raise ValueError(f"reply length field {length} != {len(data)} bytes")
    return error, unique, bytes(data[OUT_HEADER.size :])


def error_reply(req: bytes | bytearray | memoryview, error: int = errno.EIO) -> bytes | None:
    """An error reply to a raw request whatever its body, for the I/O loop to
    answer a request whose handler failed; None when there is nothing to
    answer (too short to name, or an opcode that gets no reply)."""
    if len(req) < IN_HEADER.size:
        return None
    _len, opcode, unique = IN_HEADER.unpack_from(req, 0)[:3]
    if opcode in NO_REPLY:
        return None
    return reply(unique, error=error)


# FUSE_NOTIFY_RESEND (linux/fuse.h, 7.40): a notification is an out-header
# with unique 0 and the notify code in the error field.  The kernel then
# queues again every request the server had read but not answered, with
# bit 63 set in their unique.
NOTIFY_RESEND = 7


def notify_resend() -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


def reply(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


class FuseFS:
    """One directory holding one regular file of fixed size."""

    def __init__(self, device: Device, mode: int = 0o600, name: bytes = FILE_NAME) -> None:
        self.device = device
        self.name = name
        self.mode = stat.S_IFREG | (mode & 0o7777)
        now = time.time()
        self.times = [now, now, now]  # atime, mtime, ctime
        self.initialized = False
        self.destroyed = False
        # Called after INIT is answered, with (minor, max_readahead, flags):
        # the worker saves them in the state, because a live connection
        # never sends INIT again and a new worker must restore them.
        self.on_init: Callable[[int, int, int], None] | None = None
        self.minor = 0
        self.max_write = MAX_WRITE
        self.requests = 0
        self.errors = 0
        self.internal_errors = 0  # bugs, counted by the I/O loop
        self._out = bytearray(OUT_HEADER.size + MAX_WRITE)
        self._outv = memoryview(self._out)

    def restore_init(self, minor: int) -> None:
        """Take over a connection whose INIT an earlier worker answered."""
        if not MIN_MINOR <= minor <= OUR_MINOR:
            raise ValueError(f"saved FUSE minor {minor} is outside {MIN_MINOR}..{OUR_MINOR}")
        self.minor = minor
        self.initialized = True

    # -- attributes ---------------------------------------------------------

    def _attr(self, nodeid: int) -> bytes:
        a, m, c = self.times
        if nodeid == ROOT_ID:
            return ATTR.pack(ROOT_ID, 0, 0, int(a), int(m), int(c), 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        size = self.device.size
        return ATTR.pack(
            FILE_ID, size, size // 512, int(a), int(m), int(c),
            int(a % 1 * 1e9), int(m % 1 * 1e9), int(c % 1 * 1e9),
            self.mode, 1, 0, 0, 0, 4096, 0,
        )  # fmt: skip

    def _entry(self, nodeid: int) -> bytes:
        return ENTRY_OUT_HEAD.pack(nodeid, 0, 1, 1, 0, 0) + self._attr(nodeid)

    # -- dispatch -----------------------------------------------------------

    def handle(self, req: bytes | bytearray | memoryview) -> bytes | memoryview | None:
        """Answer one request.  Never raises for bad input; a bug raises."""
        self.requests += 1
        if len(req) < IN_HEADER.size:
            self.errors += 1
            return None  # cannot even name the request
        hdr = InHeader(*IN_HEADER.unpack_from(req, 0)[:7])
        if hdr.len != len(req):
            self.errors += 1
            return reply(hdr.unique, error=errno.EINVAL)
        body = memoryview(req)[IN_HEADER.size :]
        op = hdr.opcode
        if op in NO_REPLY:
            return None  # no reply; nothing is in flight to interrupt
        if op != INIT and not self.initialized:
            return reply(hdr.unique, error=errno.EIO)
        handler = _HANDLERS.get(op)
        if handler is None:
            return reply(hdr.unique, error=errno.ENOSYS)
        try:
            result: bytes | memoryview = handler(self, hdr, body)
            return result
        except struct.error:
            self.errors += 1
            return reply(hdr.unique, error=errno.EINVAL)
        except DeviceFull:
            self.errors += 1
            return reply(hdr.unique, error=errno.ENOSPC)
        except CorruptObject:
            # Counted in failed_reads where it was found; the rest serves on.
            self.errors += 1
            return reply(hdr.unique, error=errno.EIO)
        except BadRequest:
            self.errors += 1
            return reply(hdr.unique, error=errno.EINVAL)

    def _init(self, hdr: InHeader, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
        if major != KERNEL_MAJOR or minor < MIN_MINOR:
            log.error("kernel FUSE %d.%d is too old; need 7.%d", major, minor, MIN_MINOR)
            return reply(hdr.unique, error=errno.EPROTO)
        self.minor = min(minor, OUR_MINOR)
        self.initialized = True
        if self.on_init is not None:
            self.on_init(self.minor, max_readahead, flags & WANTED_FLAGS)
        out = INIT_OUT.pack(
            KERNEL_MAJOR, self.minor, max_readahead, flags & WANTED_FLAGS,
            64, 48, MAX_WRITE, 1, MAX_PAGES_COUNT, 0, 0,
        )  # fmt: skip
        return reply(hdr.unique, out)

    def _lookup(self, hdr: InHeader, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        if hdr.nodeid != ROOT_ID or name != self.name:
            return reply(hdr.unique, error=errno.ENOENT)
        return reply(hdr.unique, self._entry(FILE_ID))

    def _getattr(self, hdr: InHeader, body: memoryview) -> bytes:
        if hdr.nodeid not in (ROOT_ID, FILE_ID):
            return reply(hdr.unique, error=errno.ENOENT)
        return reply(hdr.unique, ATTR_OUT_HEAD.pack(1, 0, 0) + self._attr(hdr.nodeid))

    def _setattr(self, hdr: InHeader, body: memoryview) -> bytes:
        f = SETATTR_IN.unpack_from(body, 0)
        valid, size, atime, mtime = f[0], f[3], f[5], f[6]
        atimens, mtimens, mode, uid, gid = f[8], f[9], f[11], f[13], f[14]
        if hdr.nodeid != FILE_ID:
            return reply(hdr.unique, error=errno.EPERM)
        if valid & FATTR_SIZE and size != self.device.size:
            return reply(hdr.unique, error=errno.EPERM)  # a device does not resize
        if valid & FATTR_UID and uid != 0 or valid & FATTR_GID and gid != 0:
            return reply(hdr.unique, error=errno.EPERM)  # the file stays root's
        now = time.time()
        if valid & FATTR_MODE:
            self.mode = stat.S_IFREG | (mode & 0o7777)
        if valid & FATTR_ATIME:
            self.times[0] = now if valid & FATTR_ATIME_NOW else atime + atimens / 1e9
        if valid & FATTR_MTIME:
            self.times[1] = now if valid & FATTR_MTIME_NOW else mtime + mtimens / 1e9
        self.times[2] = now
        return reply(hdr.unique, ATTR_OUT_HEAD.pack(1, 0, 0) + self._attr(FILE_ID))

    def _open(self, hdr: InHeader, body: memoryview) -> bytes:
        OPEN_IN.unpack_from(body, 0)
        if hdr.nodeid != FILE_ID:
            return reply(hdr.unique, error=errno.EISDIR)
        if hdr.uid != 0:
            # Second line of defence behind default_permissions: the file
            # holds other processes' swapped-out memory.
            return reply(hdr.unique, error=errno.EACCES)
        return reply(hdr.unique, OPEN_OUT.pack(1, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0))

    def _opendir(self, hdr: InHeader, body: memoryview) -> bytes:
        if hdr.nodeid != ROOT_ID:
            return reply(hdr.unique, error=errno.ENOTDIR)
        return reply(hdr.unique, OPEN_OUT.pack(0, 0, 0))

    # READ, WRITE and FALLOCATE below are the protocol's rules for the device
    # file.  The C FUSE threads serve the requests that ``admit`` in
    # zswapd/engine/fuse_ops.c lets through without coming here, and must
    # answer them with the same bytes as these methods would
    # (tests/test_fuse_paths.py sends the edges of that rule through both);
    # a change to either side's rule changes the other.

    def _read(self, hdr: InHeader, body: memoryview) -> bytes | memoryview:
        _fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        if hdr.nodeid != FILE_ID:
            return reply(hdr.unique, error=errno.EISDIR)
        if size > self.max_write:
            return reply(hdr.unique, error=errno.EINVAL)
        n = max(0, min(size, self.device.size - offset))  # short read at the end
        if n:
            self.device.readinto(offset, self._outv[OUT_HEADER.size : OUT_HEADER.size + n])
        OUT_HEADER.pack_into(self._out, 0, OUT_HEADER.size + n, 0, hdr.unique)
        return self._outv[: OUT_HEADER.size + n]

    def _write(self, hdr: InHeader, body: memoryview) -> bytes:
        _fh, offset, size = WRITE_IN.unpack_from(body, 0)[:3]
        data = body[WRITE_IN.size :]
        if len(data) != size:
            return reply(hdr.unique, error=errno.EINVAL)
        if hdr.nodeid != FILE_ID:
            return reply(hdr.unique, error=errno.EISDIR)
        if offset >= self.device.size:
            return reply(hdr.unique, error=errno.ENOSPC)  # as a block device says
        n = min(size, self.device.size - offset)  # short write at the end
        self.device.write(offset, data[:n])
        return reply(hdr.unique, WRITE_OUT.pack(n, 0))

    def _fallocate(self, hdr: InHeader, body: memoryview) -> bytes:
        # Never ENOSYS here: the kernel would disable fallocate for good and
        # every later discard from the loop device would fail.
        _fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body, 0)
        if hdr.nodeid != FILE_ID:
            return reply(hdr.unique, error=errno.EISDIR)
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            op = self.device.discard
        elif mode in (FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            op = self.device.zero_range
        else:
            return reply(hdr.unique, error=errno.EOPNOTSUPP)
        end = min(offset + length, self.device.size)
        if end > offset:
            op(offset, end - offset)
        return reply(hdr.unique)

    def _statfs(self, hdr: InHeader, body: memoryview) -> bytes:
        blocks = self.device.size // 4096
        free = min(blocks, self.device.free_bytes_estimate() // 4096)
        # f_bsize 4096: the loop device takes its discard granularity from it.
        return reply(hdr.unique, STATFS_OUT.pack(blocks, free, free, 1, 0, 4096, 255, 4096, 0))

    def _ok(self, hdr: InHeader, body: memoryview) -> bytes:
        return reply(hdr.unique)

    def _access(self, hdr: InHeader, body: memoryview) -> bytes:
        mask = ACCESS_IN.unpack_from(body, 0)[0]
        if hdr.nodeid == FILE_ID and hdr.uid != 0 and mask:
            return reply(hdr.unique, error=errno.EACCES)
        return reply(hdr.unique)

    def _destroy(self, hdr: InHeader, body: memoryview) -> bytes:
        self.destroyed = True
        return reply(hdr.unique)

    def _dir_entries(self) -> list[tuple[int, bytes, int]]:
        return [(ROOT_ID, b".", DT_DIR), (ROOT_ID, b"..", DT_DIR), (FILE_ID, self.name, DT_REG)]

    def _readdir_any(self, hdr: InHeader, body: memoryview, plus: bool) -> bytes:
        _fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        if hdr.nodeid != ROOT_ID:
            return reply(hdr.unique, error=errno.ENOTDIR)
        out = bytearray()
        for index, (ino, name, kind) in enumerate(self._dir_entries()):
            if index < offset:
                continue
            rec = DIRENT.pack(ino, index + 1, len(name), kind) + name
            rec += b"\0" * (-len(rec) % 8)
            if plus:
                entry = self._entry(ino) if ino == FILE_ID else bytes(ENTRY_OUT_HEAD.size) + self._attr(ino)
                rec = entry + rec
            if len(out) + len(rec) > size:
                break
            out += rec
        return reply(hdr.unique, bytes(out))

    def _readdir(self, hdr: InHeader, body: memoryview) -> bytes:
        return self._readdir_any(hdr, body, False)

    def _readdirplus(self, hdr: InHeader, body: memoryview) -> bytes:
        return self._readdir_any(hdr, body, True)


_HANDLERS = {
    INIT: FuseFS._init,
    LOOKUP: FuseFS._lookup,
    GETATTR: FuseFS._getattr,
    SETATTR: FuseFS._setattr,
    OPEN: FuseFS._open,
    READ: FuseFS._read,
    WRITE: FuseFS._write,
    FALLOCATE: FuseFS._fallocate,
    STATFS: FuseFS._statfs,
    FLUSH: FuseFS._ok,
    FSYNC: FuseFS._ok,
    RELEASE: FuseFS._ok,
    OPENDIR: FuseFS._opendir,
    READDIR: FuseFS._readdir,
    READDIRPLUS: FuseFS._readdirplus,
    RELEASEDIR: FuseFS._ok,
    FSYNCDIR: FuseFS._ok,
    ACCESS: FuseFS._access,
    DESTROY: FuseFS._destroy,
}
