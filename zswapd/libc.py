"""libc through ctypes, once: the one handle (``LIBC``) and thin wrappers for
the calls Python's ``os`` and ``mmap`` modules do not offer (fallocate with
modes, mincore, mlock, mlockall, prctl, mount, umount2, statfs's filesystem
type, and an mmap whose address a caller can pass on to them).

Each wrapper raises ``OSError`` with the call's errno and the name of what
failed; the caller decides whether that is fatal, a warning or expected.
Nothing here keeps state besides the handle.
"""

from __future__ import annotations

import ctypes
import os


class Statfs(ctypes.Structure):
    """struct statfs (x86_64 and the other 64-bit Linux ABIs)."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


# The libc this process already runs on (dlopen(NULL)): the same symbols
# Python itself uses, no second copy loaded.
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(Statfs)]
LIBC.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(Statfs)]
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
LIBC.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.mlockall.argtypes = [ctypes.c_int]
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# fallocate(2) modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# Free a range, keeping the file's size: it reads as zeros after.
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
# mlockall(2) flags; MCL_ONFAULT (Linux 4.4) locks pages as they are touched.
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
# mmap(2)
PROT_READ = 1
MAP_SHARED = 1
_MAP_FAILED = ctypes.c_void_p(-1).value


def _error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` (os.posix_fallocate takes none)."""
    if LIBC.fallocate(fd, mode, offset, length) != 0:
        raise _error("fallocate")


def fs_type(where: int | str) -> int:
    """The filesystem type (statfs f_type, e.g. TMPFS_MAGIC) of the open
    file ``where`` (an fd) or of the path ``where``."""
    buf = Statfs()
    if isinstance(where, int):
        r = LIBC.fstatfs(where, ctypes.byref(buf))
    else:
        r = LIBC.statfs(os.fsencode(where), ctypes.byref(buf))
    if r != 0:
        raise _error(f"statfs {where}")
    return int(buf.f_type) & 0xFFFFFFFF


def mincore(addr: int, length: int, vec: ctypes.Array[ctypes.c_ubyte]) -> None:
    """Residency of the pages of [addr, addr + length) into ``vec``, one
    byte per page (bit 0: resident)."""
    if LIBC.mincore(addr, length, vec) != 0:
        raise _error("mincore")


def mlock(addr: int, length: int) -> None:
    if LIBC.mlock(addr, length) != 0:
        raise _error("mlock")


def mlockall(flags: int) -> None:
    if LIBC.mlockall(flags) != 0:
        raise _error("mlockall")


def mmap(length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    """The address of a new mapping (Python's mmap hides it, and a ctypes
    view of one pins it against close)."""
    addr = LIBC.mmap(None, length, prot, flags, fd, offset)
    if addr in (None, _MAP_FAILED):
        raise _error("mmap")
    return int(addr)


def munmap(addr: int, length: int) -> None:
    if LIBC.munmap(addr, length) != 0:
        raise _error("munmap")


def prctl(option: int, arg: int) -> None:
    """prctl(2) with one argument (the rest 0)."""
    if LIBC.prctl(option, arg, 0, 0, 0) != 0:
        raise _error("prctl")


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if LIBC.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        raise _error(f"mount {target}")


def umount2(target: str, flags: int) -> None:
    if LIBC.umount2(target.encode(), flags) != 0:
        raise _error(f"umount {target}")
