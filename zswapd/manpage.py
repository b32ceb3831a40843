"""zswapd(8) and zswapd.toml(5), written from the code so they cannot drift.

- zswapd(8) comes from the argparse parser (``cli.build_parser``): every
  command with its help, every option with its help and default.  The exit
  codes of `zswapd status` come from zswapd/health.py, the ignored signals
  from zswapd/process.py, the default paths from zswapd/config.py.
- zswapd.toml(5) comes from the config schema (``config.SCHEMA``: every
  section and key, in order; what a key accepts, in the words its check
  uses for a bad value; whether SIGHUP or `zswapd set` applies it) and from
  the example config, ``systemd/zswapd.toml``, whose comments describe each
  key and whose commented-out assignments are the defaults.
  tests/test_docs.py keeps the example complete against the schema.

setup.py calls ``write`` at build time and installs the pages into
share/man (data_files), so ``pip install .`` as root puts them under
/usr/local/share/man, where man(1) looks.  Packagers can run
``python -m zswapd.manpage OUTDIR [EXAMPLE]``.

Sans-I/O but for ``write``: ``zswapd_8`` and ``zswapd_toml_5`` return roff.
The pages carry no date, so a build is reproducible.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import DEFAULT_PATH, RELOADABLE, RUNTIME_KEYS, SCHEMA, ControlConfig, DeviceConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "zswapd.toml"
PAGES = {"zswapd.8": "man8", "zswapd.toml.5": "man5"}
# A command with more options than this shows [options] in the synopsis.
MAX_SYNOPSIS_OPTIONS = 6

_KEY_LINE = re.compile(r"^#(\w+) = (.*)$")
_SECTION_LINE = re.compile(r"^\[(\w+)\]\s*$")


def _text(s: str) -> str:
    """Running text for roff: backslashes escaped, and no line that starts
    with a control character."""
    s = s.replace("\\", "\\e")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in s.split("\n"))


def _literal(s: str) -> str:
    """An option, a command or a value: dashes as minus signs, so that they
    can be searched and copied."""
    return _text(s).replace("-", "\\-")


# -- zswapd(8) ----------------------------------------------------------------


def _metavar(action: argparse.Action) -> str:
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    if isinstance(action.metavar, str):
        return action.metavar
    return action.dest.upper() if action.option_strings else action.dest


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _usage(name: str, parser: argparse.ArgumentParser) -> str:
    parts = [f"\\fBzswapd {_literal(name)}\\fR"]
    options = _options(parser)
    if len(options) > MAX_SYNOPSIS_OPTIONS:  # bench: the options are listed below
        options = [a for a in options if not a.option_strings]
        parts.append("[\\fIoptions\\fR]")
    for action in options:
        if action.option_strings:
            opt = "\\fB" + _literal(action.option_strings[0]) + "\\fR"
            if _takes_value(action):
                opt += " \\fI" + _literal(_metavar(action)) + "\\fR"
            parts.append(f"[{opt}]")
        else:
            arg = "\\fI" + _literal(_metavar(action)) + "\\fR"
            parts.append(f"[{arg}]" if action.nargs == "?" else arg)
    return " ".join(parts)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every subcommand, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "zswapd"}
    default = action.default
    if _takes_value(action) and default not in (None, False, argparse.SUPPRESS) and "default" not in text:
        text += f" (default: {default})"
    return text


DESCRIPTION = """\
zswapd is a userspace compressed-swap daemon for Linux: what the kernel's
zram is, as a daemon anyone can read, measure and extend.
.PP
.B zswapd run
mounts a FUSE filesystem holding one fixed-size file, attaches it to a loop
device with direct I/O, runs
.BR mkswap (8)
and
.BR "swapon \\-\\-discard" ,
and stores every 4 KiB page it is sent compressed (lz4 or zstd) in a
zsmalloc-style pool, within a memory limit, compacting it before it is full.
Discards free pool memory at once.
.PP
It runs as two processes: a supervisor, which holds the FUSE connection, the
control socket, the pool's state (memfds) and the loop device for its whole
life, and a worker that serves them.  A worker that dies is replaced in tens
of milliseconds and no swapped page is lost;
.B zswapd reload
upgrades the worker without swapoff.
.PP
The other commands talk to a running daemon over its control socket
(\\fB[control] socket\\fR in
.BR zswapd.toml (5)).
The read-only ones (stats, top, status) are open to root and to
\\fB[control] group\\fR; the others need root.  They read the config file
only for the socket's path: if the file does not load, the read-only
commands warn, naming its error, and connect to the socket the file names
where that much can be read, else to the default."""


def _signals() -> str:
    from .process import IGNORED_SIGNALS

    ignored = ", ".join(f"\\fB{signal.Signals(s).name}\\fR" for s in IGNORED_SIGNALS)
    return f""".TP
.BR SIGTERM ", " SIGINT
Clean shutdown: swapoff while still serving, detach the loop device,
unmount.  If swapoff fails, the daemon keeps serving and says why.
.TP
.B SIGHUP
Re-read the config file and apply what can change while running (see
.BR zswapd.toml (5));
a file that does not load changes nothing.
.TP
{ignored}
Logged and ignored: a stopped or dead swap server would stall or kill every
process with pages in it."""


def _exit_status() -> str:
    from .health import DEGRADED, NOT_RUNNING, SERVING, UNKNOWN

    return f""".TP
.B 0
Success.
.TP
.B 1
The daemon could not be reached, or refused the request (the message says
why).
.TP
.B 2
Bad usage, or a config file that does not load
.RB ( "zswapd run" ,
.BR "zswapd check\\-config" ).
.PP
.B zswapd status
exits as
.B systemctl is\\-active
does: {SERVING} serving, {DEGRADED} degraded (serving, but the pool is full,
swap is off, reads failed, a task or a request hit a bug, native FUSE threads
stopped, the engine fell back to Python, or no reply within 5 seconds),
{NOT_RUNNING} not running, {UNKNOWN} unknown (for example, permission denied)."""


def zswapd_8(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    out = [
        f'.TH ZSWAPD 8 "" "zswapd {__version__}" "System Administration"',
        ".SH NAME",
        "zswapd \\- userspace compressed swap daemon",
        ".SH SYNOPSIS",
    ]
    for i, (name, _, sub) in enumerate(commands):
        out += ([".br"] if i else []) + [_usage(name, sub)]
    out += [".SH DESCRIPTION", DESCRIPTION, ".SH COMMANDS"]
    for name, help_, sub in commands:
        out += [f".SS {_literal(name)}", _text(help_[:1].upper() + help_[1:]) + "."]
        for action in _options(sub):
            flags = ", ".join("\\fB" + _literal(o) + "\\fR" for o in action.option_strings)
            if _takes_value(action):
                value = "\\fI" + _literal(_metavar(action)) + "\\fR"
                flags = f"{flags} {value}" if flags else value
            out += [".TP", flags, _text(_help(action)) or "\\&"]
    out += [
        ".SH EXIT STATUS",
        _exit_status(),
        ".SH SIGNALS",
        _signals(),
        ".SH FILES",
        ".TP",
        f"\\fI{_literal(DEFAULT_PATH)}\\fR",
        "The config file, if present; see",
        ".BR zswapd.toml (5).",
        ".TP",
        f"\\fI{_literal(ControlConfig().socket)}\\fR",
        "The default control socket (JSON lines).",
        ".TP",
        f"\\fI{_literal(DeviceConfig().mountpoint)}\\fR",
        "The default mountpoint of the FUSE file that is the swap device.",
        ".SH SEE ALSO",
        ".BR zswapd.toml (5),",
        ".BR swapon (8),",
        ".BR mkswap (8),",
        ".BR zramctl (8),",
        ".BR systemctl (1).",
        "The source's docs/operation.md and docs/control.md tell how it runs and the control protocol.",
    ]
    return "\n".join(out) + "\n"


# -- zswapd.toml(5) ------------------------------------------------------------


@dataclass
class ExampleKey:
    default: str
    text: list[str]  # comment lines, "#" and one space removed


def read_example(text: str) -> tuple[list[str], dict[tuple[str, str], ExampleKey]]:
    """The example config's opening comment, and each key's comment and
    default (its commented-out assignment)."""
    intro: list[str] = []
    keys: dict[tuple[str, str], ExampleKey] = {}
    section = ""
    comment: list[str] = []
    for line in text.splitlines():
        if m := _SECTION_LINE.match(line):
            if not section:
                intro = comment
            section, comment = m.group(1), []
        elif m := _KEY_LINE.match(line):
            keys[(section, m.group(1))] = ExampleKey(m.group(2), comment)
            comment = []
        elif line.startswith("#"):
            comment.append(line[2:] if line.startswith("# ") else line[1:])
    return intro, keys


def _paragraph(lines: list[str], new: str = ".IP") -> list[str]:
    """Comment lines as roff: an empty one starts a ``new`` paragraph;
    indented lines (examples) are kept as they are."""
    out: list[str] = []
    for line in lines:
        if line.startswith(" "):
            out += [".RS", ".nf", _text(line.strip()), ".fi", ".RE"]
        elif line.strip():
            out.append(_text(line.strip()))
        elif out:
            out.append(new)
    return out


def _accepts(section: str, key: str) -> str:
    """What the key accepts: the check's own words for a bad value."""
    try:
        SCHEMA[section][key](object())
    except ValueError as e:
        return str(e)
    return "any value"  # no check refuses an object(); kept for safety


def _applied(section: str, key: str) -> str:
    runtime = [name for name, where in RUNTIME_KEYS.items() if where == (section, key)]
    if runtime:
        return (
            f"Applied by SIGHUP and by \\fBzswapd reload\\fR, and at runtime by "
            f"\\fBzswapd set {_literal(runtime[0])}=\\fR\\fIVALUE\\fR."
        )
    if (section, key) in RELOADABLE:
        return "Applied by SIGHUP and by \\fBzswapd reload\\fR."
    return "Takes a restart (for swap, that means swapoff)."


def zswapd_toml_5(example: str) -> str:
    intro, keys = read_example(example)
    out = [
        f'.TH ZSWAPD.TOML 5 "" "zswapd {__version__}" "File Formats"',
        ".SH NAME",
        "zswapd.toml \\- configuration file of zswapd(8)",
        ".SH SYNOPSIS",
        f"\\fI{_literal(DEFAULT_PATH)}\\fR",
        ".SH DESCRIPTION",
        "A TOML file, read by",
        ".B zswapd run",
        "at start and again on SIGHUP, and by a new worker at",
        '.BR "zswapd reload" .',
        "Without it zswapd runs on built-in defaults, the values shown below.",
        "Every error names the file, the key, the bad value and what is expected;",
        ".B zswapd check\\-config \\-\\-config",
        ".I FILE",
        "checks a file.",
        ".PP",
        *_paragraph(intro[1:], ".PP"),
    ]
    for section, checks in SCHEMA.items():
        out.append(f'.SH "[{section}]"')
        for key in checks:
            ex = keys.get((section, key))
            default = _text(ex.default) if ex else "?"
            out += [".TP", f"\\fB{_literal(key)}\\fR = {default}"]
            out += _paragraph(ex.text) if ex else []
            out += [".IP", f"Accepts {_text(_accepts(section, key))}.  {_applied(section, key)}"]
    out += [
        ".SH EXAMPLE",
        ".nf",
        "[pool]",
        'algorithm = "zstd"',
        'memory_limit = "25%"',
        "",
        "[control]",
        'group = "adm"',
        'metrics_listen = "127.0.0.1:9577"',
        ".fi",
        ".SH SEE ALSO",
        ".BR zswapd (8)",
    ]
    return "\n".join(out) + "\n"


# -- build ----------------------------------------------------------------------


def pages(example: Path = EXAMPLE) -> dict[str, str]:
    """Each page's file name and text."""
    from .cli import build_parser

    return {"zswapd.8": zswapd_8(build_parser()), "zswapd.toml.5": zswapd_toml_5(example.read_text())}


def write(outdir: str | Path, example: Path = EXAMPLE) -> list[Path]:
    """Write the pages into ``outdir``; their paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages(example).items():
        path = out / name
        if not path.exists() or path.read_text() != text:  # an unchanged page keeps its mtime
            path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m zswapd.manpage OUTDIR [EXAMPLE_CONFIG]", file=sys.stderr)
        return 2
    for path in write(argv[0], Path(argv[1]) if len(argv) > 1 else EXAMPLE):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
