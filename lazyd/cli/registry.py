"""The command registry shared by ``lazyd`` and ``lazyctl``.

Each command group lives in its own module exposing ``register(subparsers)``; a
registered command sets ``func`` (returning an exit status) on its parser.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with one subcommand group per module in ``modules``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; 130 on Ctrl-C."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
