"""The shipped example config stays in step with the schema."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from zswapd.config import MAX_FUSE_THREADS, SCHEMA, from_dict
from zswapd.held import FD_NAMES

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_key_and_parses() -> None:
    text = (ROOT / "systemd" / "zswapd.toml").read_text()
    uncommented = "\n".join(re.sub(r"^#(\w)", r"\1", line) for line in text.splitlines())
    data = tomllib.loads(uncommented)
    assert {s: set(v) for s, v in data.items()} == {s: set(v) for s, v in SCHEMA.items()}
    from_dict(data, "systemd/zswapd.toml")


def _unit_lines() -> list[str]:
    unit = (ROOT / "systemd" / "zswapd.service").read_text()
    return [line.strip() for line in unit.splitlines() if line.strip() and not line.startswith("#")]


def test_unit_file_has_what_swap_needs() -> None:
    lines = _unit_lines()
    for line in (
        "Type=notify",
        "DefaultDependencies=no",
        "KillMode=mixed",
        "LimitMEMLOCK=infinity",
        "OOMScoreAdjust=-1000",
        "LimitCORE=0",
        # A fresh worker on the installed code, which also re-reads the config.
        "ExecReload=/usr/local/bin/zswapd reload",
        # A dead supervisor is restarted and takes its fds back from the store.
        "Restart=always",
        # No start limit: giving up closes the fd store and the FUSE connection.
        "StartLimitIntervalSec=0",
        # `no` removes /run/zswapd (mountpoint, control socket) between a crash
        # and the restart, and PID 1 hangs on the unserved mount.
        "RuntimeDirectoryPreserve=restart",
    ):
        assert line in lines, line
    assert any(line.startswith("TimeoutStopSec=") for line in lines)

    def values(key: str) -> list[str]:
        return [v for line in lines if line.startswith(key + "=") for v in line.split("=", 1)[1].split()]

    assert "swap.target" in values("Before")
    # The supervisor stores one fd of each of held.FD_NAMES (fuse, control,
    # state-meta, state-arena, loop, backing) and a FUSE clone per serving
    # thread, up to [fuse] threads' maximum;
    # systemd closes any fd beyond the maximum.
    store_max = values("FileDescriptorStoreMax")
    assert len(store_max) == 1 and int(store_max[0]) >= len(FD_NAMES) + MAX_FUSE_THREADS, store_max
    assert not [line for line in lines if line.startswith("ExecReload=") and "kill" in line]
    # /dev/fuse never becomes an active device unit on Debian: udev tags only
    # the fuse module.  The module is what the unit must pull in.
    assert "modprobe@fuse.service" in values("Wants")
    assert "modprobe@fuse.service" in values("After")
    assert not [line for line in lines if "dev-fuse.device" in line]
    # Stopped before systemd unmounts the FUSE mount; no cycle with tmpfs
    # mounts, which are After=swap.target and Before=local-fs.target.
    assert "run-zswapd-mnt.mount" in values("After")
    assert "local-fs.target" not in values("After")


def test_unit_file_has_no_private_mount_namespace() -> None:
    """Any of these gives the service its own mount namespace, where the
    daemon's FUSE mount would be invisible to every other process."""
    namespacing = (
        "ProtectHome",
        "ProtectSystem",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ReadOnlyPaths",
        "ReadWritePaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "BindReadOnlyPaths",
        "RootDirectory",
        "MountFlags",
    )
    found = [line for line in _unit_lines() if line.split("=", 1)[0] in namespacing]
    assert not found, found
