"""Safe creation of the daemon's own paths: lock files, the control socket's
directory and the mountpoint.

The daemon runs as root and creates files at paths an administrator chose.
If a path's directory were writable by another user, that user could plant a
symlink at the name we are about to create and make root write, chown or
mount over a file of their choosing.  So:

- the directory that holds a path (its parent) must not be writable by
  anyone but root, and must not be a symlink;
- every directory above it must be root's, or, if others may write to it,
  carry the sticky bit (as /tmp does), which stops them renaming or
  replacing entries they do not own;
- the final component is created or opened with O_NOFOLLOW and checked with
  lstat, never followed.

Errors are ``UnsafePath`` with a message that names the path, what is wrong
and what is expected.
"""

from __future__ import annotations

import errno
import os
import stat

# Directories the daemon creates for itself (/run/zswapd): readable by all,
# so `zswapd stats` from a member of [control] group can reach the socket.
DIR_MODE = 0o755


class UnsafePath(Exception):
    pass


def _writable_by_others(st: os.stat_result) -> bool:
    return st.st_uid != 0 or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_ancestors(directory: str) -> None:
    """Every directory from / down to ``directory``'s parent: root's, or
    sticky if others may write to it."""
    parts = [p for p in directory.split("/") if p]
    here = "/"
    for part in parts[:-1]:
        here = os.path.join(here, part)
        st = os.stat(here)  # an ancestor symlink is fine if it leads to a safe place
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{here} is not a directory")
        if _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(
                f"{here} is writable by a user other than root and not sticky, so {directory} could be "
                "replaced under the daemon; expected a directory owned by root, not group- or world-writable"
            )


def safe_dir(directory: str, mode: int = DIR_MODE) -> None:
    """Create ``directory`` (and missing parents) as root's with ``mode``
    (parents 0755), or check an existing one.  Raises UnsafePath."""
    directory = os.path.normpath(directory)
    if directory == "/":
        return
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        safe_dir(parent)
    _check_ancestors(directory)
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{directory} is a symlink; expected a real directory owned by root")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{directory} exists and is not a directory")
    if _writable_by_others(st):
        raise UnsafePath(
            f"{directory} is writable by a user other than root (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}); expected a directory owned by root and not group- or world-writable"
        )


def safe_parent(path: str) -> None:
    """The directory that will hold ``path`` exists and is safe."""
    safe_dir(os.path.dirname(os.path.normpath(path)))


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """open(2) of ``path`` in a safe directory, never through a symlink, and
    only of a regular file."""
    safe_parent(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symlink
            raise UnsafePath(f"{path} is a symlink; expected a regular file or nothing") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file")
    return fd
