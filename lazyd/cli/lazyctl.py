"""``lazyctl``: the command-line client of lazyd."""

from __future__ import annotations

import argparse
import sys

from lazyd.cli.registry import build_parser as _build, run

DEFAULT_SOCKET = "/run/lazyd/lazyd.sock"

# Command modules, in help order.
_COMMAND_MODULES = (
    "lazyd.cli.layer_cmd",     # lazyctl layer convert|inspect
    "lazyd.cli.image_cmd",     # lazyctl image convert
    "lazyd.cli.daemon_cmd",    # lazyctl status|mount|umount|check|cache|shutdown
    "lazyd.cli.rpull_cmd",     # lazyctl rpull
)


def build_parser() -> argparse.ArgumentParser:
    return _build("lazyctl", "Control lazyd and build eStargz images.", _COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
