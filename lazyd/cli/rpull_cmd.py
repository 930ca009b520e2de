"""``lazyctl rpull``: pull an image into containerd with lazily mounted (remote) snapshots."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING

from lazyd.cli.lazyctl import DEFAULT_SOCKET
from lazyd.cli.output import fail, human_bytes, print_json, print_table, progress
from lazyd.containerd import DEFAULT_ADDRESS, DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from lazyd.cli.output import Progress
    from lazyd.containerd.pull import LayerResult, PullResult
    from lazyd.registry import Descriptor, Image

DEFAULT_SNAPSHOTTER = "lazyd"


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``rpull`` to ``sub``."""
    from lazyd.cli.registry import add_global

    p = sub.add_parser(
        "rpull",
        help="pull an image into containerd, mounting eStargz layers lazily",
        description="Resolve REF, store its index/manifest/config in containerd and build the snapshot chain "
        "through the snapshotter with remote labels (like `ctr-remote images rpull`). Layers the snapshotter "
        "cannot mount lazily are downloaded and applied in full. REF is resolved by lazyd (its registry "
        "configuration applies) when lazyd runs; --plain-http and --hosts-dir apply to what rpull fetches "
        "itself: layers pulled in full, and REF when lazyd is not running.",
    )
    p.add_argument("ref", metavar="REF", help="image reference, e.g. 127.0.0.1:5000/app:latest")
    p.add_argument("--plain-http", action="store_true",
                   help="talk plain HTTP to REF's registry (for what rpull fetches itself)")
    p.add_argument("--hosts-dir", default=None,
                   help="containerd-style certs.d directory with hosts.toml files (for what rpull fetches itself)")
    add_global(p, "address", default=DEFAULT_ADDRESS, help="containerd socket")
    add_global(p, "namespace", default=DEFAULT_NAMESPACE, help="containerd namespace")
    p.add_argument("--snapshotter", default=DEFAULT_SNAPSHOTTER,
                   help=f"containerd snapshotter to unpack into (default {DEFAULT_SNAPSHOTTER})")
    add_global(p, "socket", default=DEFAULT_SOCKET,
               help="lazyd's socket: it resolves REF and says why a layer was not mounted lazily")
    add_global(p, "json", default=False, help="print the result as JSON")
    p.set_defaults(func=run)


class _BarObserver:
    """Feeds the progress bar: the bytes of each layer done (downloaded ones as they arrive)."""

    def __init__(self, bar: "Progress") -> None:
        self.bar = bar
        self.total = 0

    def resolved(self, image: "Image") -> None:
        self.total = len(image.layers)
        self.bar.set_description(f"resolved {image.manifest_digest[:19]}")

    def layer_started(self, index: int, desc: "Descriptor") -> None:
        self.bar.set_description(f"layer {index + 1}/{self.total} {desc.digest[7:19]}")

    def fetched(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def layer_done(self, result: "LayerResult") -> None:
        if result.mode != "full":  # full layers counted their bytes while downloading
            self.bar.update(result.size)
        self.bar.set_description(f"layer {result.index + 1}/{self.total} {result.mode}")


def _lazyd_reasons(socket_path: str) -> "Callable[[str], Awaitable[str | None]]":
    """Look a layer up in the fallbacks lazyd recorded (the snapshotter reports each one there)."""

    def ask(layer_digest: str) -> str | None:
        from lazyd.api.client import Client
        from lazyd.api.messages import ApiError

        if not os.path.exists(socket_path):
            return None
        try:
            with Client(socket_path, timeout=2.0, connect_timeout=0.5) as client:
                fallbacks = client.status().fallbacks
        except (ApiError, OSError):
            return None
        found = [f for f in fallbacks if f.layer_digest == layer_digest]
        return max(found, key=lambda f: f.time).reason if found else None

    async def lookup(layer_digest: str) -> str | None:
        import asyncio

        return await asyncio.to_thread(ask, layer_digest)

    return lookup


async def _pull(args: argparse.Namespace, observer: _BarObserver) -> "PullResult":
    from lazyd.containerd.client import ContainerdClient
    from lazyd.containerd.pull import RemotePuller
    from lazyd.containerd.source import LazydSource
    from lazyd.registry import RegistryConfig
    from lazyd.registry.reference import Reference

    ref = Reference.parse(args.ref)
    cfg = RegistryConfig()
    if args.hosts_dir:
        cfg = dataclasses.replace(cfg, hosts_dir=args.hosts_dir)
    if args.plain_http:
        cfg = dataclasses.replace(cfg, plain_http=[*cfg.plain_http, ref.registry])
    async with LazydSource(args.socket, cfg) as source, ContainerdClient(args.address, args.namespace) as containerd:
        puller = RemotePuller(containerd, source, args.snapshotter, observer=observer,
                              fallback_reasons=_lazyd_reasons(args.socket))
        result = await puller.pull(ref)
        result.resolved_by = source.resolved_by
        return result


def run(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.containerd.errors import ContainerdError
    from lazyd.containerd.pull import PullError
    from lazyd.containerd.source import ResolveError
    from lazyd.registry.errors import RegistryError

    started = time.monotonic()
    try:
        with progress(None, "resolving", enabled=not args.json) as bar:
            result = asyncio.run(_pull(args, _BarObserver(bar)))
    except (PullError, ContainerdError, RegistryError, ResolveError) as err:
        return fail(f"rpull {args.ref}: {err}")
    if args.json:
        print_json(result.to_json())
        return 0
    rows = [
        [layer.index, layer.digest[:19], human_bytes(layer.size), layer.mode, f"{layer.seconds:.2f}s", layer.reason or ""]
        for layer in result.layers
    ]
    print_table(["#", "LAYER", "SIZE", "MODE", "TIME", "WHY IN FULL"], rows)
    lazy = sum(1 for layer in result.layers if layer.mode == "lazy")
    full = len(result.full_layers)
    print(f"pulled {result.image} ({result.target_digest[:19]}) with snapshotter {result.snapshotter} "
          f"in {time.monotonic() - started:.2f}s: {lazy} lazy, {full} in full, "
          f"{human_bytes(result.bytes_fetched)} of layers downloaded")
    for layer in result.full_layers:
        print(f"layer {layer.index} {layer.digest} pulled in full: {layer.reason}", file=sys.stderr)
    return 0
