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
    "lazyd.cli.profile_cmd",   # lazyctl profile record|push|pull|import|list|show|delete
    "lazyd.cli.promote_cmd",   # lazyctl promote
)


def build_parser() -> argparse.ArgumentParser:
    """lazyctl's parser; every command also takes ``--log-level`` (before or after it)."""
    return _build("lazyctl", "Control lazyd and build eStargz images. Global options (--socket, --address, "
                  "--namespace, --json, --log-level) go before or after the command.", _COMMAND_MODULES,
                  common={"log_level": (None, "log lazyctl's registry, containerd and conversion "
                                                  "messages at this level (default: warnings only)")})


def _configure_logging(args: argparse.Namespace) -> None:
    """``--log-level``: log lazyctl's libraries (registry, containerd, conversion) to stderr."""
    if args.log_level is not None:
        import logging

        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s lazyctl %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, _configure_logging)


if __name__ == "__main__":
    sys.exit(main())
