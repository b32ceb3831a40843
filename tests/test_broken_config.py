"""The read-only commands (stats, top, status) with a config file that does
not load: they warn, naming the error, and connect to the socket the file
names where that much can be read, else to the default (config.control_socket).

Privilege: root for the daemon test (FUSE mount)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_daemon

from zswapd.config import DEFAULT_PATH, ControlConfig, control_socket


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zswapd", *args], capture_output=True, text=True, timeout=60)


def test_control_socket_from_a_file_that_does_not_load(tmp_path: Path) -> None:
    default = ControlConfig().socket
    cfg = tmp_path / "z.toml"

    cfg.write_text('[control]\nsocket = "/run/zs/c.sock"\n[pool]\nmemory_limit = "12Q"\n')  # valid TOML, bad value
    path, warning = control_socket(str(cfg))
    assert path == "/run/zs/c.sock"
    assert warning == (
        f'{cfg}: [pool] memory_limit = \'12Q\': expected a size ("512M", "2G"), a percentage of RAM from 0% to 100% '
        "(\"25%\"), or 0 for none; using its [control] socket = '/run/zs/c.sock'"
    )

    # Not TOML at all, yet the [control] socket line reads: it is found.
    cfg.write_text('[pool]\nmemory_limit = 1G\n\n[control] # the socket\nsocket = "/run/zs/d.sock"  # ours\n')
    path, warning = control_socket(str(cfg))
    assert path == "/run/zs/d.sock" and warning and "not valid TOML" in warning

    for text in (
        '[pool]\nalgorithm = "lz5"\n',  # no [control] socket: the default
        '[control]\nsocket = "relative.sock"\n',  # not a usable socket path
        '[control]\nsocket = "/run/zs/x.sock\n',  # the socket line itself is broken
        '[device]\nsocket = "/run/zs/y.sock"\n[control\n',  # a socket line, not under [control]
        "\xff\xfe not even UTF-8",
    ):
        cfg.write_text(text, errors="surrogateescape")
        path, warning = control_socket(str(cfg))
        assert path == default and warning and str(cfg) in warning, text
        assert ("is not usable either" in warning) == ("relative" in text), warning

    path, warning = control_socket(str(tmp_path / "missing.toml"))
    assert (
        path == default
        and warning == f"{tmp_path}/missing.toml: no such file; using the default control socket {default}"
    )
    if not os.path.exists(DEFAULT_PATH):
        assert control_socket(None) == (default, None)


@pytest.mark.root
def test_read_only_commands_work_with_a_broken_config(tmp_path: Path) -> None:
    """A typo the running daemon refused at SIGHUP: stats, top and status
    warn, naming it, and still reach the daemon; a command that changes
    something still refuses the file."""
    with run_daemon(tmp_path) as d:
        broken = tmp_path / "broken.toml"
        broken.write_text(d.config.read_text() + '\n[pool]\nmemory_limit = "lots"\n')
        for args in (["stats"], ["stats", "--prometheus"], ["status"], ["top", "-n", "1"]):
            r = cli(*args, "--config", str(broken))
            assert r.returncode == 0, (args, r)
            assert r.stderr == (
                f'zswapd: warning: {broken}: [pool] memory_limit = \'lots\': expected a size ("512M", "2G"), '
                'a percentage of RAM from 0% to 100% ("25%"), or 0 for none; using its [control] socket = '
                f"'{d.socket}'\n"
            ), args
        r = cli("compact", "--config", str(broken))
        assert r.returncode == 2 and "memory_limit = 'lots'" in r.stderr
