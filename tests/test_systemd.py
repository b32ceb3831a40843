"""The shipped unit under a real systemd: systemd-nspawn -b, checked from inside.

PID 1 on this VM (and in CI) is not systemd, so the unit is booted in a
container.  The container's root is the machine's own userspace through an
overlay (lower: the host's /, read-only in effect; upper: a tmpfs), so there is
nothing to download and nothing on the host changes: every file the test adds
(the unit, its config, the runner) lands in the tmpfs.  systemd 252 boots to a
test target (basic.target plus the runner), with the units the host's admin
enabled masked, so nothing but the system layer and zswapd starts.

Which zswapd runs: the one in this checkout.  /usr/local/bin/zswapd in the
overlay is a two-line wrapper that runs this interpreter (sys.executable) with
``-m zswapd`` and PYTHONPATH set to this checkout, bind-mounted read-only at
/opt/zswapd-test/src.  PYTHONPATH comes before site-packages, so it wins over
an editable install of another checkout (the runner checks zswapd.__file__).
The unit itself is installed byte for byte as shipped, with `systemctl
--root=... enable`, so its ExecStart=/usr/local/bin/zswapd is what starts it.

The runner (test-runner.service, Type=exec: a oneshot that waits for
is-system-running deadlocks) writes each check's output and exit status to
/out, a bind of a host directory, and ends the container with `systemctl
--no-block exit`.  The assertions are made here on what it wrote and on the
nspawn console, where PID 1 logs at debug level: ordering cycles, including
the ones systemd resolves at shutdown, are logged only there.

Swap stays off inside: nspawn refuses swapon, and swap is global to the VM.
So the daemon never attaches a loop device here; the stop check still looks for
one on the file.  DeviceAllow= is not enforced in the container either.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "zswapd.service"
SRC_IN_CONTAINER = "/opt/zswapd-test/src"
FILE = "/run/zswapd/mnt/swap"
# The mount unit PID 1 makes of the daemon's default mountpoint.
MOUNT_UNIT = "run-zswapd-mnt.mount"
MIB = 1 << 20
BOOT_TIMEOUT = 300

CONFIG = """\
[device]
size = "64M"
[pool]
memory_limit = "64M"
[swap]
# nspawn refuses swapon, and swap would be the whole VM's.
enable = false
"""

TARGET = """\
[Unit]
Description=zswapd test: the system layer and the runner, nothing else
Requires=basic.target
After=basic.target
Wants=test-runner.service
AllowIsolate=yes
"""

RUNNER_UNIT = """\
[Unit]
Description=zswapd unit test runner
[Service]
Type=exec
ExecStart=/usr/local/sbin/zswapd-test-runner
"""

RUNNER = r"""#!/bin/bash
# Inside the container.  Each check: output in /out/NAME.out, status in
# /out/NAME.rc.  Whatever happens, the container ends.
trap 'systemctl --no-block exit 0' EXIT
step() {
    local name=$1
    shift
    "$@" >"/out/$name.out" 2>&1
    echo $? >"/out/$name.rc"
}
# until NAME SECONDS CMD...: retry CMD until it succeeds; the last try's
# output stays in /out/NAME.out.
until_ok() {
    local name=$1 end=$((SECONDS + $2))
    shift 2
    while ((SECONDS < end)); do
        if "$@" >"/out/$name.out" 2>&1; then
            echo 0 >"/out/$name.rc"
            return 0
        fi
        sleep 0.1
    done
    echo 1 >"/out/$name.rc"
    return 1
}
mount_unit_active() {
    [ "$(systemctl show -p ActiveState --value @MOUNT_UNIT@)" = active ]
}
show() {
    systemctl show zswapd.service -p ActiveState,SubState,Result,StatusText,MainPID,NRestarts
}
step boot systemctl is-system-running --wait
step started show
step import zswapd-python -c 'import zswapd; print(zswapd.__file__)'
step verify systemd-analyze verify /etc/systemd/system/zswapd.service
# PID 1 noticing the mount is asynchronous to READY=1.
until_ok mount_unit 30 mount_unit_active
step mountinfo_runner cat /proc/self/mountinfo
step mountinfo_pid1 cat /proc/1/mountinfo
# A page written and read back through the file, from outside the service.
step file_io sh -c 'head -c 4096 /dev/urandom >/tmp/page &&
    dd if=/tmp/page of=@FILE@ bs=4096 seek=5 conv=notrunc,fsync status=none &&
    dd if=@FILE@ bs=4096 skip=5 count=1 status=none | cmp - /tmp/page'
step stop systemctl stop zswapd.service
step stopped show
step mountinfo_stopped cat /proc/self/mountinfo
step loops_stopped losetup --list --noheadings --output NAME,BACK-FILE
step procs_stopped pgrep -a -f 'zswapd run'
step restart systemctl start zswapd.service
step restarted show
until_ok mount_unit_again 30 mount_unit_active
step stats_before zswapd stats --json
sed -i 's/^memory_limit = .*/memory_limit = "32M"/' /etc/zswapd/zswapd.toml
step reload systemctl reload zswapd.service
# ExecReload= only sends SIGHUP; the daemon applies it when it gets to it.
until_ok stats_reloaded 30 sh -c 'zswapd stats --json | tee /dev/stderr | grep -q "\"mem_limit\": 33554432"'
step reloaded show
# Left running: the container's shutdown is the last check.
""".replace("@MOUNT_UNIT@", MOUNT_UNIT).replace("@FILE@", FILE)


@dataclass
class Boot:
    out: Path
    console: str
    rc: int
    seconds: float

    def text(self, name: str) -> str:
        path = self.out / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else f"(the runner never got to {name})"

    def ok(self, name: str) -> bool:
        path = self.out / f"{name}.rc"
        return path.exists() and path.read_text().strip() == "0"

    def rc_of(self, name: str) -> int | None:
        path = self.out / f"{name}.rc"
        return int(path.read_text()) if path.exists() else None

    def show(self, name: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text(name).splitlines() if "=" in line)

    def console_lines(self) -> list[str]:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.console).splitlines()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


def _end_container(proc: subprocess.Popen[bytes]) -> None:
    """Stop nspawn and everything in the container, gently then for good."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
        return
    # Killing the container's PID 1 kills its whole PID namespace; killing only
    # nspawn would leave the container running, orphaned.
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(30)


def _python_binds() -> list[str]:
    """Bind this interpreter's trees at their own paths when they live on
    another filesystem than /, which the overlay would not show."""
    binds = []
    root_dev = os.stat("/").st_dev
    for prefix in sorted({sys.base_prefix, sys.prefix}):
        if os.stat(prefix).st_dev != root_dev:
            binds.append(f"--bind-ro={prefix}")
    return binds


def _populate(root: Path) -> None:
    etc = root / "etc" / "systemd" / "system"
    # Mask what the host's admin enabled (databases, timers that would run apt,
    # gettys): the container is for zswapd only.
    masked = {p.name for p in Path("/etc/systemd/system").glob("*.wants/*")}
    for name in sorted(masked):
        target = etc / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to("/dev/null")
    shutil.copyfile(UNIT, etc / "zswapd.service")
    subprocess.run(["systemctl", f"--root={root}", "--quiet", "enable", "zswapd.service"], check=True)
    # Logging only: the daemon's lines also go to the console, next to PID 1's,
    # so a failure here shows both sides in order.
    dropin = etc / "zswapd.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "console.conf").write_text("[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n")
    (etc / "zswapd-test.target").write_text(TARGET)
    (etc / "test-runner.service").write_text(RUNNER_UNIT)
    conf = root / "etc" / "zswapd"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "zswapd.toml").write_text(CONFIG)
    wrappers = {
        "usr/local/bin/zswapd-python": f'#!/bin/sh\nPYTHONPATH={SRC_IN_CONTAINER} exec {sys.executable} "$@"\n',
        "usr/local/bin/zswapd": '#!/bin/sh\nexec /usr/local/bin/zswapd-python -m zswapd "$@"\n',
        "usr/local/sbin/zswapd-test-runner": RUNNER,
    }
    for rel, text in wrappers.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(text)
        path.chmod(0o755)
    (root / SRC_IN_CONTAINER.lstrip("/")).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _overlay(base: Path) -> Iterator[Path]:
    layer = base / "layer"
    layer.mkdir()
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M,mode=0755", "zswapd-test", str(layer)], check=True)
        mounted.append(layer)
        for d in ("upper", "work", "root"):
            (layer / d).mkdir()
        root = layer / "root"
        opts = f"lowerdir=/,upperdir={layer / 'upper'},workdir={layer / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "-o", opts, "zswapd-test", str(root)], check=True)
        mounted.append(root)
        yield root
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def boot_container(base: Path) -> Boot:
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        pytest.fail("systemd-nspawn not found: install the Debian package systemd-container (.ci/run does)")
    out = base / "out"
    out.mkdir()
    with _overlay(base) as root:
        _populate(root)
        argv = [
            nspawn,
            "--quiet",
            f"--directory={root}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--bind=/dev/fuse",
            "--bind=/dev/loop-control",
            f"--bind={out}:/out",
            f"--bind-ro={ROOT}:{SRC_IN_CONTAINER}",
            *_python_binds(),
            "--console=read-only",
            "--boot",
            "systemd.unit=zswapd-test.target",
            # Ordering cycles that systemd resolves at shutdown are logged only
            # at debug level, and only on the console.
            "systemd.log_level=debug",
            "systemd.log_target=console",
        ]
        console = base / "console.log"
        with open(console, "wb") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(BOOT_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = -1
            finally:
                _end_container(proc)
            seconds = time.monotonic() - t0
    return Boot(out, console.read_text(errors="replace"), rc, seconds)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    base = tmp_path_factory.mktemp("nspawn")
    b = boot_container(base)
    print(f"\nnspawn boot, checks and poweroff: {b.seconds:.1f} s")
    assert not _mounts_under(base), f"overlay mounts left behind: {_mounts_under(base)}"
    loops = [p for p in Path("/sys/block").glob("loop*/loop/backing_file") if p.read_text().strip() == FILE]
    assert not loops, f"loop devices left on the container's file: {loops}"
    assert b.rc == 0, f"the container did not end by the runner's `systemctl exit` (rc {b.rc}):\n{b.console[-4000:]}"
    return b


def test_service_reaches_active_with_ready_and_status(boot: Boot) -> None:
    show = boot.show("started")
    assert show.get("ActiveState") == "active", boot.text("started") + boot.console[-4000:]
    assert show.get("NRestarts") == "0"
    assert show.get("StatusText", "").startswith("serving "), show
    notify = [line for line in boot.console_lines() if "zswapd.service: Got notification message" in line]
    assert any("READY=1" in line and "STATUS=serving " in line for line in notify), notify
    assert boot.text("import").strip() == f"{SRC_IN_CONTAINER}/zswapd/__init__.py", boot.text("import")


def test_no_ordering_cycle_at_boot_or_shutdown(boot: Boot) -> None:
    cycles = [line for line in boot.console_lines() if "ordering cycle" in line]
    assert not cycles, "\n".join(cycles)
    # systemd-analyze verify exits 0 even on cycles: read what it says too.
    assert boot.ok("verify"), boot.text("verify")
    assert boot.text("verify").strip() == "", boot.text("verify")


def test_mount_is_visible_outside_the_service(boot: Boot) -> None:
    assert boot.ok("mount_unit"), f"PID 1 never saw the mount as {MOUNT_UNIT}: {boot.text('mount_unit')}"
    for name in ("mountinfo_runner", "mountinfo_pid1"):
        fuse = [line for line in boot.text(name).splitlines() if " fuse.zswapd " in line]
        assert len(fuse) == 1 and fuse[0].split()[4] == os.path.dirname(FILE), (name, boot.text(name))
    assert boot.ok("file_io"), boot.text("file_io")


def test_reload_applies_memory_limit(boot: Boot) -> None:
    before = json.loads(boot.text("stats_before"))
    assert before["mem_limit"] == 64 * MIB
    assert boot.ok("reload"), boot.text("reload")
    assert boot.ok("stats_reloaded"), f"memory_limit not applied by reload:\n{boot.text('stats_reloaded')}"
    # The same process, not a restart after SIGHUP killed it.
    after = boot.show("reloaded")
    assert after.get("ActiveState") == "active", after
    assert after.get("MainPID") == boot.show("restarted").get("MainPID"), (after, boot.show("restarted"))
    assert after.get("NRestarts") == "0", after


def test_stop_leaves_no_mount_loop_or_process(boot: Boot) -> None:
    assert boot.ok("stop"), boot.text("stop")
    show = boot.show("stopped")
    assert show.get("ActiveState") == "inactive" and show.get("Result") == "success", show
    assert " fuse.zswapd " not in boot.text("mountinfo_stopped")
    assert boot.ok("loops_stopped"), boot.text("loops_stopped")
    assert FILE not in boot.text("loops_stopped")
    assert boot.rc_of("procs_stopped") == 1, boot.text("procs_stopped")  # pgrep: nothing matched


def test_shutdown_stops_daemon_before_its_mount(boot: Boot) -> None:
    """At poweroff, systemd must stop zswapd (which swapoffs, detaches and
    unmounts itself) before it stops the mount unit, and never unmount the
    FUSE mount itself while the daemon serves it."""
    assert boot.ok("restart") and boot.show("restarted").get("ActiveState") == "active", boot.text("restarted")
    assert boot.ok("mount_unit_again"), boot.text("mount_unit_again")
    running = boot.show("reloaded")
    assert running.get("ActiveState") == "active", f"not running at poweroff (after the reload check): {running}"
    lines = boot.console_lines()
    # Only what happened after the runner asked for the container's exit.
    start = [i for i, line in enumerate(lines) if re.search(r"exit\.target: Trying to enqueue job", line)]
    assert start, "the runner's `systemctl exit` is not on the console"
    lines = lines[start[-1] :]

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"not on the console after the exit request: {pattern}"
        return found[0]

    sigterm = first(r"zswapd\.service: Changed running -> stop-sigterm")
    exited = first(r"zswapd\.service: Main process exited, code=exited, status=0/SUCCESS")
    mount_gone = first(re.escape(MOUNT_UNIT) + r": Changed mounted -> ")
    assert sigterm < mount_gone, "systemd took the FUSE mount away before it stopped the daemon"
    # systemd may notice the daemon's own unmount only after the daemon has
    # exited, and then run umount on the already unmounted path; that is
    # harmless.  Unmounting it while the daemon still served it is not.
    unmounting = [
        i for i, line in enumerate(lines) if re.search(re.escape(MOUNT_UNIT) + r": Changed mounted -> unmounting", line)
    ]
    assert all(i > exited for i in unmounting), [lines[i] for i in unmounting]
