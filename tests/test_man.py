"""The man pages (zswapd/manpage.py): every command, option and config key
is in them, they render without a warning, and setup.py installs them where
man(1) finds them."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zswapd import manpage
from zswapd.cli import build_parser
from zswapd.config import SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def test_zswapd_8_has_every_command_and_option() -> None:
    page = manpage.pages()["zswapd.8"]
    commands = manpage._commands(build_parser())
    assert {name for name, _, _ in commands} >= {"run", "stats", "compact", "set", "reload", "top", "status"}
    for name, help_, sub in commands:
        assert help_, f"zswapd {name} has no help"
        section = page.split(f".SS {name.replace('-', chr(92) + '-')}\n", 1)[1].split("\n.SS ", 1)[0]
        for action in manpage._options(sub):
            assert action.help, f"zswapd {name} {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in section, (name, option)


def test_zswapd_toml_5_has_every_key_with_its_default_and_description() -> None:
    page = manpage.pages()["zswapd.toml.5"]
    _, example = manpage.read_example((ROOT / "systemd" / "zswapd.toml").read_text())
    for section, keys in SCHEMA.items():
        text = page.split(f'.SH "[{section}]"\n', 1)[1].split("\n.SH ", 1)[0]
        for key in keys:
            entry = text.split(f"\\fB{key}\\fR = ", 1)[1].split("\n.TP\n", 1)[0]
            assert example[(section, key)].text, f"[{section}] {key}: no comment in systemd/zswapd.toml"
            assert entry.startswith(example[(section, key)].default + "\n"), (section, key)
            assert "\n.IP\nAccepts " in entry and ("Takes a restart" in entry or "Applied by SIGHUP" in entry)


def test_parser_is_the_one_the_cli_runs() -> None:
    """build_parser is what `zswapd` parses with: a command it lists runs."""
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    r = subprocess.run([sys.executable, "-m", "zswapd", "status", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "exit 0 serving, 1 degraded, 3 not running" in " ".join(r.stdout.split())


@pytest.mark.parametrize("name", list(manpage.PAGES))
def test_pages_render_without_warnings(name: str, tmp_path: Path) -> None:
    (path,) = [p for p in manpage.write(tmp_path) if p.name == name]
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_setup_installs_the_pages_where_man_finds_them(tmp_path: Path) -> None:
    """setup.py writes the pages at build time and installs them as data
    files under the prefix's share/man (what `pip install .` does, into
    /usr/local/share/man as root on Debian).  install_data is that step
    alone, without building the extension."""
    build = ROOT / "build" / "man"
    shutil.rmtree(build, ignore_errors=True)
    r = subprocess.run([sys.executable, "setup.py", "-q", "install_data", "--install-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name, section in manpage.PAGES.items():
        installed = tmp_path / "share" / "man" / section / name
        assert installed.read_text() == manpage.pages()[name]
    for query, section in ((["zswapd"], "man8"), (["5", "zswapd.toml"], "man5")):
        r = subprocess.run(["man", "-M", str(tmp_path / "share" / "man"), "-w", *query], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip().startswith(str(tmp_path / "share" / "man" / section)), r
