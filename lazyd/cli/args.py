"""Option helpers shared by lazyctl's commands.

Import-light on purpose: every lazyctl start imports each command module to build its
parser, so what these need (``pathlib``, ``dataclasses``, the registry client) is imported
when they run, not at start-up (the thin ``rpull`` path uses none of it).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lazyd.registry import RegistryConfig


def path_arg(text: str) -> Path:
    """``type=`` of an option that names a file."""
    from pathlib import Path

    return Path(text)


def registry_config(args: argparse.Namespace, *registries: str) -> RegistryConfig:
    """The registry client's configuration that ``--hosts-dir`` and ``--plain-http`` ask for:
    the hosts directory, and plain HTTP allowed for ``registries`` (the command's image hosts)."""
    import dataclasses

    from lazyd.registry import RegistryConfig

    cfg = RegistryConfig()
    if args.hosts_dir:
        cfg = dataclasses.replace(cfg, hosts_dir=args.hosts_dir)
    if args.plain_http:
        cfg = dataclasses.replace(cfg, plain_http=[*cfg.plain_http, *registries])
    return cfg
