"""``--version``: lazyd's version and the llfuse build in use.

Cheap on purpose: nothing is imported until ``--version`` is given, and then only
``importlib.metadata`` and llfuse itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# The local-version suffix of lazyd's patched llfuse (contrib/llfuse): read() gets the inode,
# so the workers let the kernel open files by itself (no_open).  lazyd/fuse/fs.py checks the same.
PATCHED_SUFFIX = "+lazyd.readino"


def lazyd_version() -> str:
    """The installed distribution's version, or the package's own when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lazyd")
    except PackageNotFoundError:
        from lazyd import __version__

        return __version__


def llfuse_version() -> str | None:
    """``llfuse.__version__`` of the llfuse this Python imports, or None when the import fails."""
    try:
        import llfuse
    except Exception:  # noqa: BLE001 - ImportError, or an OSError/ABI error loading the extension
        return None
    return str(llfuse.__version__)


def describe_llfuse(version: str | None) -> str:
    """One line for humans: which llfuse build, and what it means for lazyd."""
    if not version:
        return "not installed"
    if version.endswith(PATCHED_SUFFIX):
        return f"{version} (lazyd's patched build: kernel no_open)"
    return f"{version} (stock build: every open reaches the worker)"


class VersionAction(argparse.Action):
    """``--version``: print the versions and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        sys.stdout.write(f"{parser.prog} {lazyd_version()}\nllfuse {describe_llfuse(llfuse_version())}\n")
        parser.exit(0)
