"""``lazyd snapshotter``: run the containerd proxy snapshotter (see docs/containerd.md)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from lazyd.configfile import ConfigError
from lazyd.cli import notify
from lazyd.cli.registry import add_global
from lazyd.snapshotter.config import SnapshotterConfig, load_config

DEFAULT_CONFIG = Path("/etc/lazyd/config.toml")
SIGNAL_POLL = 0.2
"""Seconds between the main thread's looks for a SIGTERM/SIGINT (see ``run``)."""


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``snapshotter``."""
    p = sub.add_parser("snapshotter", help="run the containerd proxy snapshotter",
                       description="Serve containerd's snapshot API on a Unix socket (mode 0600). "
                                   "Layers with remote-snapshot labels are mounted lazily by 'lazyd serve'; "
                                   "anything else is a normal overlayfs snapshot.")
    add_global(p, "config", help=f"TOML file with a [snapshotter] table (default {DEFAULT_CONFIG} if it exists)")
    add_global(p, "root", help="state directory (default /var/lib/lazyd/snapshotter)")
    add_global(p, "address", help="gRPC socket for containerd (default /run/lazyd/snapshotter.sock)")
    add_global(p, "lazyd_socket", help="lazyd API socket (default /run/lazyd/lazyd.sock)")
    add_global(p, "log_level", help="overrides log_level")
    p.set_defaults(func=run)


def _abs(path: str | None) -> Path | None:
    return Path(os.path.abspath(path)) if path is not None else None


def build_config(args: argparse.Namespace) -> SnapshotterConfig:
    """The file's [snapshotter] table with the command-line flags on top."""
    path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(path).with_overrides(root=_abs(args.root), address=_abs(args.address),
                                            lazyd_socket=_abs(args.lazyd_socket), log_level=args.log_level)


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"lazyd snapshotter: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s lazyd-snapshotter %(levelname)s: %(message)s")
    from lazyd.snapshotter.service import SocketError, serve
    from lazyd.snapshotter.snapshotter import Snapshotter

    log = logging.getLogger("lazyd.snapshotter")
    # Not an Event: a signal that one of gRPC's threads receives wakes no main thread blocked
    # in Event.wait() (its handler runs only when the main thread next runs Python code: the
    # snapshotter once ignored a SIGTERM for 20 s), and a handler that takes the Event's lock
    # can deadlock against the main thread holding it.  A list and a short sleep have neither.
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    snapshotter = Snapshotter(config)
    try:
        restored = snapshotter.restore()
        if restored:
            log.info("re-mounted %d remote snapshot(s)", restored)
        try:
            server = serve(snapshotter, config.address, config.grpc_workers, config.socket_group)
        except SocketError as exc:
            print(f"lazyd snapshotter: {exc}", file=sys.stderr)
            return 1
        log.info("serving containerd snapshots on %s (root %s, lazyd at %s, promote %s)", config.address,
                 config.root, config.lazyd_socket, config.promote)
        snapshotter.start_promotion()
        try:
            notify.snapshotter_ready(config.address)  # READY=1 under systemd, once the socket answers
        except notify.ReadinessError as exc:
            print(f"lazyd snapshotter: {exc}", file=sys.stderr)
            server.stop(None)
            config.address.unlink(missing_ok=True)
            return 1
        while not signals:
            time.sleep(SIGNAL_POLL)
        log.info("stopping")
        server.stop(grace=2).wait()
        config.address.unlink(missing_ok=True)
    finally:
        snapshotter.close()
    return 0
