"""zswapd: a userspace compressed-swap daemon (a zram you can read and extend)."""

__version__ = "0.1.0"
