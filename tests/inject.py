"""Run the zswapd CLI with one function replaced by a bug.

    python tests/inject.py zswapd.store:Store.compaction_wanted run --config X

The named attribute raises ``InjectedBug`` on every call, so a test can check
that the daemon logs the failure, contains it and goes on serving.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn


class InjectedBug(RuntimeError):
    pass


def main() -> int:
    target, argv = sys.argv[1], sys.argv[2:]
    module_name, _, attr_path = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    getattr(owner, name)  # fail now if the name is wrong

    def bug(*args: object, **kwargs: object) -> NoReturn:
        raise InjectedBug(f"injected bug in {target}")

    setattr(owner, name, bug)
    from zswapd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
