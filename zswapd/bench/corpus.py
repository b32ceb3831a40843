"""The corpus: real memory pages of running processes, and the privacy
rules that hold for it and for every copy of it.

Privacy rules.  The corpus is other processes' memory, secrets included.
It and every file that receives a copy of it (the tmpfs-loop target's
file, targets.TmpfsLoopTarget) live only in a private directory
(``private_dir``: mode 0700, an unpredictable name, on tmpfs so that
nothing reaches a disk), in files created O_EXCL|O_NOFOLLOW with mode 0600
(``create_private``), and the directory is removed on every way out:
return, exception, Ctrl-C, and SIGTERM or SIGHUP, which raise SystemExit
while a benchmark runs (``exit_on_signals``) so that the ``finally``
clauses run.

Owns: those three helpers; the capture (``capture_corpus``: our own
workloads, programs the caller names, then the rest of the machine's
processes) and the description of a corpus file (``describe_corpus``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..codec import fill_word

PAGE = 4096
MIB = 1 << 20
# tmpfs, so captured memory never reaches a disk.
SHM = "/dev/shm"


@contextlib.contextmanager
def private_dir(parent: str = SHM) -> Iterator[str]:
    """A fresh directory only root can enter, removed with its contents at exit.
    Its path is resolved (no symlink in it), as the kernel names the file of
    a loop device on a file in it (swap.loops_backed_by)."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="zswapd-bench-", dir=parent))  # mode 0700, unpredictable name
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def create_private(path: str) -> int:
    """Open a new file for writing, mode 0600.  Fails rather than reuse or
    follow whatever already sits at ``path``."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def exit_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn the first of these signals into SystemExit(128 + signal), so that
    clean-up runs; later ones are ignored so they cannot cut the clean-up short."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise SystemExit(128 + signum)

    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


_WORKLOADS = {
    "python-dicts": (
        "import sys, time\n"
        "d = {f'key{i}': ('value %d ' % i) * (i % 40 + 1) for i in range(300000)}\n"
        "l = [str(i) * 3 for i in range(600000)]\n"
        "objs = [{'id': i, 'name': 'user%d' % i, 'tags': ['a', 'b', str(i % 7)]} for i in range(150000)]\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
    "sqlite": (
        "import sqlite3, time\n"
        "db = sqlite3.connect(':memory:')\n"
        "db.execute('create table t (id integer primary key, name text, email text, score real, body text)')\n"
        "db.executemany('insert into t values (?, ?, ?, ?, ?)', ((i, 'name%d' % i, 'u%d@example.org' % i,"
        " i * 0.37, 'lorem ipsum dolor sit amet %d ' % (i % 1000) * 4) for i in range(200000)))\n"
        "db.execute('create index ix on t (name)'); db.commit()\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
    "numpy": (
        "import time\n"
        "import numpy as np\n"
        "rng = np.random.default_rng(1)\n"
        "a = rng.normal(size=3_000_000)\n"
        "b = np.arange(4_000_000, dtype=np.int64) % 1000\n"
        "c = np.zeros((2000, 2000)); c[::17, ::13] = 1.5\n"
        "d = (rng.random(2_000_000) * 100).astype(np.float32)\n"
        "print('ready', flush=True); time.sleep(600)\n"
    ),
}


@dataclass
class Corpus:
    path: str
    pages: int
    zero_pages: int = 0
    same_pages: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def _anon_regions(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            perms = parts[1]
            name = parts[5] if len(parts) > 5 else ""
            if not perms.startswith("rw") or name not in ("", "[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            yield start, end


def _capture(pid: int, limit: int, out: Any) -> int:
    taken = 0
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return 0
    try:
        for start, end in _anon_regions(pid):
            pos = start
            while pos < end and taken < limit:
                n = min(MIB, end - pos, limit - taken)
                try:
                    chunk = os.pread(fd, n, pos)
                except OSError:
                    break
                chunk = chunk[: len(chunk) // PAGE * PAGE]
                out.write(chunk)
                taken += len(chunk)
                pos += n
            if taken >= limit:
                break
    except OSError:
        pass
    finally:
        os.close(fd)
    return taken


def capture_corpus(size: int, path: str, also: Mapping[str, int] | None = None) -> Corpus:
    """Anonymous pages of real processes: our workloads, then ``also`` (name
    -> pid of a program the caller runs, e.g. a database), each with the same
    share, then the rest of the machine's processes, until ``size`` bytes."""
    also = dict(also or {})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, code in _WORKLOADS.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/"
            )
        ready = {}
        for name, p in procs.items():
            assert p.stdout is not None
            ready[name] = p.stdout.readline().strip() == b"ready"
        corpus = Corpus(path, 0)
        share = size // (len(procs) + len(also) + 1)
        with os.fdopen(create_private(path), "wb") as out:
            for name, p in procs.items():
                if ready[name]:
                    corpus.sources[name] = _capture(p.pid, share, out) // PAGE
            for name, pid in also.items():
                corpus.sources[name] = _capture(pid, share, out) // PAGE
            others = size - sum(corpus.sources.values()) * PAGE
            mine = {os.getpid(), *[p.pid for p in procs.values()], *also.values()}
            taken = 0
            for entry in sorted(os.listdir("/proc")):
                if taken >= others:
                    break
                if entry.isdigit() and int(entry) not in mine:
                    taken += _capture(int(entry), min(16 * MIB, others - taken), out)
            corpus.sources["other-processes"] = taken // PAGE
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    return describe_corpus(path, corpus)


def describe_corpus(path: str, corpus: Corpus | None = None) -> Corpus:
    corpus = corpus or Corpus(path, 0)
    data = Path(path).read_bytes()
    corpus.pages = len(data) // PAGE
    for i in range(corpus.pages):
        word = fill_word(data[i * PAGE : (i + 1) * PAGE])
        if word is not None:
            corpus.same_pages += 1
            corpus.zero_pages += word == 0
    return corpus
