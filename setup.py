"""Builds the optional native engine, zswapd._engine, from zswapd/engine/*.c,
and the man pages.

``pip install .`` must succeed without a compiler or the lz4/zstd headers:
a failed build is reported and skipped, and zswapd then runs on its Python
engine (``[pool] engine = "auto"`` warns once at start).

The man pages zswapd(8) and zswapd.toml(5) are written at build time from
the CLI's parser, the config schema and the example config
(zswapd/manpage.py), into build/man, and installed as data files into
share/man: /usr/local/share/man for ``pip install .`` as root, where man(1)
looks.  (An editable install, ``pip install -e``, installs no data files.)
Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _pkg_config(*args: str) -> list[str]:
    if not shutil.which("pkg-config"):
        return []
    try:
        out = subprocess.run(["pkg-config", *args, "liblz4", "libzstd"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.stdout.split()


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the extension is an accelerator."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler at all, or a broken toolchain
            self._skip(e)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # missing headers or libraries
            self._skip(e)

    @staticmethod
    def _skip(e: Exception) -> None:
        print(
            f"WARNING: zswapd's native engine was not built ({e}); zswapd will use its Python engine. "
            "On Debian: apt-get install gcc python3-dev liblz4-dev libzstd-dev, then reinstall.",
            file=sys.stderr,
        )


def _lz4_static() -> str | None:
    """The system's liblz4.a: the one place LZ4_compress_fast_extState_fastReset
    (no 16 KiB state reset per page) is exported."""
    dirs = [d[2:] for d in _pkg_config("--libs-only-L")]
    dirs += [f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or ''}", "/usr/lib", "/usr/local/lib"]
    for d in dirs:
        path = os.path.join(d, "liblz4.a")
        if os.path.exists(path):
            return path
    return None


cflags = [f for f in _pkg_config("--cflags") if f.startswith("-I")]
lz4_static = _lz4_static()
if lz4_static:
    # --exclude-libs: keep lz4 private, python-lz4 bundles its own copy.
    libs = [lz4_static, "-lzstd", "-Wl,--exclude-libs,ALL"]
else:
    cflags.append("-DZSWAPD_LZ4_FULL_RESET")
    libs = ["-llz4", "-lzstd"]


def _man_pages() -> list[tuple[str, list[str]]]:
    """data_files for the man pages, written now from this source tree
    (zswapd.manpage imports nothing beyond the standard library)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        from zswapd.manpage import PAGES, write
    finally:
        sys.path.remove(here)
    write(os.path.join(here, "build", "man"))
    return [(f"share/man/{section}", [f"build/man/{name}"]) for name, section in PAGES.items()]


# The engine's files, one job each (see the top of zswapd/engine/engine.h).
ENGINE_DIR = "zswapd/engine"
ENGINE_SOURCES = sorted(f"{ENGINE_DIR}/{f}" for f in os.listdir(ENGINE_DIR) if f.endswith(".c"))
ENGINE_HEADERS = sorted(f"{ENGINE_DIR}/{f}" for f in os.listdir(ENGINE_DIR) if f.endswith(".h"))
# -fvisibility=hidden: the files call each other by plain names (trim,
# compact, encode); hidden, no other library's symbol of the same name can
# stand in for them, and only PyInit__engine is exported.
ENGINE_CFLAGS = ["-O2", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]


setup(
    data_files=_man_pages(),
    ext_modules=[
        Extension(
            "zswapd._engine",
            sources=ENGINE_SOURCES,
            depends=ENGINE_HEADERS,
            extra_compile_args=[*ENGINE_CFLAGS, *cflags],
            extra_link_args=libs,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
