"""`zswapd top`: the view byte for byte (zswapd/topview.py), then the real
thing under a pseudo-terminal against a real daemon, with rich and without
it, as root and as a member of [control] group.

Privilege: root for the daemon tests (FUSE mount, setuid to nobody)."""

from __future__ import annotations

import copy
import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_daemon

import zswapd.control  # noqa: F401  (imported before a child drops root: see _spawn_as_nobody)
import zswapd.top  # noqa: F401
from zswapd import topview
from zswapd.cli import main as cli_main

NOBODY, NOGROUP = 65534, 65534

CLASSES = [
    {"size": 48, "frames_per_zspage": 3, "objs_per_zspage": 256, "obj_allocated": 512, "obj_used": 500,
     "zspages": 2, "frames_used": 6, "freeable": 0},
    {"size": 64, "frames_per_zspage": 1, "objs_per_zspage": 64, "obj_allocated": 0, "obj_used": 0,
     "zspages": 0, "frames_used": 0, "freeable": 0},
    {"size": 1024, "frames_per_zspage": 1, "objs_per_zspage": 4, "obj_allocated": 40, "obj_used": 12,
     "zspages": 10, "frames_used": 10, "freeable": 7},
    {"size": 4096, "frames_per_zspage": 1, "objs_per_zspage": 1, "obj_allocated": 5, "obj_used": 5,
     "zspages": 5, "frames_used": 5, "freeable": 0},
]  # fmt: skip
BEFORE: dict[str, Any] = {
    "orig_data_size": 2105344, "compr_data_size": 57000, "mem_used_total": 86016, "mem_limit": 1 << 30,
    "pages_stored": 514, "same_pages": 2, "huge_pages": 5, "num_reads": 1000, "num_writes": 5000,
    "failed_reads": 0, "failed_writes": 0, "notify_free": 100, "pages_compacted": 30, "compactions": 3,
    "limit_hits": 0, "full": False, "algorithm": "zstd", "zstd_level": 3, "accept_percent": 90, "engine": "native",
    "classes": CLASSES, "fuse_threads": {"threads": 2, "alive": 2, "bugs": 0}, "task_failures": {},
    "process": {"supervisor_pid": 100, "worker_pid": 101, "worker_restarts": 1, "last_recovery_ms": 37.6},
    "device": {"path": "/run/zswapd/mnt/swap", "size": 4 << 30, "loop": "/dev/loop7",
               "mountpoint": "/run/zswapd/mnt", "swap": True},
    "uptime": 3725.5, "version": "0.1.0",
}  # fmt: skip
AFTER = {**copy.deepcopy(BEFORE), "num_reads": 1300, "num_writes": 5050, "notify_free": 160, "pages_compacted": 34,
         "compactions": 4, "failed_writes": 2, "uptime": 3727.5}  # fmt: skip

SCREEN_80x30 = """\
zswapd 0.1.0 on /dev/loop7 (swap on), up 1:02:07
device 4.0G  data 2.0M in 84.0K  ratio 24.48  zstd level 3
engine native, 2 threads
worker 101  restarts 1  last recovery 38 ms  supervisor 100
memory [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 84.0K of 1.0G limit (0.0%)

rates            reads        writes      discards   compactions  frames freed
per s            150.0          25.0          30.0           0.5           2.0
               refused
                   1.0

tiers (share of stored pages)
compressed  [██████████████████████████████████████████████████░] 507 pages
huge        [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 5 pages, 20.0K
same-filled [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 2 pages, 0B

classes by size
size  fullness                      used/alloc  zspages  frames  waste  freeable
  48 [█████████████████████░]  98%     500/512        2       6   576B         0
1024 [███████░░░░░░░░░░░░░░░]  30%       12/40       10      10  28.0K         7
4096 [██████████████████████] 100%         5/5        5       5     0B         0








q quit  c compact  s sort by waste"""

# A pipe at 50 columns: ASCII bars, no keys, every class, whole columns
# dropped from the right.
BATCH_50 = """\
zswapd 0.1.0 on /dev/loop7 (swap on), up 1:02:05
device 4.0G  data 2.0M in 84.0K  ratio 24.48
zstd level 3  engine native, 2 threads
worker 101  restarts 1  last recovery 38 ms
supervisor 100
memory [#.............] 84.0K of 1.0G limit (0.0%)

rates            reads        writes      discards
per s                -             -             -
           compactions  frames freed       refused
                     -             -             -

tiers (share of stored pages)
compressed  [#####################] 507 pages
huge        [#....................] 5 pages, 20.0K
same-filled [#....................] 2 pages, 0B

classes by size
size  fullness                 used/alloc  zspages
  48 [#################]  98%     500/512        2
1024 [#####............]  30%       12/40       10
4096 [#################] 100%         5/5        5"""

# Recompression (issue 19) and writeback (issue 20) light up their rates
# and tiers when the daemon reports them; a full pool is a problem.
FUTURE = """\
zswapd 0.1.0 on /dev/loop7 (swap on), up 1:02:07
device 4.0G  data 2.0M in 84.0K  ratio 24.48  zstd level 3
engine native, 2 threads
worker 101  restarts 1  last recovery 38 ms  supervisor 100
memory [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 84.0K of 1.0G limit (0.0%)
DEGRADED: pool full: writes refused until usage falls below 90% of the limit

rates             reads         writes       discards    compactions
per s             150.0           25.0           30.0            0.5
           frames freed        refused   recompressed     recomp cpu
                    2.0            1.0          100.0          25.0%
           written back  backing reads
                  500.0            5.0

tiers (share of stored pages)
compressed   [█████░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 207 pages
recompressed [███████░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 300 pages, saved 488.3K
 dict 1      [███████░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 300 pages, 64.0K
huge         [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 5 pages, 20.0K
same-filled  [█░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] 2 pages, 0B
backing      [████████████████████████░░░░░░░░░░░░] 1000 pages
backing file [█▓░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░] live 3.0M, dead 1.0M of 1.0G

classes by waste
size  fullness                      used/alloc  zspages  frames  waste  freeable
1024 [███████░░░░░░░░░░░░░░░]  30%       12/40       10      10  28.0K         7
  48 [█████████████████████░]  98%     500/512        2       6   576B         0
4096 [██████████████████████] 100%         5/5        5       5     0B         0
q quit  c compact  s sort by frames  compacting..."""


def test_screen_byte_for_byte() -> None:
    view = topview.build(BEFORE, AFTER, 2.0)
    assert topview.plain(topview.layout(view, 80, 30)) == SCREEN_80x30


def test_first_frame_in_a_pipe_byte_for_byte() -> None:
    view = topview.build(None, BEFORE, 0.0)
    assert topview.plain(topview.layout(view, 50, None, keys=False, unicode=False)) == BATCH_50


def test_recompression_and_writeback_light_up() -> None:
    before = {**copy.deepcopy(BEFORE), "bd_count": 0, "bd_reads": 0, "bd_writes": 0,
              "recompress": {"pages": 100, "recompressed": 100, "bytes_saved": 100000, "cpu_seconds": 12.0,
                             "dictionaries": []}}  # fmt: skip
    after = {
        **copy.deepcopy(AFTER), "full": True, "bd_count": 1000, "bd_reads": 10, "bd_writes": 1000,
        "recompress": {"pages": 300, "recompressed": 300, "bytes_saved": 500000, "cpu_seconds": 12.5,
                       "dictionaries": [{"id": 1, "bytes": 65536, "pages": 300}]},
        "writeback": {"file": "/var/swapback", "size": 1 << 30, "live_bytes": 3 << 20, "dead_bytes": 1 << 20},
    }  # fmt: skip
    view = topview.build(before, after, 2.0, "waste")
    assert topview.plain(topview.layout(view, 80, None, message="compacting...")) == FUTURE


def test_rates_after_a_counter_went_back_or_another_daemon() -> None:
    went_back = {**copy.deepcopy(AFTER), "num_reads": 10}
    rates = {r.label: r.value for r in topview.build(BEFORE, went_back, 1.0).rates}
    assert rates["reads"] is None and rates["writes"] == 50.0
    other = copy.deepcopy(AFTER)
    other["process"]["supervisor_pid"] = 200
    assert all(r.value is None for r in topview.build(BEFORE, other, 1.0).rates)


def test_sorts_cycle_and_a_short_screen_says_what_it_left_out() -> None:
    assert [topview.next_sort(s) for s in topview.SORTS] == ["waste", "frames", "size"]
    lines = topview.plain(topview.layout(topview.build(BEFORE, AFTER, 2.0, "frames"), 80, 21)).splitlines()
    assert len(lines) == 21 and lines[-1].startswith("q quit")
    assert lines[-3:-1] == ["1024 [███████░░░░░░░░░░░░░░░]  30%       12/40       10      10  28.0K         7",
                            "... 2 more classes"]  # fmt: skip


def test_classes_show_zspages_by_fullness_group() -> None:
    """Each class's zspages by fullness group (stats' "fullness", as the
    kernel's zsmalloc classes file), one cell per group, as high as its
    share of the row's largest; a narrow terminal drops the column first."""
    after = copy.deepcopy(AFTER)
    for c, groups in zip(after["classes"], ([0] * 10 + [2], [0] * 11, [6, 0, 3, 1] + [0] * 7, [0] * 10 + [5])):
        c["fullness"] = groups
    lines = topview.plain(topview.layout(topview.build(BEFORE, after, 2.0), 100, None, unicode=False)).splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("size  fullness"))
    assert lines[heading].endswith("10%..100%")
    assert lines[heading + 2].startswith("1024 [") and lines[heading + 2].endswith(
        "  @ =:"
    )  # trailing empty groups: blank
    assert lines[heading + 1].endswith("          @")  # size 48: two zspages, both full
    narrow = topview.plain(topview.layout(topview.build(BEFORE, after, 2.0), 80, None)).splitlines()
    assert not any("10%..100%" in line for line in narrow)
    assert topview.spark([0, 1, 2, 4], " .:-=+*#%@") == " :=@" and topview.spark([0, 0], "ab") == "aa"


@pytest.mark.parametrize("width", [20, 33, 61, 200])
@pytest.mark.parametrize("height", [1, 5, 24, 60])
def test_every_size_fits(width: int, height: int) -> None:
    lines = topview.layout(topview.build(BEFORE, AFTER, 2.0), width, height, message="x" * 300)
    assert len(lines) == height
    assert all(len("".join(t for t, _ in line)) <= width for line in lines)


# -- the real thing, under a pseudo-terminal ----------------------------------

_ANSI = re.compile(r"\x1b(\[[0-9;?<=>]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])")


class Pty:
    """A child on a pseudo-terminal: keys in, screen text out."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd
        self.raw = b""
        self.status: int | None = None

    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode(errors="replace"))

    def read(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                self.raw += os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the child is gone
                time.sleep(timeout)

    def wait_for(self, what: str | Callable[[str], bool], timeout: float = 30, since: int = 0) -> None:
        """Until the output after byte ``since`` holds ``what``."""
        check = what if callable(what) else lambda text: what in text
        deadline = time.monotonic() + timeout
        while not check(_ANSI.sub("", self.raw[since:].decode(errors="replace"))):
            assert time.monotonic() < deadline, f"no {what!r} on the screen:\n{self.text()[-3000:]}"
            self.read(0.1)

    def send(self, keys: bytes) -> int:
        mark = len(self.raw)
        os.write(self.fd, keys)
        return mark

    def resize(self, rows: int, cols: int) -> int:
        mark = len(self.raw)
        # On the master: the kernel sends SIGWINCH to the terminal's
        # foreground process group.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return mark

    def exit_code(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            assert time.monotonic() < deadline, f"still running:\n{self.text()[-3000:]}"
            self.read(0.05)
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            self.raw += chunk
        return os.waitstatus_to_exitcode(self.status)

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = 0
        os.close(self.fd)


@pytest.fixture
def spawned() -> Iterator[list[Pty]]:
    children: list[Pty] = []
    yield children
    for child in children:
        child.close()


def _spawn(children: list[Pty], argv: list[str], rows: int = 30, cols: int = 100) -> Pty:
    env = {**os.environ, "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    env.pop("NO_COLOR", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execve(sys.executable, [sys.executable, *argv], env)
        finally:
            os._exit(127)
    child = Pty(pid, fd)
    children.append(child)
    return child


def _spawn_as_nobody(children: list[Pty], args: list[str], rows: int = 30, cols: int = 100) -> Pty:
    """top as uid nobody in group nogroup.  The interpreter lives where
    nobody may not read, so the child does not exec: it drops root and runs
    the CLI it already has, with everything it imports imported here."""
    import rich.console
    import rich.live
    import rich.text

    rich.console.Console(file=io.StringIO(), force_terminal=True, width=80).print(rich.text.Text("warm", "bold"))
    pid, fd = pty.fork()
    if pid == 0:
        code = 99
        try:
            # A fork keeps the test process's signal dispositions, which
            # earlier tests may have changed (a worker run in-process ignores
            # SIGINT): start from those a fresh `zswapd top` has.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
                signal.signal(sig, signal.SIG_DFL)
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            code = cli_main(args)
            sys.stdout.flush()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    child = Pty(pid, fd)
    children.append(child)
    return child


def _write_pages(d: Daemon, n: int) -> None:
    with open(d.file, "r+b", buffering=0) as f:
        for i in range(n):
            f.write((b"page %d " % i * 300)[:4096].ljust(4096, b"\0"))


def _no_rich(*argv: str) -> list[str]:
    """python -c that runs the CLI as if rich were not installed."""
    return ["-c", "import sys; sys.modules['rich'] = None; from zswapd.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv]  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_top_on_a_terminal(tmp_path: Path, spawned: list[Pty], rich: bool) -> None:
    with run_daemon(tmp_path) as d:
        args = ["top", "--socket", d.socket, "-d", "0.2"]
        top = _spawn(spawned, ["-m", "zswapd", *args] if rich else _no_rich(*args), rows=30, cols=100)
        top.wait_for("classes by size")
        top.wait_for("q quit  c compact  s sort by waste")  # the frame's last line, maybe in a later read
        mark = len(top.raw)
        _write_pages(d, 3000)
        top.wait_for(lambda text: "compressed" in text and "3000 pages" in text, since=mark)

        top.wait_for("classes by waste", since=top.send(b"s"))

        # Resized: the next frames fit the new width.
        mark = top.resize(20, 60)

        def narrow(text: str) -> bool:
            last = text.rfind("memory [")
            return last >= 0 and "\n" in text[last:] and len(text[last:].split("\n")[0].rstrip()) <= 60

        top.wait_for(narrow, since=mark)

        top.wait_for("compacted: freed", since=top.send(b"c"))

        # The daemon goes away: no traceback, a line that says so, and top
        # comes back when a daemon listens on the socket again.
        mark = len(top.raw)
        assert d.stop() == 0
        top.wait_for("reconnecting...", since=mark)
        assert "Traceback" not in top.text()

        top.send(b"q")
        assert top.exit_code() == 0
    text = top.text()
    assert "Traceback" not in text
    assert b"\x1b[?1049l" in top.raw  # the alternate screen was left: the terminal is given back


@pytest.mark.root
def test_top_comes_back_when_the_daemon_does(tmp_path: Path, spawned: list[Pty]) -> None:
    with run_daemon(tmp_path) as d:
        top = _spawn(spawned, ["-m", "zswapd", "top", "--socket", d.socket, "-d", "0.2"])
        top.wait_for("classes by size")
        first_pid = d.stats()["process"]["worker_pid"]  # type: ignore[index]
    mark = len(top.raw)
    top.wait_for("reconnecting...", since=mark)
    with run_daemon(tmp_path) as d2:
        pid = d2.stats()["process"]["worker_pid"]  # type: ignore[index]
        assert pid != first_pid
        top.wait_for(f"worker {pid}", since=mark)
        top.send(b"q")
        assert top.exit_code() == 0


@pytest.mark.root
def test_top_as_a_member_of_the_stats_group(public_dir: Path, spawned: list[Pty]) -> None:
    """nobody in [control] group: the view works, `c` says it needs root
    (and asks nothing), Ctrl-C quits with 0 and gives the terminal back."""
    with run_daemon(public_dir, control={"group": "nogroup"}) as d:
        os.chmod(Path(d.socket).parent, 0o755)
        top = _spawn_as_nobody(spawned, ["top", "--socket", d.socket, "-d", "0.2"])
        top.wait_for("classes by size")
        top.wait_for("compaction needs root", since=top.send(b"c"))
        assert d.stats()["compactions"] == 0
        top.send(b"\x03")  # Ctrl-C
        assert top.exit_code() == 0
    assert "Traceback" not in top.text()
    assert b"\x1b[?1049l" in top.raw


@pytest.mark.root
def test_top_in_a_pipe_prints_frames(daemon: Daemon) -> None:
    r = subprocess.run([sys.executable, "-m", "zswapd", "top", "--socket", daemon.socket, "-d", "0.1", "-n", "3"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "90"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("classes by size") == 3, r.stdout
    assert "\x1b" not in r.stdout and "q quit" not in r.stdout
    assert all(len(line) <= 90 for line in r.stdout.splitlines())


def test_top_without_a_daemon_is_a_clear_exit_1(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "zswapd", "top", "--socket", str(tmp_path / "none.sock"), "-n", "1"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr
    for bad in (["-d", "0"], ["-d", "nan"], ["-n", "0"]):
        r = subprocess.run([sys.executable, "-m", "zswapd", "top", *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
