"""A command module that declares a global option itself (for test_placement): the registry must refuse it."""

from __future__ import annotations

import argparse

from lazyd.cli.registry import add_global


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """``good`` declares --json through the registry; ``bad`` with add_argument, which breaks placement."""
    good = sub.add_parser("good")
    add_global(good, "json", default=False)
    bad = sub.add_parser("bad")
    bad.add_argument("--json", action="store_true")
