"""Exceptions shared by the device (the store) and the FUSE backends."""


class DeviceFull(Exception):
    """No room under the memory limit, even after compaction (ENOSPC)."""


class BadRequest(ValueError):
    """A range the device cannot take: negative or beyond its end (EINVAL)."""


class CorruptObject(ValueError):
    """A stored object did not decompress to a page: that read fails (EIO),
    is counted in failed_reads, and the device goes on serving."""
