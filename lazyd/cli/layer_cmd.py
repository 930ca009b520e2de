"""Commands registered by this module (being written; see docs/design.md for the owner)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add this module's commands to sub."""
