"""``--version``: lazyd's version and the llfuse build in use.

Cheap on purpose: the registry imports this module only when ``--version`` is given
(and ``lazyctl status`` when it prints a table); it then imports only
``importlib.metadata`` and llfuse itself.
"""

from __future__ import annotations

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


def version_text(prog: str) -> str:
    """What ``PROG --version`` prints: lazyd's version, then the llfuse build."""
    return f"{prog} {lazyd_version()}\nllfuse {describe_llfuse(llfuse_version())}\n"
