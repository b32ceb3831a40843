"""Loop device, mkswap, swapon and swapoff: the swap lifecycle over the file.

Linux cannot swapon a FUSE file (FUSE has no bmap), so the file is attached to
a loop device with direct I/O and that device becomes the swap.  Every step
that touches the file needs a worker answering FUSE requests, so the
supervisor runs them beside its event loop: the util-linux tools (their argv
built here) as child processes, and the attach ioctl, whose open() of the
file goes through FUSE, in a short-lived forked child.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import time
from dataclasses import dataclass

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_DIRECT_IO = 16
# struct loop_config: fd, block_size, loop_info64 (232 bytes), 8 reserved u64.
# lo_flags sits at byte 52 of loop_info64.
_CONFIG_SIZE = 4 + 4 + 232 + 64
_FLAGS_AT = 8 + 52
TOOLS = ("mkswap", "swapon", "swapoff")


class SwapError(Exception):
    pass


def preflight() -> None:
    """Fail before mounting if swap cannot possibly be set up."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SwapError(f"{', '.join(missing)} not found in PATH (install util-linux)")
    try:
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise SwapError(f"/dev/loop-control: {e.strerror} (is the loop module loaded?)") from None
    try:
        fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as e:
        raise SwapError(f"no free loop device: {e.strerror}") from None
    finally:
        os.close(fd)


@dataclass
class Loop:
    path: str
    fd: int  # held by the supervisor (and its fd store) until it detaches


def attach_blocking(backing: str) -> Loop:
    """Bind a free loop device to ``backing`` with direct I/O.  Not
    autoclear: the device must outlive the process that attached it (the
    supervisor's short-lived child), and is detached explicitly."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{n}"
            lfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            ffd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
            try:
                cfg = bytearray(_CONFIG_SIZE)
                struct.pack_into("<II", cfg, 0, ffd, 0)
                struct.pack_into("<I", cfg, _FLAGS_AT, LO_FLAGS_DIRECT_IO)
                fcntl.ioctl(lfd, LOOP_CONFIGURE, bytes(cfg))
                return Loop(path, lfd)
            except OSError as e:
                os.close(lfd)
                if e.errno != 16:  # EBUSY: another process took it first
                    raise SwapError(f"attaching {backing} to {path}: {e.strerror}") from None
            finally:
                os.close(ffd)
        raise SwapError("no free loop device after 16 tries")
    finally:
        os.close(ctl)


def dio_enabled(loop: Loop) -> bool:
    name = os.path.basename(loop.path)
    try:
        with open(f"/sys/block/{name}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def backing_file(loop_path: str) -> str | None:
    name = os.path.basename(loop_path)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def mkswap_argv(device: str) -> list[str]:
    return ["mkswap", "--label", "zswapd", device]


def swapon_argv(device: str, priority: int, discard: str) -> list[str]:
    argv = ["swapon", "--priority", str(priority)]
    if discard != "none":
        argv.append(f"--discard={discard}")
    return [*argv, device]


def swapoff_argv(device: str) -> list[str]:
    return ["swapoff", device]


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``: the one answer to "which
    loop devices use this file" (the daemon, the bench and the tests' clean-up
    all ask it).  Read from sysfs, where the kernel names each loop device's
    file by its absolute path; ``path`` is compared as a string, never
    resolved, since a stat on a file in a FUSE mount with nobody serving it
    would hang.  Also finds a device a losetup attached but was killed
    before it printed the name of."""
    want = os.path.abspath(path)
    out: list[str] = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for name in names:
        if name.startswith("loop") and backing_file(name) == want:
            out.append(f"/dev/{name}")
    return out


def swap_used_kib(device: str) -> int | None:
    """KiB of swap in use on ``device``, or None if it is not a swap area."""
    real = os.path.realpath(device)
    with open("/proc/swaps") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts and parts[0] == real:
                return int(parts[3])
    return None


def detach_sync(device: str, timeout: float = 10.0) -> None:
    """Detach a loop device and wait until it lets go of its file: ours at
    teardown (after our own fd on it is closed), one a dead instance left,
    or one another process attached to our file."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError:
        pass  # not bound any more, or autoclear is already detaching it
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while backing_file(device) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
