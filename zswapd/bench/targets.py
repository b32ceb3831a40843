"""The block devices a benchmark measures, each set up and torn down whole:
zswapd (this checkout's, or a baseline's: the source tree ``--baseline-src``
names, e.g. ``git worktree add ../base COMMIT``), the kernel's zram with the
same algorithm, and a loop device over a tmpfs file (the loop layer's floor);
and each of them as the only swap (``ZramSwap``, ``TmpfsLoopSwap``, and
zswapd turning on its own); and what ``bench tiers`` puts a disk behind
compressed memory with: a swap file on a disk filesystem
(``DiskSwapFile``) and the kernel's zswap (``KernelZswap``, whose
parameters it puts back as it found them).

Owns: ``Target`` and its kinds, the disk swap file, zswap's parameters
while a bench has them, what served a zswapd target, and which engine
build this checkout loads.  Loop devices are found by their file
(swap.loops_backed_by), so one a killed losetup attached is detached too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..swap import loops_backed_by
from .corpus import PAGE, create_private


def cannot_set_up(name: str) -> int | None:
    """Why a benchmark of devices cannot run here, said on stderr: 2 (its
    exit status) if not root or a tool is missing, else None."""
    if os.geteuid() != 0:
        print(f"{name}: needs root (loop devices, zram, FUSE)", file=sys.stderr)
        return 2
    for tool in ("fio", "dd", "losetup", "cmp"):
        if shutil.which(tool) is None:
            print(f"{name}: {tool} not found (apt-get install fio util-linux)", file=sys.stderr)
            return 2
    return None


def sh(*argv: str, check: bool = True, cwd: str | None = None) -> str:
    """Run a tool (losetup, mkswap, fio...) and return what it printed."""
    return subprocess.run(argv, check=check, capture_output=True, text=True, cwd=cwd).stdout


def swaps() -> list[str]:
    """The swap areas on now (/proc/swaps)."""
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


def _attach_loop(path: str) -> str:
    """A loop device with direct I/O on the file ``path``: its path."""
    return sh("losetup", "--find", "--show", "--direct-io=on", path).strip()


def _detach_loops_of(path: str) -> None:
    """Detach every loop device backed by ``path``; also catches one attached
    by a losetup that was interrupted before it printed its name."""
    for loop in loops_backed_by(path):
        subprocess.run(["losetup", "-d", loop], capture_output=True)


class Target:
    name = ""
    path = ""

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def compact(self) -> None:
        pass


class ZramTarget(Target):
    def __init__(self, size: int, algorithm: str) -> None:
        self.name = "zram"
        self.dev = "zram0"
        base = Path("/sys/block/zram0")
        if not base.exists() or (base / "initstate").read_text().strip() == "1":
            self.dev = "zram" + Path("/sys/class/zram-control/hot_add").read_text().strip()
            base = Path(f"/sys/block/{self.dev}")
        self.base = base
        try:
            (base / "reset").write_text("1")
            (base / "comp_algorithm").write_text(algorithm)
            (base / "disksize").write_text(str(size))
        except BaseException:
            self.close()
            raise
        self.path = f"/dev/{self.dev}"
        self.slab0 = _zs_slab_bytes()

    def stats(self) -> dict[str, float]:
        mm = [int(x) for x in (self.base / "mm_stat").read_text().split()]
        orig, compr, used = mm[0], mm[1], mm[2]
        pages = orig // PAGE
        disksize = int((self.base / "disksize").read_text())
        # zram's table: 16 bytes per device page (handle + flags); zsmalloc's
        # handles and zspage records are slab objects.
        meta = disksize // PAGE * 16 + (_zs_slab_bytes() - self.slab0)
        return {"orig_data_size": orig, "compr_data_size": compr, "mem_used_total": used, "pages": pages,
                "metadata_bytes": meta}  # fmt: skip

    def compact(self) -> None:
        (self.base / "compact").write_text("1")

    def close(self) -> None:
        (self.base / "reset").write_text("1")
        if self.dev != "zram0":
            Path("/sys/class/zram-control/hot_remove").write_text(self.dev[4:])


def _zs_slab_bytes() -> int:
    total = 0
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("zs_handle", "zspage"):
                    total += int(parts[1]) * int(parts[3])
    except OSError:
        pass
    return total


class ZswapdTarget(Target):
    def __init__(
        self,
        size: int,
        algorithm: str,
        workdir: str,
        backend: str = "builtin",
        src: str | None = None,
        swap_priority: int | None = None,
        fuse_threads: int | None = None,
        extra: str = "",
        memory_limit: int = 0,
        background: bool = False,
    ) -> None:
        """``src``: run the zswapd of that source tree instead of this one
        (a baseline, e.g. the previous commit, measured in the same run).
        ``swap_priority``: the daemon turns its device on as swap.
        ``fuse_threads``: [fuse] threads (default: the daemon's own default).
        ``extra``: more TOML, whole sections, appended to the config.
        ``memory_limit``: [pool] memory_limit (0: none).  ``background``:
        [compaction] background as the daemon ships it (on), instead of off
        so that only the bench's own requests compact."""
        from ..control import request

        self.name = "zswapd" if backend == "builtin" else f"zswapd-{backend}"
        if src:
            self.name = "baseline"
        self._request = request
        self.workdir = workdir
        self.swap = swap_priority is not None
        self.mnt = os.path.join(workdir, "mnt")
        self.sock = os.path.join(workdir, "ctl", "control.sock")
        cfg = os.path.join(workdir, "bench.toml")
        # With swap, the daemon itself attaches the loop device, runs mkswap
        # and swapon, and undoes them at SIGTERM, as a user's daemon would.
        swap = f"enable = true\npriority = {swap_priority}" if self.swap else "enable = false"
        # 0600 and root's, whatever the umask: the daemon refuses a config
        # that others could change (config.load strict).
        with os.fdopen(create_private(cfg), "w") as f:
            f.write(
                f'[device]\nsize = {size}\nmountpoint = "{self.mnt}"\n[pool]\nalgorithm = "{algorithm}"\n'
                f"memory_limit = {memory_limit}\n[swap]\n{swap}\n[compaction]\nbackground = {str(background).lower()}\n"
                f'[control]\nsocket = "{self.sock}"\n[fuse]\n'
                # the default named by no name: a --baseline-src tree may call it "native"
                + (f'backend = "{backend}"\n' if backend != "builtin" else "")
                + (f"threads = {fuse_threads}\n" if fuse_threads is not None else "")
                + extra
            )
        self.file = os.path.join(self.mnt, "swap")
        self.log = open(os.path.join(workdir, "daemon.log"), "wb")
        # Isolated (-I), from /: the daemon is this checkout's installed
        # zswapd, or the source tree ``src`` named explicitly, never whatever
        # lies in the directory the bench was started from.
        prefix = [sys.executable, "-I", "-m", "zswapd"]
        if src:
            boot = "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('zswapd', run_name='__main__')"
            prefix = [sys.executable, "-I", "-c", boot, os.path.abspath(src)]
        self.proc = subprocess.Popen([*prefix, "run", "--config", cfg], stderr=self.log, cwd="/")
        try:
            deadline = time.monotonic() + 60
            while not self._ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(Path(workdir, "daemon.log").read_text())
                time.sleep(0.05)
            if self.swap:
                self.path = loops_backed_by(self.file)[0]
            else:
                time.sleep(0.2)
                self.path = _attach_loop(self.file)
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.swap:  # the supervisor logs "ready:" once swap is on
            return b"ready:" in Path(self.log.name).read_bytes()
        return os.path.exists(self.sock)

    def stats(self) -> dict[str, float]:
        s = self._request(self.sock, {"cmd": "stats"})
        return {k: s[k] for k in ("orig_data_size", "compr_data_size", "mem_used_total", "metadata_bytes")} | {
            "pages": s["pages_stored"]
        }

    def serving(self) -> str:
        """What actually served this target: the engine stats report and the
        number of C FUSE threads the worker logged (a figure measured on the
        Python engine would otherwise pass for the C one's).  An older
        --baseline-src tree may call them "native" threads."""
        s = self._request(self.sock, {"cmd": "stats"})
        engine = str(s.get("engine", "python (no engine in stats)"))
        m = re.search(rb"serving FUSE with (\d+) (?:C|native) threads", Path(self.log.name).read_bytes())
        return f"{engine} engine, " + (f"{int(m.group(1))} C FUSE threads" if m else "no C FUSE threads")

    def compact(self) -> None:
        self._request(self.sock, {"cmd": "compact"}, timeout=600)

    def close(self) -> None:
        if not self.swap:
            _detach_loops_of(self.file)
            if getattr(self, "path", None):
                subprocess.run(["losetup", "-d", self.path], capture_output=True)  # found by name, not by file
        self.proc.terminate()
        try:
            self.proc.wait(300)  # swapoff brings back whatever is still in swap
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.swap:
            # Only if the daemon could not undo its own swap (killed above,
            # or it failed on the way up).
            for loop in loops_backed_by(self.file):
                subprocess.run(["swapoff", loop], capture_output=True)
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            if any(line.split()[1] == self.mnt for line in Path("/proc/mounts").read_text().splitlines()):
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.log.close()


class TmpfsLoopTarget(Target):
    def __init__(self, size: int, private: str) -> None:
        """``private``: a directory made by private_dir(), on tmpfs; the file
        receives a copy of the corpus."""
        self.name = "tmpfs-loop"
        self.file = os.path.join(private, "tmpfs-loop")
        fd = create_private(self.file)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            self.path = _attach_loop(self.file)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        _detach_loops_of(self.file)
        if getattr(self, "path", None):
            subprocess.run(["losetup", "-d", self.path], capture_output=True)  # found by name, not by file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)


def _swapon(t: Target, priority: int) -> None:
    """mkswap and swapon the target's device; on failure the target is
    closed (which turns off whatever it turned on) and the error raised."""
    try:
        sh("mkswap", t.path)
        sh("swapon", "--priority", str(priority), t.path)
    except BaseException:
        t.close()
        raise


class ZramSwap(Target):
    """zram0 with ``algorithm`` as the only swap; close() turns it off and resets it."""

    def __init__(self, size: int, algorithm: str, priority: int) -> None:
        self.zram = ZramTarget(size, algorithm)
        self.name = f"zram-{algorithm}"
        self.path = self.zram.path
        _swapon(self, priority)

    def close(self) -> None:
        if self.path in swaps():
            subprocess.run(["swapoff", self.path], capture_output=True)
        self.zram.close()


class TmpfsLoopSwap(TmpfsLoopTarget):
    """A loop device over a tmpfs file as the only swap."""

    def __init__(self, size: int, private: str, priority: int) -> None:
        super().__init__(size, private)
        _swapon(self, priority)

    def close(self) -> None:
        for loop in loops_backed_by(self.file):  # swapoff before the loop device can go
            if loop in swaps():
                subprocess.run(["swapoff", loop], capture_output=True)
        super().close()


def engine_module() -> str:
    """Which build of the C engine an import of zswapd here loads, and when it
    was built: an editable install can resolve ``zswapd._engine`` to another
    checkout's build, so a figure could otherwise belong to other C code."""
    try:
        from .. import _engine
    except ImportError:
        return "not built (python engine only)"
    path = Path(str(_engine.__file__))
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(path.stat().st_mtime))
    return f"{path} (built {built} UTC)"


def pyfuse3_available() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return True


class DiskSwapFile:
    """A swap file on a disk filesystem (``directory``), made once
    (fallocate, mkswap) and turned on and off around each run that uses it:
    behind zram at a lower priority, or behind the kernel's zswap.
    close() turns it off and removes it."""

    def __init__(self, directory: str, size: int) -> None:
        self.path = os.path.join(directory, "swapfile")
        fd = create_private(self.path)  # 0600: swapon warns about anything looser
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        try:
            sh("mkswap", self.path)
        except BaseException:
            self.close()
            raise

    def on(self, priority: int) -> None:
        sh("swapon", "--priority", str(priority), self.path)

    def off(self) -> None:
        if self.path in swaps():
            sh("swapoff", self.path)

    def used(self) -> int:
        """Bytes of it in use now (/proc/swaps)."""
        return swap_used(self.path)

    def close(self) -> None:
        if self.path in swaps():
            subprocess.run(["swapoff", self.path], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def swap_used(path: str) -> int:
    """Bytes of swap area ``path`` in use now (/proc/swaps, KiB), 0 if off."""
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[0] == path:
            return int(parts[3]) * 1024
    return 0


ZSWAP = Path("/sys/module/zswap/parameters")
ZSWAP_DEBUG = Path("/sys/kernel/debug/zswap")
# What KernelZswap sets, and so saves and restores, in the order it sets
# them; enabled last, so zswap turns on with the rest already in place.
ZSWAP_PARAMS = ("compressor", "max_pool_percent", "accept_threshold_percent", "shrinker_enabled", "enabled")


class KernelZswap:
    """The kernel's zswap, on for one run: enable() saves its parameters and
    sets them, restore() puts back what it found (enabled first, so it is
    off before anything else changes).  The caller turns restore() into a
    clean-up on every way out."""

    def __init__(self) -> None:
        self.saved: dict[str, str] = {}
        self.compressor = ""

    @staticmethod
    def available() -> bool:
        return all((ZSWAP / p).exists() for p in ZSWAP_PARAMS)

    def enable(self, max_pool_percent: int, compressors: tuple[str, ...] = ("lzo-rle", "lzo")) -> None:
        """zswap on with its shrinker, a pool of ``max_pool_percent`` of
        RAM, and the first of ``compressors`` the crypto API offers."""
        if not self.saved:
            self.saved = {p: (ZSWAP / p).read_text().strip() for p in ZSWAP_PARAMS}
        for name in compressors:
            try:
                (ZSWAP / "compressor").write_text(name)
            except OSError:
                continue
            break
        self.compressor = (ZSWAP / "compressor").read_text().strip()
        (ZSWAP / "max_pool_percent").write_text(str(max_pool_percent))
        (ZSWAP / "shrinker_enabled").write_text("Y")
        (ZSWAP / "enabled").write_text("Y")

    def restore(self) -> None:
        """Put back every saved parameter, enabled first; a parameter that
        cannot be written back does not stop the others."""
        errors = []
        for name in reversed(ZSWAP_PARAMS):
            if name in self.saved:
                try:
                    (ZSWAP / name).write_text(self.saved[name])
                except OSError as e:
                    errors.append(f"{name}={self.saved[name]}: {e.strerror}")
        self.saved = {}
        if errors:
            raise OSError(f"zswap parameters not restored: {', '.join(errors)}")

    @staticmethod
    def stats() -> dict[str, Any]:
        """Pool bytes, pages held (``pool_pages``) and pages written back:
        from debugfs when it is mounted (pool_total_size, stored_pages,
        written_back_pages, pool_limit_hit), else from /proc/meminfo (Zswap,
        Zswapped) and /proc/vmstat (zswpwb); ``source`` says which."""
        if (ZSWAP_DEBUG / "pool_total_size").exists():

            def get(name: str) -> int:
                return int((ZSWAP_DEBUG / name).read_text())

            return {"source": "debugfs", "pool_bytes": get("pool_total_size"), "pool_pages": get("stored_pages"),
                    "written_back": get("written_back_pages"), "pool_limit_hit": get("pool_limit_hit")}  # fmt: skip
        meminfo = {line.split(":")[0]: line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()}
        vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
        return {"source": "meminfo Zswap and Zswapped, vmstat zswpwb (debugfs is not mounted)",
                "pool_bytes": int(meminfo.get("Zswap", 0)) * 1024,
                "pool_pages": int(meminfo.get("Zswapped", 0)) * 1024 // PAGE,
                "written_back": int(vmstat.get("zswpwb", 0))}  # fmt: skip
