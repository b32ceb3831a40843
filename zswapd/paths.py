"""Safe paths for the daemon: the config file it trusts, lock files, the
control socket's directory and the mountpoint.

The daemon runs as root and creates files at paths an administrator chose.
If a path's directory were writable by another user, that user could plant a
symlink at the name we are about to create and make root write, chown or
mount over a file of their choosing.  So:

- configured paths are resolved once, at load (``resolve``), and only the
  real path is used from then on, so every comparison (with the mount
  table above all) is of one string against another;
- a symlink on the way is followed only if root owns it: in a sticky
  directory (/tmp) its owner could remove it and make a new one;
- every directory passed through is root's, and not writable by group or
  others unless it is sticky (as /tmp), which stops them renaming or
  removing entries they do not own.  sshd's StrictModes refuses /tmp as an
  ancestor too; a root-owned entry in a root-owned sticky directory can be
  renamed or removed by root alone, which is the property both are after;
- the directory that holds a path the daemon creates (its parent) must not
  be writable by anyone but root, sticky or not, and is not a symlink;
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
# As the kernel's MAXSYMLINKS: more on one path is a loop (ELOOP).
MAX_SYMLINKS = 40


class UnsafePath(Exception):
    pass


def root_only(path: str, st: os.stat_result, kind: str = "directory", sticky_ok: bool = False) -> None:
    """The one rule for what the daemon trusts: ``path`` (``st``, its lstat
    or fstat) is a ``kind`` ("directory" or "regular file") that root alone
    can change: root's, and not writable by group or others, unless
    ``sticky_ok`` and it is a sticky directory.  Raises UnsafePath naming
    what is wrong and the fix."""
    if not (stat.S_ISDIR if kind == "directory" else stat.S_ISREG)(st.st_mode):
        raise UnsafePath(f"{path} is not a {kind}")
    expected = f"expected a {kind} only root can change"
    if st.st_uid != 0:
        raise UnsafePath(f"{path} is owned by uid {st.st_uid}, not root; {expected} (fix: chown root {path})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise UnsafePath(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            + (" and not sticky" if sticky_ok else "")
            + f"; {expected} (fix: chmod go-w {path})"
        )


def check_passable(path: str, st: os.stat_result) -> None:
    """A directory the daemon looks through: what lies below it must not be
    replaceable by anyone but root, which a sticky directory guarantees too."""
    root_only(path, st, "directory", sticky_ok=True)


def resolve(path: str) -> str:
    """The real path of absolute ``path``, from the root down: each symlink
    followed only if root owns it, each directory looked into checked by
    ``check_passable``.  What does not exist yet is kept as written (the
    daemon creates it later, in a directory checked here).  Raises
    UnsafePath; OSError for what cannot be read."""
    todo = [part for part in reversed(path.split("/")) if part]
    real = "/"
    links = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            real = os.path.dirname(real)
            continue
        check_passable(real, os.lstat(real))
        here = os.path.join(real, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return os.path.normpath(os.path.join(here, *reversed(todo)))
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise UnsafePath(
                    f"{here} is a symlink owned by uid {st.st_uid}, who could point it elsewhere; expected "
                    "a symlink owned by root, or the real path in its place"
                )
            links += 1
            if links > MAX_SYMLINKS:
                raise UnsafePath(f"{path}: more than {MAX_SYMLINKS} symlinks on the way (a loop?)")
            target = os.readlink(here)
            if target.startswith("/"):
                real = "/"
            todo += [part for part in reversed(target.split("/")) if part]
            continue
        real = here
    return real


def resolve_parent(path: str) -> str:
    """``path`` with its directory resolved (``resolve``) and its last
    component as written: a mountpoint or a socket, which the daemon
    checks itself, and which must not be looked at here (a dead FUSE mount
    cannot even be stat'ed)."""
    return os.path.join(resolve(os.path.dirname(path)), os.path.basename(path))


def _check_ancestors(directory: str) -> None:
    """Every directory from / down to ``directory``'s parent is passable,
    and none is a symlink: configured paths were resolved at load, so one
    found now is a change made since, or a path that was never resolved."""
    try:
        real = resolve_parent(directory)
    except FileNotFoundError:
        raise UnsafePath(f"a directory on the way to {directory} was removed while it was checked") from None
    if real != directory:
        raise UnsafePath(f"{directory} goes through a symlink: its real path is {real}; expected the real path")


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
        os.chmod(directory, mode)  # whatever the umask (the unit's UMask=0077)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{directory} is a symlink; expected a real directory owned by root")
    root_only(directory, st)


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
