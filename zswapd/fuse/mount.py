"""mount(2) and umount2(2) for a FUSE connection, through libc."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .. import libc

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


def open_fuse() -> int:
    """A non-blocking /dev/fuse fd (trio waits on it with wait_readable)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


# FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t) in <linux/fuse.h>.
FUSE_DEV_IOC_CLONE = 0x8004E500


def clone_fuse(fd: int) -> int:
    """A new /dev/fuse fd on ``fd``'s connection (FUSE_DEV_IOC_CLONE).  It
    is its own open file description, so blocking even though ``fd`` is not,
    and it keeps its own list of requests in flight: the holder that made it
    must keep it for as long as the connection lives (docs/design.md,
    "Concurrency": a clone closed with its maker ends its requests with EIO)."""
    clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(clone, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError:
        os.close(clone)
        raise
    return clone


def mount(fd: int, mountpoint: str, fsname: str = "zswapd", subtype: str = "zswapd") -> None:
    # default_permissions makes the kernel enforce the file's 0600 root mode;
    # allow_other is deliberately absent: the file holds swapped-out memory.
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    libc.mount(fsname, mountpoint, f"fuse.{subtype}", MS_NOSUID | MS_NODEV, opts)


def unmount(mountpoint: str) -> bool:
    """Unmount; if the file is still busy, detach lazily.  True if it was
    unmounted at once, False if lazily."""
    try:
        libc.umount2(mountpoint, 0)
        return True
    except OSError as e:
        if e.errno != errno.EBUSY:
            return _not_mounted(e)
    try:
        libc.umount2(mountpoint, MNT_DETACH)
        return False
    except OSError as e:
        return _not_mounted(e)


def _not_mounted(e: OSError) -> bool:
    """True for EINVAL (not mounted, any more); anything else is raised."""
    if e.errno == errno.EINVAL:
        return True
    raise e


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, major:minor) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            point = parts[4].encode().decode("unicode_escape")
            out.append((point, rest.split()[0], parts[2]))
    return out


def _mounts_at(path: str) -> list[tuple[str, str]]:
    """(fs type, major:minor) of each mount at ``path``, bottom to top.
    The one comparison every check here uses: mountinfo lists real paths,
    and ``path`` is one (config.load resolves the daemon's paths once, at
    load), so the strings are compared as they are; no symlink is
    resolved here, and no path is stat'ed (a dead FUSE mount cannot be)."""
    path = os.path.normpath(path)
    return [(fstype, dev) for point, fstype, dev in _mounts() if point == path]


def mount_type(path: str) -> str | None:
    """The fs type of the topmost mount at exactly ``path``, or None.  Works
    on a dead FUSE mount, which cannot even be stat'ed (ENOTCONN)."""
    found = _mounts_at(path)
    return found[-1][0] if found else None


def abort_connection(path: str) -> None:
    """Abort the FUSE connection mounted at ``path`` through fusectl, so
    that nothing can wait on it for ever.  A no-op if it is gone already."""
    for fstype, dev in _mounts_at(path):
        if fstype.startswith("fuse"):
            try:
                with open(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass


def is_mountpoint(path: str) -> bool:
    return bool(_mounts_at(path))
