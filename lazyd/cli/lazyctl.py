"""``lazyctl``: the command-line client of lazyd.

Each command group lives in its own module exposing ``register(subparsers)``;
a registered command sets ``func`` (returning an exit status) on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DEFAULT_SOCKET = "/run/lazyd/lazyd.sock"

# Command modules, in help order.
_COMMAND_MODULES = (
    "lazyd.cli.layer_cmd",     # lazyctl layer convert|inspect
    "lazyd.cli.image_cmd",     # lazyctl image convert
    "lazyd.cli.daemon_cmd",    # lazyctl status|mount|umount|cache|check|shutdown
    "lazyd.cli.rpull_cmd",     # lazyctl rpull
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazyctl", description="Control lazyd and build eStargz images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
