"""What `zswapd top` shows: two stats snapshots in, a screen of text out.

Sans-I/O, like the protocol codec: ``build`` turns the previous and the
current ``stats`` replies and the seconds between them into a ``View``;
``layout`` lays a View out for a terminal of a given size as lines of
styled spans.  ``plain`` joins the spans; zswapd/top.py gives them colours
when ``rich`` is installed.  Nothing here reads a clock, a socket or a
terminal, so tests/test_top.py checks the screen byte for byte.

Glossary
--------
snapshot
    One reply of the control socket's ``stats`` (docs/control.md).
rate
    A counter's increase per second between two snapshots.  None (shown
    ``-``) when there is no earlier snapshot or the counter went back: a new
    daemon, or a worker that died before it saved its counters.
tier
    Where stored pages live.  In RAM: compressed, huge (stored raw, a frame
    each) and same-filled (no memory); once recompression reports them
    (stats ``recompress``), recompressed pages and each dictionary.  On disk,
    once writeback reports it (stats ``writeback``, ``bd_count``): the
    backing file's live and dead bytes.  Sections whose stats are absent are
    not shown, so this view works with any daemon version.
waste
    A size class's frame bytes that hold no live object:
    ``frames_used * 4096 - obj_used * size``.  Compaction can give back the
    part of it that makes whole zspages (``freeable``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .cli import _human as human
from .health import assess

FRAME = 4096
# Orders of the class table, in the order the `s` key cycles through them.
SORTS = ("size", "waste", "frames")
# A bar never gets narrower than this, however narrow the terminal.
MIN_BAR = 10
# Characters of a bar's segments, filled to empty: first for UTF-8
# terminals, second for anything else (a pipe, a file, a C locale).
UNICODE_BAR = "█▓▒░"
ASCII_BAR = "#=+."
KEYS = "q quit  c compact  s sort by"

# (label, path in the stats, kind): counters are shown per second; a gauge
# per second of its net change; cpu seconds as a percentage of one core.
# Those the daemon does not report (recompression and writeback, before the
# daemon has them) are left out.
RATES = (
    ("reads", ("num_reads",), "counter"),  # FUSE read requests: swap-ins
    ("writes", ("num_writes",), "counter"),  # FUSE write requests: swap-outs
    ("discards", ("notify_free",), "counter"),  # pages freed by the kernel's discards
    ("compactions", ("compactions",), "counter"),
    ("frames freed", ("pages_compacted",), "counter"),  # by compaction
    ("refused", ("failed_writes",), "counter"),  # writes refused: the pool was full
    ("recompressed", ("recompress", "recompressed"), "counter"),  # pages recompressed (ever; rewrites undo some)
    ("recomp cpu", ("recompress", "cpu_seconds"), "cpu"),
    ("written back", ("bd_writes",), "counter"),  # pages
    ("backing reads", ("bd_reads",), "counter"),  # pages
)

Span = tuple[str, str]  # (text, style); styles are named in top.STYLES
Line = list[Span]


@dataclass(frozen=True)
class Rate:
    label: str
    value: float | None  # per second, or % of a core for "cpu"
    kind: str


@dataclass(frozen=True)
class Bar:
    """A labelled bar: ``parts`` are (amount, style) drawn in order on a
    scale of ``total``; ``text`` follows it."""

    label: str
    parts: tuple[tuple[float, str], ...]
    total: float
    text: str


@dataclass(frozen=True)
class ClassRow:
    size: int
    obj_used: int
    obj_allocated: int
    zspages: int
    frames: int
    freeable: int  # zspages compaction could free
    # Zspages by fullness group, emptiest first, full last (stats'
    # "fullness", pool.FULLNESS_LABELS); () from a daemon without it.
    groups: tuple[int, ...] = ()

    @property
    def waste(self) -> int:
        return self.frames * FRAME - self.obj_used * self.size

    @property
    def fullness(self) -> float:
        return self.obj_used / self.obj_allocated if self.obj_allocated else 0.0


@dataclass(frozen=True)
class View:
    title: str
    header: tuple[tuple[str, ...], ...]  # groups of items, each group from a new line
    memory: Bar
    problems: tuple[str, ...]  # health.assess: why the daemon is degraded
    rates: tuple[Rate, ...]
    tiers: tuple[Bar, ...]
    classes: tuple[ClassRow, ...]
    sort: str


def next_sort(sort: str) -> str:
    return SORTS[(SORTS.index(sort) + 1) % len(SORTS)]


def _get(s: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = s
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _rate(
    prev: Mapping[str, Any] | None, cur: Mapping[str, Any], path: Sequence[str], kind: str, dt: float
) -> float | None:
    if prev is None or not dt > 0:
        return None
    before, after = _get(prev, path), _get(cur, path)
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return None
    if kind != "gauge" and (
        after < before or _get(prev, ("process", "supervisor_pid")) != _get(cur, ("process", "supervisor_pid"))
    ):
        return None  # a counter that went back, or another daemon
    return (after - before) / dt * (100 if kind == "cpu" else 1)


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h}:{m:02}:{s:02}"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def build(prev: Mapping[str, Any] | None, cur: Mapping[str, Any], dt: float, sort: str = "size") -> View:
    """The view of snapshot ``cur``, with rates against ``prev`` taken
    ``dt`` seconds earlier."""
    dev: Mapping[str, Any] = cur.get("device") or {}
    proc: Mapping[str, Any] = cur.get("process") or {}
    threads_: Mapping[str, Any] = cur.get("fuse_threads") or {}
    used, data, limit = cur["mem_used_total"], cur["orig_data_size"], cur["mem_limit"]
    swap = "" if dev.get("loop") is None else f" ({'swap on' if dev.get('swap') else 'swap off'})"
    title = (
        f"zswapd {cur.get('version', '?')} on {dev.get('loop') or dev.get('path', '?')}{swap}, "
        f"up {_duration(cur.get('uptime', 0))}"
    )
    algorithm = cur["algorithm"] + (f" level {cur['zstd_level']}" if cur["algorithm"] == "zstd" else "")
    threads = f", {threads_['threads']} threads" if threads_.get("threads") else ""
    recovery = proc.get("last_recovery_ms")
    header = (
        (
            f"device {human(dev.get('size', 0))}",
            f"data {human(data)} in {human(used)}",
            f"ratio {data / used if used else 0.0:.2f}",
            algorithm,
            f"engine {cur.get('engine', '?')}{threads}",
        ),
        (
            f"worker {_or_dash(proc.get('worker_pid'))}",
            f"restarts {_or_dash(proc.get('worker_restarts'))}",
            f"last recovery {'-' if recovery is None else f'{recovery:.0f} ms'}",
            f"supervisor {_or_dash(proc.get('supervisor_pid'))}",
        ),
    )
    scale = limit or dev.get("size") or used or 1
    memory = Bar(
        "memory",
        ((used, "bar"),),
        scale,
        f"{human(used)} of {human(limit)} limit ({100 * used / limit:.1f}%)" if limit else f"{human(used)}, no limit",
    )
    rates = [
        Rate(label, _rate(prev, cur, path, kind, dt), kind)
        for label, path, kind in RATES
        if _get(cur, path) is not None
    ]
    return View(
        title=title,
        header=header,
        memory=memory,
        problems=tuple(assess(cur)),
        rates=tuple(rates),
        tiers=_tiers(cur),
        classes=_classes(cur, sort),
        sort=sort,
    )


def _tiers(s: Mapping[str, Any]) -> tuple[Bar, ...]:
    stored, same, huge = s["pages_stored"], s["same_pages"], s["huge_pages"]
    recompressed = _get(s, ("recompress", "pages"))
    backing = s.get("bd_count")
    pages = stored + (backing or 0)
    compressed = stored - same - huge - (recompressed or 0)
    bars = [Bar("compressed", ((compressed, "bar"),), pages, f"{compressed} pages")]
    if recompressed is not None:
        saved = _get(s, ("recompress", "bytes_saved")) or 0
        bars.append(
            Bar("recompressed", ((recompressed, "bar2"),), pages, f"{recompressed} pages, saved {human(saved)}")
        )
        for d in _get(s, ("recompress", "dictionaries")) or ():
            bars.append(
                Bar(f" dict {d['id']}", ((d["pages"], "bar2"),), pages, f"{d['pages']} pages, {human(d['bytes'])}")
            )
    bars.append(Bar("huge", ((huge, "bar3"),), pages, f"{huge} pages, {human(huge * FRAME)}"))
    bars.append(Bar("same-filled", ((same, "bar3"),), pages, f"{same} pages, 0B"))
    wb = s.get("writeback")
    if backing is not None:
        bars.append(Bar("backing", ((backing, "bar2"),), pages, f"{backing} pages"))
    if isinstance(wb, Mapping):
        live, dead, size = wb.get("live_bytes", 0), wb.get("dead_bytes", 0), wb.get("size", 0)
        bars.append(
            Bar(
                "backing file",
                ((live, "bar"), (dead, "bar3")),
                size or live + dead or 1,
                f"live {human(live)}, dead {human(dead)} of {human(size)}",
            )
        )
    return tuple(bars)


def _classes(s: Mapping[str, Any], sort: str) -> tuple[ClassRow, ...]:
    rows = [
        ClassRow(
            c["size"],
            c["obj_used"],
            c["obj_allocated"],
            c["zspages"],
            c["frames_used"],
            c["freeable"],
            tuple(c.get("fullness", ())),
        )  # fmt: skip
        for c in s.get("classes", ())
        if c["zspages"]
    ]
    if sort == "waste":
        rows.sort(key=lambda r: (-r.waste, r.size))
    elif sort == "frames":
        rows.sort(key=lambda r: (-r.frames, r.size))
    else:
        rows.sort(key=lambda r: r.size)
    return tuple(rows)


# -- layout -------------------------------------------------------------------


def _bar(parts: Sequence[tuple[float, str]], total: float, width: int, chars: str) -> Line:
    """``width`` cells: each part's share of ``total`` in its own character,
    the rest empty.  Rounded to the nearest cell, but anything above zero
    shows."""
    spans: Line = []
    left = width
    for i, (amount, style) in enumerate(parts):
        cells = min(left, max(1, round(width * amount / total))) if amount > 0 and total > 0 else 0
        if cells:
            spans.append((chars[min(i, len(chars) - 2)] * cells, style))
        left -= cells
    if left:
        spans.append((chars[-1] * left, "empty"))
    return spans


def _bar_lines(bars: Sequence[Bar], width: int, chars: str) -> list[Line]:
    """Bars one under the other, their labels and their bars the same width."""
    label_width = max(len(b.label) for b in bars)
    bar_width = max(MIN_BAR, width - label_width - len(" [] ") - max(len(b.text) for b in bars))
    return [
        [(b.label.ljust(label_width), "label"), (" [", ""), *_bar(b.parts, b.total, bar_width, chars), ("] ", ""),
         (b.text, "")]
        for b in bars
    ]  # fmt: skip


def _number(rate: Rate) -> str:
    if rate.value is None:
        return "-"
    if rate.kind == "cpu":
        return f"{rate.value:.1f}%"
    return f"{rate.value:,.1f}" if abs(rate.value) < 1e5 else f"{rate.value:,.0f}"


def _rate_lines(rates: Sequence[Rate], width: int) -> list[Line]:
    """Rates as rows of equal cells, labels above values, wrapped to the
    width."""
    cell = max(max(len(r.label), len(_number(r))) for r in rates) + 2
    per_row = max(1, (width - 8) // cell)
    out: list[Line] = []
    for start in range(0, len(rates), per_row):
        row = rates[start : start + per_row]
        out.append(
            [(("rates" if start == 0 else "").ljust(8), "title"), *((r.label.rjust(cell), "label") for r in row)]
        )
        out.append([(("per s" if start == 0 else "").ljust(8), "dim"), *((_number(r).rjust(cell), "") for r in row)])
    return out


CLASS_COLUMNS = ("size", "used/alloc", "zspages", "frames", "waste", "freeable", "10%..100%")
# Heights of the fullness histogram's cells, none to most: each cell is one
# group's zspages against the row's largest group.
UNICODE_SPARK = " ▁▂▃▄▅▆▇█"
ASCII_SPARK = " .:-=+*#%@"


def spark(counts: Sequence[int], levels: str) -> str:
    """One character per count, its height the count's share of the largest;
    anything above zero shows."""
    top = max(counts, default=0)
    if top <= 0:
        return levels[0] * len(counts)
    return "".join(levels[0] if n <= 0 else levels[max(1, round((len(levels) - 1) * n / top))] for n in counts)


def _class_lines(view: View, width: int, rows: int | None, chars: str) -> list[Line]:
    """The class table, at most ``rows`` lines with its title and heading
    (all of it when None)."""
    levels = UNICODE_SPARK if chars == UNICODE_BAR else ASCII_SPARK
    cells = [
        (c, (str(c.size), f"{c.obj_used}/{c.obj_allocated}", str(c.zspages), str(c.frames), human(c.waste),
             str(c.freeable), spark(c.groups, levels)))
        for c in view.classes
    ]  # fmt: skip
    columns = CLASS_COLUMNS if any(c.groups for c in view.classes) else CLASS_COLUMNS[:-1]
    w = [max([len(name)] + [len(row[i]) for _, row in cells]) for i, name in enumerate(columns)]
    while len(w) > 1 and w[0] + len(" [] 100%") + sum(x + 2 for x in w[1:]) + MIN_BAR > width:
        w.pop()  # a narrow terminal: whole columns go, from the right
    bar_width = max(MIN_BAR, width - w[0] - len(" [] 100%") - sum(x + 2 for x in w[1:]))
    heading: Line = [
        (CLASS_COLUMNS[0].rjust(w[0]) + "  " + "fullness".ljust(bar_width + 6), "title"),
        ("".join(("  " + name).rjust(x + 2) for name, x in zip(columns[1:], w[1:])), "title"),
    ]
    out: list[Line] = [[("classes", "title"), (f" by {view.sort}", "dim")], heading]
    shown = cells if rows is None else cells[: max(0, rows - 2)]
    if rows is not None and len(cells) > len(shown):
        shown = cells[: max(0, rows - 3)]
    for c, row in shown:
        out.append(
            [
                (row[0].rjust(w[0]) + " [", ""),
                *_bar(((c.obj_used, "bar"),), c.obj_allocated, bar_width, chars),
                (f"]{100 * c.fullness:4.0f}%", ""),
                ("".join(("  " + v).rjust(x + 2) for v, x in zip(row[1:], w[1:])), ""),
            ]
        )
    if len(shown) < len(cells):
        out.append([(f"... {len(cells) - len(shown)} more classes", "dim")])
    return out


def layout(
    view: View, width: int, height: int | None = None, message: str = "", keys: bool = True, unicode: bool = True
) -> list[Line]:
    """The screen: at most ``height`` lines (all when None), each cut to
    ``width`` columns.  The class table gets what room is left; the last
    line holds the keys and ``message`` when ``keys``."""
    chars = UNICODE_BAR if unicode else ASCII_BAR
    width = max(width, 20)
    top: list[Line] = [[(view.title, "title")]]
    top += [[(line, "")] for group in view.header for line in _wrap(group, width)]
    top += _bar_lines([view.memory], width, chars)
    top += [[("DEGRADED: ", "bad"), (p, "bad")] for p in view.problems]
    top.append([])
    top += _rate_lines(view.rates, width)
    top.append([])
    top.append([("tiers", "title"), (" (share of stored pages)", "dim")])
    top += _bar_lines(view.tiers, width, chars)
    top.append([])
    footer: list[Line] = []
    if keys or message:
        footer = [
            [(f"{KEYS} {next_sort(view.sort)}", "key"), ("  " + message if message else "", "message")]
            if keys
            else [(message, "message")]
        ]
    rows = None if height is None else max(0, height - len(top) - len(footer))
    lines = top + _class_lines(view, width, rows, chars)
    if height is not None:  # the footer on the last line
        lines = lines[: max(0, height - len(footer))]
        lines += [[]] * (height - len(footer) - len(lines))
    lines += footer
    return [_cut(line, width) for line in lines]


def _wrap(items: Sequence[str], width: int) -> list[str]:
    """Items two spaces apart, as many to a line as fit."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines


def lost_lines(why: str, seconds: float, width: int) -> list[Line]:
    """What the top of the screen says while the daemon does not answer."""
    return [_cut([(f"reconnecting... ({seconds:.0f} s) {why}", "bad")], width)]


def _cut(line: Line, width: int) -> Line:
    out: Line = []
    left = width
    for text, style in line:
        if left <= 0:
            break
        out.append((text[:left], style))
        left -= len(text[:left])
    while out and not out[-1][0].rstrip():
        out.pop()
    if out:
        out[-1] = (out[-1][0].rstrip(), out[-1][1])
    return out


def plain(lines: Sequence[Line]) -> str:
    return "\n".join("".join(text for text, _ in line) for line in lines)
