"""`zswapd bench`: figures as ratios against a baseline measured in the same
run; ``docs/benchmarks.md`` says how to read them.  One module per job:

``corpus``   real memory pages of running processes, and the privacy rules
             for them and every copy (read its top before touching it);
``targets``  the devices measured: zswapd (this build or a ``--baseline-src``
             tree), zram, a loop device over a tmpfs file; each as the only
             swap for the app benchmark;
``device``   ``bench device``: dd, fio, ratio and fragmentation on every
             target, alternated, medians, ratios;
``app``      ``bench app``: a real program swapping in a memory cgroup;
``recompress`` ``bench recompress``: the recompression tier against zram
             and the per-page ceiling;
``ceiling``  the per-page ceiling of a codec, level and dictionary, with no
             pool around it (also ``python -m zswapd.bench.ceiling``);
``pool``     ``bench pool``: the store against bare lz4, in process;
``tiers``    ``bench tiers``: writeback against zram with a disk swap file
             and the kernel's zswap, on an LRU-inversion workload
             (``tiers_workload``, a program of its own);
``report``   the tables and the chart they print.

The names below are the package's interface (the CLI and the tests
import them from here).
"""

from __future__ import annotations

from .app import bench_app, remove_cgroup
from .corpus import MIB, PAGE, Corpus, capture_corpus, create_private, describe_corpus, exit_on_signals, private_dir
from .device import bench_device, run_targets
from .pool import bench_pool, sample_pages
from .recompress import bench_recompress
from .targets import Target, TmpfsLoopTarget, ZramTarget, ZswapdTarget
from .tiers import bench_tiers

__all__ = [
    "MIB",
    "PAGE",
    "Corpus",
    "Target",
    "TmpfsLoopTarget",
    "ZramTarget",
    "ZswapdTarget",
    "bench_app",
    "bench_device",
    "bench_pool",
    "bench_recompress",
    "bench_tiers",
    "capture_corpus",
    "create_private",
    "describe_corpus",
    "exit_on_signals",
    "private_dir",
    "remove_cgroup",
    "run_targets",
    "sample_pages",
]
