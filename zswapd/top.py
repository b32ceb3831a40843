"""`zswapd top`: the loop around zswapd/topview.py.

It asks the control socket for ``stats`` every ``-d`` seconds, hands the
last two snapshots to ``topview.build`` and shows ``topview.layout`` on
the terminal; everything shown is decided there, and tested there.  This
file owns only the I/O:

- the terminal: cbreak mode (keys without Enter; Ctrl-C still interrupts),
  the alternate screen and a hidden cursor, all given back on every way
  out (q, Ctrl-C, SIGTERM, SIGHUP, an error);
- drawing: with ``rich`` (``pip install zswapd[top]``) in colour, else
  plain text and ANSI cursor moves; either way at the terminal's size read
  again at every frame, and at once on SIGWINCH (a resize);
- keys: q quits, c asks the daemon to compact (root only: the daemon checks
  SO_PEERCRED, and top says so before asking), s changes the class order;
- a daemon that stops answering: the last screen stays, under a
  "reconnecting..." line, and top retries at every tick;
- not a terminal (a pipe, a file): plain frames one after the other, as
  ``top -b`` prints them.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from . import topview
from .cli import CallError, call, compact_result

MIN_DELAY = 0.1
MAX_DELAY = 3600.0
# A tick's stats request gives up after this long (at most): the screen and
# the keys must not freeze while a worker is being replaced.
POLL_TIMEOUT = 2.0
# A full compaction runs in bounded steps between requests; a big pool can
# take seconds.
COMPACT_TIMEOUT = 120.0
# How long a key's message stays on the footer.
MESSAGE_SECONDS = 5.0
STATS = {"cmd": "stats"}

# topview's span styles, in rich's style language.
STYLES = {
    "title": "bold",
    "label": "cyan",
    "bar": "green",
    "bar2": "blue",
    "bar3": "yellow",
    "empty": "bright_black",
    "dim": "dim",
    "bad": "bold red",
    "key": "reverse",
    "message": "bold yellow",
}
# The alternate screen and the cursor, for the plain screen (rich has its own).
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"


def _unicode(stream: TextIO) -> bool:
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "") == "utf8"


class PlainScreen:
    """Full-screen plain text: home, each line cleared to its end, the rest
    of the screen cleared."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def size(self) -> tuple[int, int]:
        size = shutil.get_terminal_size()
        return size.columns, size.lines

    def __enter__(self) -> PlainScreen:
        self.out.write(ENTER)
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.write(LEAVE)
        self.out.flush()

    def draw(self, lines: Sequence[topview.Line]) -> None:
        text = "\x1b[K\r\n".join("".join(t for t, _ in line) for line in lines)
        self.out.write("\x1b[H" + text + "\x1b[K\x1b[J")
        self.out.flush()


class RichScreen:
    """The same lines, in colour, through rich's Live on the alternate screen."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out)
        self.live = Live(console=self.console, screen=True, auto_refresh=False, redirect_stdout=False,
                         redirect_stderr=False)  # fmt: skip

    def size(self) -> tuple[int, int]:
        width, height = self.console.size
        return width, height

    def __enter__(self) -> RichScreen:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def draw(self, lines: Sequence[topview.Line]) -> None:
        from rich.console import Group
        from rich.text import Text

        texts = [Text.assemble(*((t, STYLES.get(s, "")) for t, s in line), no_wrap=True) for line in lines]
        self.live.update(Group(*texts), refresh=True)


def _screen(out: TextIO) -> PlainScreen | RichScreen:
    try:
        return RichScreen(out)
    except ImportError:  # the [top] extra is not installed
        return PlainScreen(out)


@contextlib.contextmanager
def _terminal(fd: int, wake: int) -> Iterator[None]:
    """cbreak mode on ``fd``; SIGWINCH writes to ``wake``; SIGTERM and
    SIGHUP end the loop like q, so the terminal is always given back."""
    saved = termios.tcgetattr(fd)
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP)}

    def resized(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(wake, b"w")

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGWINCH, resized)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in old.items():
            signal.signal(sig, handler)


class Top:
    """The interactive loop's state: the last two snapshots and what the
    keys changed."""

    def __init__(self, path: str, delay: float, first: dict[str, Any]) -> None:
        self.path = path
        self.delay = delay
        self.prev: dict[str, Any] | None = None
        self.cur = first
        self.prev_at = 0.0
        self.cur_at = time.monotonic()
        self.sort = topview.SORTS[0]
        self.message = ""
        self.message_until = 0.0
        self.lost_since: float | None = None
        self.lost_why = ""

    def poll(self) -> None:
        try:
            s = call(self.path, STATS, min(POLL_TIMEOUT, max(self.delay, 1.0)))
        except CallError as e:
            if self.lost_since is None:
                self.lost_since = time.monotonic()
            self.lost_why = str(e)
            return
        self.lost_since = None
        self.prev, self.prev_at = self.cur, self.cur_at
        self.cur, self.cur_at = s, time.monotonic()

    def say(self, message: str) -> None:
        self.message = message
        self.message_until = time.monotonic() + MESSAGE_SECONDS

    def lines(self, width: int, height: int | None, keys: bool, unicode: bool) -> list[topview.Line]:
        view = topview.build(self.prev, self.cur, self.cur_at - self.prev_at, self.sort)
        message = self.message if time.monotonic() < self.message_until else ""
        lines = topview.layout(view, width, height, message, keys, unicode)
        if self.lost_since is not None:
            lost = topview.lost_lines(self.lost_why, time.monotonic() - self.lost_since, width)
            lines = lost + lines[1:]  # in place of the title, which is old news
        return lines

    def key(self, k: str, redraw: Any) -> bool:
        """Act on one key; False to quit."""
        if k in "qQ":
            return False
        if k in "sS":
            self.sort = topview.next_sort(self.sort)
        elif k in "cC":
            if os.geteuid() != 0:
                self.say("compaction needs root: run zswapd top or zswapd compact as root")
                return True
            self.say("compacting...")
            redraw()
            try:
                self.say("compacted: " + compact_result(call(self.path, {"cmd": "compact"}, COMPACT_TIMEOUT)))
            except CallError as e:
                self.say(f"compact failed: {e}")
        return True


def run_top(path: str, delay: float, iterations: int | None) -> int:
    """`zswapd top`: 0 when quit (q, Ctrl-C, -n reached), 1 if the daemon
    cannot be reached at start."""
    try:
        first = call(path, STATS, POLL_TIMEOUT)
    except CallError as e:
        print(f"zswapd: {e}", file=sys.stderr)
        return 1
    top = Top(path, delay, first)
    try:
        if sys.stdin.isatty() and sys.stdout.isatty():
            return _interactive(top, iterations)
        return _batch(top, iterations)
    except KeyboardInterrupt:
        return 0


def _batch(top: Top, iterations: int | None) -> int:
    """Plain frames, a blank line apart, for a pipe or a file."""
    out = sys.stdout
    width = shutil.get_terminal_size().columns
    count = 0
    while True:
        lines = top.lines(width, None, keys=False, unicode=_unicode(out))
        out.write(topview.plain(lines) + "\n")
        out.flush()
        count += 1
        if iterations is not None and count >= iterations:
            return 0
        time.sleep(top.delay)
        top.poll()
        out.write("\n")


def _interactive(top: Top, iterations: int | None) -> int:
    fd = sys.stdin.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    unicode = _unicode(sys.stdout)
    try:
        with _terminal(fd, wake_w), _screen(sys.stdout) as screen:

            def redraw() -> None:
                width, height = screen.size()
                screen.draw(top.lines(width, height, keys=True, unicode=unicode))

            count = 1
            next_poll = time.monotonic() + top.delay
            while True:
                redraw()
                if iterations is not None and count >= iterations:
                    return 0
                ready, _, _ = select.select([fd, wake_r], [], [], max(0.0, next_poll - time.monotonic()))
                if wake_r in ready:  # a resize: draw again at the new size
                    os.read(wake_r, 64)
                if fd in ready:
                    keys = os.read(fd, 64).decode(errors="replace")
                    if not keys:  # the terminal is gone
                        return 0
                    for k in keys:
                        if not top.key(k, redraw):
                            return 0
                if time.monotonic() >= next_poll:
                    top.poll()
                    count += 1
                    next_poll = time.monotonic() + top.delay
    finally:
        os.close(wake_r)
        os.close(wake_w)
