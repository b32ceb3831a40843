"""Optional second FUSE backend on pyfuse3 (libfuse), serving the same store.

It exists as a second opinion on our own protocol layer and for users who
prefer libfuse for a plain compressed RAM file.  pyfuse3 has no fallocate
handler: libfuse answers FUSE_FALLOCATE with ENOSYS, the kernel then disables
fallocate on the connection, and discards from a loop device never reach the
store.  So with this backend freed swap slots stay in the pool until
overwritten; the daemon warns about it and reports discard_supported: false.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

import pyfuse3

from ..errors import BadRequest, DeviceFull
from .protocol import FILE_NAME, Device

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1


class Operations(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self, device: Device) -> None:
        super().__init__()
        self.device = device
        self.mode = stat.S_IFREG | 0o600
        self.mtime_ns = time.time_ns()
        self.requests = 0
        self.errors = 0

    def _attr(self, inode: int) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.entry_timeout = a.attr_timeout = 1
        a.st_blksize = 4096
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = self.mode
            a.st_nlink = 1
            a.st_size = self.device.size
            a.st_blocks = self.device.size // 512
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != ROOT or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode not in (ROOT, FILE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if inode != FILE or fields.update_size and attr.st_size != self.device.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_uid and attr.st_uid != 0 or fields.update_gid and attr.st_gid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode:
            self.mode = stat.S_IFREG | (attr.st_mode & 0o7777)
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        return self._attr(FILE)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if ctx.uid != 0:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=FILE, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests += 1
        n = max(0, min(size, self.device.size - off))
        out = bytearray(n)
        if n:
            self.device.readinto(off, memoryview(out))
        return bytes(out)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests += 1
        if off >= self.device.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        n = min(len(buf), self.device.size - off)
        try:
            self.device.write(off, memoryview(buf)[:n])
        except DeviceFull:
            self.errors += 1
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except BadRequest:
            self.errors += 1
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        return n

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.device.size // 4096
        s.f_bfree = s.f_bavail = min(s.f_blocks, self.device.free_bytes_estimate() // 4096)
        s.f_files, s.f_ffree, s.f_favail, s.f_namemax = 1, 0, 0, 255
        return s

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE), 1)

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return inode == ROOT or ctx.uid == 0

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def releasedir(self, fh: int) -> None:
        pass


class Pyfuse3Server:
    """mount / serve / close around pyfuse3's global session."""

    def __init__(self, device: Device, mountpoint: str) -> None:
        self.ops = Operations(device)
        self.mountpoint = mountpoint

    def mount(self) -> None:
        # default_permissions and no allow_other, as the native backend.
        opts = set(pyfuse3.default_options) | {"fsname=zswapd", "subtype=zswapd", "default_permissions"}
        opts.discard("allow_other")
        pyfuse3.init(self.ops, self.mountpoint, opts)

    async def serve(self) -> None:
        await pyfuse3.main()

    def close(self) -> None:
        try:
            pyfuse3.close(unmount=os.path.ismount(self.mountpoint))
        except Exception:
            pass
