"""``lazyd serve``: run the fetcher daemon (see docs/config.md and docs/protocol.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from lazyd import logsetup
from lazyd.cli import notify
from lazyd.cli.registry import add_global
from lazyd.config import DaemonConfig, load_config
from lazyd.configfile import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``serve``."""
    p = sub.add_parser("serve", help="run the lazy-pulling daemon",
                       description="Run the fetcher daemon. SIGTERM/SIGINT stop it WITHOUT unmounting "
                                   "(workers keep serving; the next 'lazyd serve' adopts them); "
                                   "'lazyctl shutdown' is the clean stop that unmounts.")
    add_global(p, "config", help="config file (default /etc/lazyd/config.toml if it exists)")
    add_global(p, "root", help="state directory (overrides 'root')")
    add_global(p, "socket", help="API socket path (overrides 'socket')")
    p.add_argument("--hosts-dir", help="containerd-style certs.d directory (overrides registry.hosts_dir)")
    add_global(p, "log_level", help="overrides 'log_level'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, {"root": _abs(args.root), "socket": _abs(args.socket), "hosts_dir": args.hosts_dir,
                                           "log_level": args.log_level})
    except ConfigError as exc:
        print(f"lazyd serve: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(config.log_level, config.log_format, "lazyd")
    return asyncio.run(_serve(config))


async def _serve(config: DaemonConfig) -> int:
    """Run the daemon; under systemd (``Type=notify``) send READY=1 once it answers ``status``."""
    from lazyd.fetcher.daemon import Daemon

    daemon = asyncio.create_task(Daemon(config).run())
    ready = asyncio.create_task(notify.lazyd_ready(config.socket))
    await asyncio.wait({daemon, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():  # the daemon stopped before it was ready
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
    elif ready.exception() is not None:
        logging.getLogger("lazyd.serve").error("%s; stopping", ready.exception())
        signal.raise_signal(signal.SIGTERM)  # the daemon's own stop: the workers keep their mounts
        await daemon
        return 1
    return await daemon


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path is not None else None
