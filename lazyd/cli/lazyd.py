"""``lazyd``: the daemon entry points (``lazyd serve``, ``lazyd snapshotter``)."""

from __future__ import annotations

import argparse
import sys

from lazyd.cli.registry import build_parser as _build, run

_COMMAND_MODULES = (
    "lazyd.cli.serve_cmd",        # lazyd serve
    "lazyd.cli.snapshotter_cmd",  # lazyd snapshotter
)


def build_parser() -> argparse.ArgumentParser:
    """lazyd's parser; the daemons' options (--config, --root, --socket, ...) go before or after the command."""
    return _build("lazyd", "Lazy-pulling image daemon. Options go before or after the command.", _COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
