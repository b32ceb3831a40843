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
A reload's fresh worker is `python -I -m zswapd worker`, which ignores
PYTHONPATH by design (only installed code runs): it imports the zswapd
installed for this interpreter, in CI an editable install of this checkout.
The unit itself is installed byte for byte as shipped, with `systemctl
--root=... enable`, so its ExecStart=/usr/local/bin/zswapd is what starts it.

The runner (test-runner.service, Type=exec: a oneshot that waits for
is-system-running deadlocks) writes each check's output and exit status to
/out, a bind of a host directory, and ends the container with `systemctl
--no-block exit`.  The assertions are made here on what it wrote and on the
nspawn console, where PID 1 logs at debug level: ordering cycles, including
the ones systemd resolves at shutdown, are logged only there.

Swap stays off inside: nspawn refuses swapon, and swap is global to the VM.
So the daemon never attaches a loop device here.  The runner does: it makes
the /dev/loopN nodes (nspawn's /dev has none), attaches the served file with
direct I/O and runs tests/genverify.py on it, generation-tagged blocks that
catch a lost or stale write, while it
  - SIGKILLs the supervisor and the worker (`systemctl kill -s KILL`), then
    the supervisor alone, then the supervisor four more times in a row
    (beyond systemd's default start limit): each time Restart=always starts a
    supervisor that takes /dev/fuse and the state memfds back from the fd
    store, on the same mount and FUSE connection;
  - reloads (`systemctl reload`: a new worker, the same supervisor) and sends
    SIGHUP (the config only).
After each step one O_DIRECT read through the loop device measures how long
I/O stalled.  Before all that, pages written to the end of the file (which
genverify leaves alone) are written back to the backing file ([writeback],
on a directory of the host's disk bound in); they are read back byte for
byte (tests/blockpages.py) after the first kill and after everything else,
from the same backing file the fd store gave back.  If the runner never detaches its loop device (a hang), the
fixture does, after the container is gone.  DeviceAllow= is not enforced in
the container.
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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "zswapd.service"
SRC_IN_CONTAINER = "/opt/zswapd-test/src"
FILE = "/run/zswapd/mnt/swap"
# The mount unit PID 1 makes of the daemon's default mountpoint.
MOUNT_UNIT = "run-zswapd-mnt.mount"
MIB = 1 << 20
# The backing file's directory in the container, and the pages written back
# to it: the last WB_PAGES of the 64 MiB device, which genverify leaves alone.
WB_DIR = "/var/lib/zswapd-wb"
WB_FILE = f"{WB_DIR}/backing"
DEVICE_PAGES = 64 * 256
WB_PAGES = 1024
WB_FIRST = DEVICE_PAGES - WB_PAGES
# A run takes about 12 s; a hang (a deadlock on the FUSE mount) should not
# cost five minutes.
BOOT_TIMEOUT = 150
# The verifier's run, across two kills and a reload.
VERIFY_SECONDS = 10

CONFIG = """\
[device]
size = "64M"
[pool]
memory_limit = "64M"
[swap]
# nspawn refuses swapon, and swap would be the whole VM's.
enable = false
[fuse]
# Two clones of the connection go to the fd store and come back.
threads = 2
[writeback]
# On the host's disk (bound in: the container's root is an overlay, which
# zswapd refuses); the fd store keeps it as "backing".
enable = true
file = "@WB_FILE@"
size = "16M"
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
# /out/NAME.rc.  Whatever happens, the loop device is detached and the
# container ends.
LOOP=
VERIFIER=
cleanup() {
    [ -n "$VERIFIER" ] && kill -9 "$VERIFIER" 2>/dev/null
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null && echo "$LOOP" >/out/detached
    systemctl --no-block exit 0
}
trap cleanup EXIT
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
# stall NAME CMD...: run CMD (a kill or a reload), then read one block of the
# loop device with O_DIRECT, which the daemon must serve; /out/NAME.stall is
# how long I/O stalled from just before CMD to that read's completion (ms),
# and the read's exit status.
stall() {
    local name=$1 t0 t1 rc
    shift
    t0=$EPOCHREALTIME
    "$@" >"/out/$name.out" 2>&1
    echo $? >"/out/$name.rc"
    dd if="$LOOP" of=/dev/null bs=4096 count=1 skip=7 iflag=direct status=none 2>>"/out/$name.out"
    rc=$?
    t1=$EPOCHREALTIME
    echo "$(((${t1/./} - ${t0/./}) / 1000)) $rc $t0" >"/out/$name.stall"
}
mount_unit_active() {
    [ "$(systemctl show -p ActiveState --value @MOUNT_UNIT@)" = active ]
}
show() {
    systemctl show zswapd.service -p ActiveState,SubState,Result,StatusText,MainPID,NRestarts \
        -p NFileDescriptorStore,FileDescriptorStoreMax,InvocationID
}
active() {
    [ "$(systemctl show -p SubState --value zswapd.service)" = running ] && zswapd stats --json
}
# The FUSE mount (mount id, device) and its connection in fusectl (mounted on
# /run/fusectl: the container's /sys is read-only): the connection's id is the
# mount's minor.
conn() {
    local line dev
    line=$(awk '$5 == "@MNT@" && $0 ~ / fuse\.zswapd / {print $1, $3}' /proc/self/mountinfo)
    [ -n "$line" ] || return 1
    dev=${line#* }
    echo "mount $line connection $(ls -d "/run/fusectl/${dev#*:}")"
}
# The supervisor's held fds: name and inode of each memfd and /dev/fuse fd.
held() {
    local pid fd
    pid=$(systemctl show -p MainPID --value zswapd.service)
    for fd in /proc/$pid/fd/*; do
        case $(readlink "$fd") in
        /memfd:* | /dev/fuse | @WB_FILE@) echo "$(readlink "$fd") $(stat -L -c %i "$fd")" ;;
        esac
    done | sort
}
journal() {
    journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$(systemctl show -p InvocationID --value zswapd.service)"
}
step boot systemctl is-system-running --wait
step started show
step import zswapd-python -c 'import zswapd; print(zswapd.__file__)'
# What the unit confines, as the kernel sees it, in the supervisor and the worker.
step sandbox sh -c 'for pid in $(systemctl show -p MainPID --value zswapd.service) \
        $(zswapd stats --json | sed -n "s/.*\"worker_pid\": \([0-9]*\).*/\1/p"); do
    echo "pid $pid"; grep -E "^(CapBnd|NoNewPrivs|Seccomp):" /proc/$pid/status; done'
step security systemd-analyze security --no-pager zswapd.service
step verify systemd-analyze verify /etc/systemd/system/zswapd.service
# PID 1 noticing the mount is asynchronous to READY=1.
until_ok mount_unit 30 mount_unit_active
step mountinfo_runner cat /proc/self/mountinfo
step mountinfo_pid1 cat /proc/1/mountinfo
# Pages written back to the backing file, to be read back after the kills
# (first, so that only they are written back).
wb_file() { stat -c '%i %s' @WB_FILE@ && sha256sum <@WB_FILE@; }
wb_check() { zswapd-python @SRC@/tests/blockpages.py check @FILE@ @WB_FIRST@ @WB_PAGES@ 5; }
step wb_write zswapd-python @SRC@/tests/blockpages.py write @FILE@ @WB_FIRST@ @WB_PAGES@ 5
step wb_writeback zswapd writeback
step stats_wb zswapd stats --json
step wb_file_before wb_file
# A page written and read back through the file, from outside the service.
step file_io sh -c 'head -c 4096 /dev/urandom >/tmp/page &&
    dd if=/tmp/page of=@FILE@ bs=4096 seek=5 conv=notrunc,fsync status=none &&
    dd if=@FILE@ bs=4096 skip=5 count=1 status=none | cmp - /tmp/page'

# -- The daemon's own death, with a verifier writing through a loop device --
step fusectl sh -c 'mkdir -p /run/fusectl && mount -t fusectl fusectl /run/fusectl'
step conn_before conn
step held_before held
# nspawn's /dev has no loop nodes; loop-control hands out any free number.
step loop sh -c 'for i in $(seq 0 255); do [ -e /dev/loop$i ] || mknod /dev/loop$i b 7 $i; done
    losetup --find --show --direct-io=on @FILE@'
if [ "$(cat /out/loop.rc)" = 0 ]; then
    LOOP=$(cat /out/loop.out)
    (
        zswapd-python @SRC@/tests/genverify.py "$LOOP" @VERIFY_SECONDS@ 4 @WB_FIRST@ >/out/genverify.out 2>&1
        echo $? >/out/genverify.rc
    ) &
    VERIFIER=$!
    until_ok verifier_started 30 grep -q started /out/genverify.out
    sleep 1
    step stats_prekill zswapd stats --json
    step show_prekill show
    # SIGKILL to the supervisor and the worker at once.
    stall kill_all systemctl kill -s KILL zswapd.service
    until_ok stats_kill_all 60 active
    step show_kill_all show
    step conn_kill_all conn
    step held_kill_all held
    step journal_kill_all journal
    step rundir_kill_all ls -A /run/zswapd
    step wb_check_kill_all wb_check
    # SIGKILL to the supervisor alone: systemd must end the worker before it
    # starts a new supervisor, whose worker then asks for a resend.
    # The orphaned worker serves until systemd kills it: probe after that.
    worker=$(sed -n 's/.*"worker_pid": \([0-9]*\).*/\1/p' /out/stats_kill_all.out)
    stall kill_main sh -c 'kill -9 "$(systemctl show -p MainPID --value zswapd.service)"
        while kill -0 "$1" 2>/dev/null; do sleep 0.005; done' sh "$worker"
    until_ok stats_kill_main 60 active
    step show_kill_main show
    step conn_kill_main conn
    step journal_kill_main journal
    # More crashes in a row than systemd's default start limit (5 starts in
    # 10 s) allows: a swap daemon must never be given up on.
    for i in 1 2 3 4; do
        kill -9 "$(systemctl show -p MainPID --value zswapd.service)"
        until_ok stats_crash_loop 60 active || break
    done
    step show_crash_loop show
    # systemctl reload: a new worker, which reads the config afresh.
    step stats_prereload zswapd stats --json
    sed -i 's/^memory_limit = .*/memory_limit = "32M"/' /etc/zswapd/zswapd.toml
    stall reload systemctl reload zswapd.service
    step stats_reloaded zswapd stats --json
    step reloaded show
    step conn_reloaded conn
    # SIGHUP: the config again, in the same worker.
    sed -i 's/^memory_limit = .*/memory_limit = "48M"/' /etc/zswapd/zswapd.toml
    step hup sh -c 'kill -HUP "$(systemctl show -p MainPID --value zswapd.service)"'
    until_ok stats_hup 30 sh -c 'zswapd stats --json | tee /dev/stderr | grep -q "\"mem_limit\": 50331648"'
    step wb_check_end wb_check
    step stats_wb_end zswapd stats --json
    step wb_file_end wb_file
    # For a failure's diagnosis and the takeover's timeline (realtime, µs).
    step journal_timed journalctl --no-pager -o short-unix _SYSTEMD_UNIT=zswapd.service
    wait "$VERIFIER"
    VERIFIER=
    step detach losetup -d "$LOOP"
    [ "$(cat /out/detach.rc)" = 0 ] && echo "$LOOP" >/out/detached && LOOP=
fi
step stop systemctl stop zswapd.service
step stopped show
step mountinfo_stopped cat /proc/self/mountinfo
step loops_stopped losetup --list --noheadings --output NAME,BACK-FILE
step procs_stopped pgrep -a -f 'zswapd (run|worker)'
step rundir_stopped ls -A /run/zswapd
step wb_stopped ls -A @WB_DIR@
step restart systemctl start zswapd.service
step restarted show
step held_restarted held
step journal_restarted journal
until_ok mount_unit_again 30 mount_unit_active
# Left running: the container's shutdown is the last check.
"""
RUNNER = (
    RUNNER.replace("@MOUNT_UNIT@", MOUNT_UNIT)
    .replace("@FILE@", FILE)
    .replace("@MNT@", os.path.dirname(FILE))
    .replace("@SRC@", SRC_IN_CONTAINER)
    .replace("@VERIFY_SECONDS@", str(VERIFY_SECONDS))
    .replace("@WB_FILE@", WB_FILE)
    .replace("@WB_DIR@", WB_DIR)
    .replace("@WB_FIRST@", str(WB_FIRST))
    .replace("@WB_PAGES@", str(WB_PAGES))
)


@dataclass
class Boot:
    out: Path
    console: str
    rc: int
    seconds: float
    leaked_loop: str | None = None
    wb_left: list[str] | None = None  # what the backing file's directory held after poweroff

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

    def stats(self, name: str) -> dict[str, Any]:
        text = self.text(name)
        try:
            data: dict[str, Any] = json.loads(text)
        except ValueError:
            raise AssertionError(f"{name}: not stats JSON:\n{text[-2000:]}") from None
        return data

    def stall(self, name: str) -> tuple[int, int]:
        """(milliseconds of stalled I/O, the probe read's exit status)."""
        path = self.out / f"{name}.stall"
        if not path.exists():
            raise AssertionError(f"the runner never got to {name}")
        ms, rc, _ = path.read_text().split()
        return int(ms), int(rc)

    def conn(self, name: str) -> tuple[str, str, str]:
        """(mount id, device, fusectl connection dir) of the FUSE mount."""
        m = re.fullmatch(r"mount (\d+) (\d+:\d+) connection (\S+)", self.text(name).strip())
        assert m and self.ok(name), f"{name}: {self.text(name)}"
        return m[1], m[2], m[3]


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


def _detach_leaked_loop(out: Path) -> str | None:
    """The runner detaches its loop device (and says so in /out/detached),
    unless it never got there: a hang, a kill.  Then do it here, but only the
    device it named and only if it is still bound to a file named swap:
    loop numbers are shared with the host and other tests.  Once the
    container is gone, the backing file reads as just /swap from here, and
    its device and inode as nothing (the FUSE connection ended with it)."""
    loop_out = out / "loop.out"
    if not loop_out.exists() or (out / "detached").exists():
        return None
    loop = loop_out.read_text().strip()
    if not re.fullmatch(r"/dev/loop\d+", loop):
        return None
    backing = Path(f"/sys/block/{loop.removeprefix('/dev/')}/loop/backing_file")
    try:
        bound = backing.read_text().strip()
    except OSError:
        return None  # not bound
    if bound not in (FILE, "/" + os.path.basename(FILE)):
        return None
    subprocess.run(["losetup", "--detach", loop], capture_output=True)
    return loop


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
    (conf / "zswapd.toml").write_text(CONFIG.replace("@WB_FILE@", WB_FILE))
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
    (root / WB_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)


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
    # The backing file's directory: on the host's disk, never tmpfs.
    wb = Path(tempfile.mkdtemp(prefix="zswapd-nspawn-wb-", dir="/var/tmp"))
    try:
        boot = _boot(nspawn, base, out, wb)
        boot.wb_left = sorted(os.listdir(wb))
    finally:
        shutil.rmtree(wb, ignore_errors=True)
    return boot


def _boot(nspawn: str, base: Path, out: Path, wb: Path) -> Boot:
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
            # What the unit grants (mlock; oom_score_adj and IO_FLUSHER need
            # CAP_SYS_RESOURCE, which nspawn can pass on only where the test
            # itself has it: not on this VM), and nspawn's default set lacks.
            "--capability=CAP_IPC_LOCK,CAP_SYS_RESOURCE",
            f"--bind={out}:/out",
            f"--bind={wb}:{WB_DIR}",
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
                leaked = _detach_leaked_loop(out)
            seconds = time.monotonic() - t0
    return Boot(out, console.read_text(errors="replace"), rc, seconds, leaked)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    base = tmp_path_factory.mktemp("nspawn")
    b = boot_container(base)
    print(f"\nnspawn boot, checks and poweroff: {b.seconds:.1f} s")
    assert not _mounts_under(base), f"overlay mounts left behind: {_mounts_under(base)}"
    assert b.leaked_loop is None, f"the runner left {b.leaked_loop} on the container's file (detached now)"
    stalls = ", ".join(f"{n} {b.stall(n)[0]} ms" for n in ("kill_all", "kill_main") if b.ok(n))
    print(f"I/O stalled: {stalls}; NRestarts {b.show('show_crash_loop').get('NRestarts')}")
    if b.ok("reload") and b.ok("stats_reloaded"):
        recovery = b.stats("stats_reloaded")["process"]["last_recovery_ms"]
        print(f"systemctl reload plus a read: {b.stall('reload')[0]} ms; the new worker's takeover: {recovery} ms")
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


# linux/capability.h: what the unit keeps, and the two it used to keep.
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_MKNOD = 0, 1, 14, 21, 24, 27
SECCOMP_MODE_FILTER = 2
# `systemd-analyze security` of the unit as it was before it was tightened.
EXPOSURE_BEFORE = 7.5


def test_the_unit_is_confined(boot: Boot) -> None:
    """Both processes run with the unit's bounding set (at most what it
    names: nspawn itself grants fewer), no new privileges and a seccomp
    filter, and systemd scores the unit well below where it was."""
    assert boot.ok("sandbox"), boot.text("sandbox")
    procs = boot.text("sandbox").split("pid ")[1:]
    assert len(procs) == 2, boot.text("sandbox")
    allowed = {CAP_CHOWN, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_RESOURCE}
    for proc in procs:
        fields = dict(line.split(":\t") for line in proc.splitlines()[1:])
        caps = {bit for bit in range(64) if int(fields["CapBnd"], 16) >> bit & 1}
        assert CAP_SYS_ADMIN in caps and caps <= allowed, (proc, caps)
        assert CAP_DAC_OVERRIDE not in caps and CAP_MKNOD not in caps
        assert fields["NoNewPrivs"] == "1" and int(fields["Seccomp"]) == SECCOMP_MODE_FILTER, proc
    m = re.search(r"Overall exposure level for zswapd\.service: ([0-9.]+)", boot.text("security"))
    assert m, boot.text("security")
    print(f"systemd-analyze security: exposure {m[1]} (was {EXPOSURE_BEFORE})")
    assert float(m[1]) <= 5.0, boot.text("security")


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


# What the supervisor keeps in systemd's fd store, swap off: no loop device of
# its own.  The loop device the verifier writes through is the runner's.
STORED = "backing, control, fuse, fuse-clone-0, fuse-clone-1, state-arena, state-meta"
TAKEOVER = f"taking over from a supervisor that died: {STORED} from systemd's fd store"


def test_verifier_through_loop_device_loses_nothing(boot: Boot) -> None:
    """genverify wrote, discarded and read generation-tagged blocks through
    the loop device across two kinds of supervisor kill, a crash loop and a
    reload; every block read back as last written."""
    assert boot.ok("loop"), boot.text("loop")
    assert boot.ok("verifier_started"), boot.text("verifier_started")
    assert boot.ok("genverify"), boot.text("genverify")
    summary = re.search(r"writes (\d+) discards (\d+) reads (\d+) bad (\d+)", boot.text("genverify"))
    assert summary and int(summary[1]) > 0 and int(summary[4]) == 0, boot.text("genverify")
    for name in ("kill_all", "kill_main", "reload"):
        assert boot.ok(name), (name, boot.text(name))
        assert boot.stall(name)[1] == 0, f"the read after {name} failed: {boot.text(name)}"
    assert boot.ok("detach"), boot.text("detach")


def test_written_back_pages_survive_every_restart_from_the_fd_store(boot: Boot) -> None:
    """Pages written back to the backing file before the kills read back
    byte for byte after `systemctl kill -s KILL` (the new supervisor took
    "backing" back from the fd store) and after the supervisor's kills, the
    crash loop and the reload: from the same file (inode), whose bytes
    nothing changed, and which the daemon removes at every stop."""
    assert boot.ok("wb_write") and boot.ok("wb_writeback"), boot.text("wb_write") + boot.text("wb_writeback")
    before = boot.stats("stats_wb")
    assert before["bd_count"] == WB_PAGES and before["writeback"]["file"] == WB_FILE, before
    for name in ("wb_check_kill_all", "wb_check_end"):
        assert boot.ok(name) and f"checked {WB_PAGES} pages: 0 bad" in boot.text(name), (name, boot.text(name))
    after = boot.stats("stats_wb_end")
    print(f"bd_count {before['bd_count']} -> {after['bd_count']}, bd_reads {before['bd_reads']} -> {after['bd_reads']}")
    assert after["bd_count"] == before["bd_count"], (before, after)
    assert after["bd_reads"] >= before["bd_reads"] + WB_PAGES and after["failed_reads"] == 0, (before, after)
    assert {k: after["writeback"][k] for k in ("live_bytes", "dead_bytes", "segments_used")} == {
        k: before["writeback"][k] for k in ("live_bytes", "dead_bytes", "segments_used")
    }, (before["writeback"], after["writeback"])
    assert boot.ok("wb_file_end") and boot.text("wb_file_end") == boot.text("wb_file_before"), (
        boot.text("wb_file_before"),
        boot.text("wb_file_end"),
    )
    assert WB_FILE in boot.text("held_before"), boot.text("held_before")
    journal = boot.text("journal_kill_all") + boot.text("journal_kill_main")
    assert "backing file this worker was not given" not in journal, journal
    # Removed at `systemctl stop`, made afresh at the next start, removed at poweroff.
    assert boot.ok("wb_stopped") and boot.text("wb_stopped").strip() == "", boot.text("wb_stopped")
    assert boot.wb_left == [], boot.wb_left


def test_fd_store_holds_the_named_fds(boot: Boot) -> None:
    show = boot.show("show_prekill")
    assert show.get("FileDescriptorStoreMax") == "96", show
    assert show.get("NFileDescriptorStore") == str(len(STORED.split(", "))), f"expected {STORED}: {show}"


def test_kill_all_restarts_on_the_same_connection_and_memfds(boot: Boot) -> None:
    """`systemctl kill -s KILL`: supervisor and worker die; Restart=always
    starts a supervisor that takes /dev/fuse and the memfds back from the fd
    store, on the mount that never went away."""
    before, after = boot.show("show_prekill"), boot.show("show_kill_all")
    assert boot.ok("stats_kill_all"), boot.text("stats_kill_all")
    assert after.get("ActiveState") == "active" and after.get("NRestarts") == "1", after
    assert after.get("MainPID") != before.get("MainPID"), (before, after)
    old, new = boot.stats("stats_prekill")["process"], boot.stats("stats_kill_all")["process"]
    assert new["supervisor_pid"] == int(after["MainPID"]) != old["supervisor_pid"], (old, new)
    assert new["worker_pid"] != old["worker_pid"], (old, new)
    assert (old["supervisor_start"], old["supervisor_restarts"]) == ("service", 0), old
    assert (new["supervisor_start"], new["supervisor_restarts"]) == ("service", 1), new
    # The same connection: same mount id, same device, its fusectl entry.
    assert boot.conn("conn_kill_all") == boot.conn("conn_before")
    # The same memfds (inodes), now held by the new supervisor.
    assert boot.ok("held_kill_all") and "memfd:zswapd-arena" in boot.text("held_before"), boot.text("held_before")
    assert boot.text("held_kill_all") == boot.text("held_before")
    journal = boot.text("journal_kill_all")
    assert TAKEOVER in journal, journal
    assert "took over (restart 1): asked the kernel to resend" in journal, journal
    # RuntimeDirectoryPreserve=restart: the control socket survived too.
    assert set(boot.text("rundir_kill_all").split()) >= {"control.sock", "mnt"}, boot.text("rundir_kill_all")


def test_kill_main_only_systemd_ends_the_worker_before_restarting(boot: Boot) -> None:
    """SIGKILL to the supervisor alone: KillMode=mixed makes systemd SIGKILL
    the rest of the cgroup (the orphaned worker) and wait for it to be empty
    before the restart, so the old worker is gone before the new one asks
    for a resend (docs/operation.md: never resend while the old server lives)."""
    after = boot.show("show_kill_main")
    assert boot.ok("stats_kill_main"), boot.text("stats_kill_main")
    assert after.get("ActiveState") == "active" and after.get("NRestarts") == "2", after
    old_worker = boot.stats("stats_kill_all")["process"]["worker_pid"]
    new_main = int(after["MainPID"])
    assert boot.stats("stats_kill_main")["process"]["supervisor_pid"] == new_main
    lines = boot.console_lines()

    def first(pattern: str, start: int = 0) -> int:
        found = [i for i, line in enumerate(lines) if i >= start and re.search(pattern, line)]
        assert found, f"not on the console: {pattern}"
        return found[0]

    killed = first(rf"zswapd\.service: Killing process {old_worker} \(.*\) with signal SIGKILL")
    empty = first(r"zswapd\.service: Control group is empty", killed)
    taking_over = first(rf"zswapd\[{new_main}\]: " + re.escape(TAKEOVER))
    # The count goes on from the dead supervisor's (the state header keeps it).
    resend = first(r"zswapd\[\d+\]: took over \(restart 2\)", taking_over)
    assert killed < empty < taking_over < resend
    # systemd restarts the supervisor; the orphaned worker never starts one.
    assert boot.stats("stats_kill_main")["process"]["supervisor_restarts"] == 2
    assert not [line for line in lines if "handing it our fds" in line or "--adopt" in line], lines
    assert boot.conn("conn_kill_main") == boot.conn("conn_before")
    assert TAKEOVER in boot.text("journal_kill_main"), boot.text("journal_kill_main")


def test_crash_loop_beyond_the_default_start_limit(boot: Boot) -> None:
    """Four more kills in a row: 7 starts within seconds, more than systemd's
    default StartLimitBurst=5 per 10 s, after which it would give up and
    close the fd store (StartLimitIntervalSec=0 in the unit)."""
    show = boot.show("show_crash_loop")
    assert boot.ok("stats_crash_loop"), boot.text("stats_crash_loop")
    assert show.get("ActiveState") == "active" and show.get("NRestarts") == "6", show
    assert show.get("NFileDescriptorStore") == str(len(STORED.split(", "))), show
    # Every supervisor death was a worker restart too, counted across them.
    assert boot.stats("stats_crash_loop")["process"]["worker_restarts"] == 6


def test_reload_replaces_the_worker_and_rereads_the_config(boot: Boot) -> None:
    """ExecReload= is `zswapd reload`: a fresh worker under the same
    supervisor, and the changed memory_limit applies."""
    before, after = boot.stats("stats_prereload"), boot.stats("stats_reloaded")
    assert before["mem_limit"] == 64 * MIB
    assert boot.ok("reload"), boot.text("reload")
    assert after["mem_limit"] == 32 * MIB, after["mem_limit"]
    assert after["process"]["supervisor_pid"] == before["process"]["supervisor_pid"], (before, after)
    assert after["process"]["worker_pid"] != before["process"]["worker_pid"], (before, after)
    show, crash = boot.show("reloaded"), boot.show("show_crash_loop")
    assert show.get("ActiveState") == "active", show
    assert show.get("MainPID") == crash.get("MainPID") and show.get("NRestarts") == crash.get("NRestarts"), (
        show,
        crash,
    )
    assert boot.conn("conn_reloaded") == boot.conn("conn_before")


def test_sighup_reloads_only_the_config(boot: Boot) -> None:
    assert boot.ok("hup"), boot.text("hup")
    assert boot.ok("stats_hup"), f"memory_limit not applied by SIGHUP:\n{boot.text('stats_hup')}"
    worker = boot.stats("stats_reloaded")["process"]["worker_pid"]
    assert re.search(rf'"worker_pid": {worker}\b', boot.text("stats_hup")), boot.text("stats_hup")


def test_stop_empties_the_fd_store_and_leaves_nothing(boot: Boot) -> None:
    assert boot.ok("stop"), boot.text("stop")
    show = boot.show("stopped")
    assert show.get("ActiveState") == "inactive" and show.get("Result") == "success", show
    assert show.get("NFileDescriptorStore") == "0", show
    assert " fuse.zswapd " not in boot.text("mountinfo_stopped")
    assert boot.ok("loops_stopped"), boot.text("loops_stopped")
    assert FILE not in boot.text("loops_stopped")
    assert boot.rc_of("procs_stopped") == 1, boot.text("procs_stopped")  # pgrep: nothing matched
    # RuntimeDirectoryPreserve=restart removes the directory at a real stop.
    assert boot.rc_of("rundir_stopped") != 0, boot.text("rundir_stopped")
    # The next start mounts afresh: nothing came back from the store.
    assert boot.ok("restart") and boot.show("restarted").get("ActiveState") == "active", boot.text("restarted")
    journal = boot.text("journal_restarted")
    assert "ready: serving" in journal and "taking over" not in journal and "(takeover)" not in journal, journal
    # New memfds.  Not the mount id or the device number as proof: the kernel
    # hands those out lowest-free first, so a new mount gets the old ones;
    # shmem inode numbers come from a counter.
    memfds = [line for line in boot.text("held_restarted").splitlines() if "memfd:" in line]
    assert memfds and not set(memfds) & set(boot.text("held_before").splitlines()), boot.text("held_restarted")


def test_shutdown_stops_daemon_before_its_mount(boot: Boot) -> None:
    """At poweroff, systemd must stop zswapd (which swapoffs, detaches and
    unmounts itself) before it stops the mount unit, and never unmount the
    FUSE mount itself while the daemon serves it."""
    assert boot.ok("restart") and boot.show("restarted").get("ActiveState") == "active", boot.text("restarted")
    assert boot.ok("mount_unit_again"), boot.text("mount_unit_again")
    running = boot.show("restarted")
    assert running.get("ActiveState") == "active", f"not running at poweroff: {running}"
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
