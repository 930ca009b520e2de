"""``lazyctl rpull``: pull an image into containerd with lazily mounted (remote) snapshots.

When lazyd runs, it does the pull (the ``pull`` op) and this process only sends the
request and prints the answer, so it imports msgpack and the framing module, not gRPC,
protobuf or an HTTP client.  Otherwise (or with a lazyd that predates the op) the pull
runs here, with ``lazyd.containerd.pull.RemotePuller``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from lazyd.cli.args import registry_config
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


class _LazydRefused(Exception):
    """lazyd answered the ``pull`` with an error (the message is lazyd's)."""


def _pull_in_lazyd(args: argparse.Namespace, bar: "Progress", show: bool) -> dict[str, Any] | None:
    """Have lazyd run the pull (the ``pull`` op); None when lazyd is not running or predates the op.

    Only msgpack and the framing module are imported: lazyd holds the registry client,
    the layer table and the gRPC channel to containerd, so this process stays small.
    """
    import select
    import socket

    from lazyd.api import wire

    if not os.path.exists(args.socket):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError:
        sock.close()
        return None  # a stale socket: lazyd is not running
    pull_id = f"rpull-{os.getpid()}-{time.monotonic_ns()}" if show else None
    request = {"ref": args.ref, "address": os.path.abspath(args.address), "namespace": args.namespace,
               "snapshotter": args.snapshotter, "plain_http": bool(args.plain_http)}
    if args.hosts_dir:
        request["hosts_dir"] = os.path.abspath(args.hosts_dir)
    if pull_id:
        request["pull_id"] = pull_id
    shown = 0
    asked = False
    next_id = 2
    try:
        wire.send_frame(sock, {"id": 1, "op": "pull", "args": request})
        while True:
            if pull_id and not asked and not select.select([sock], [], [], 0.1)[0]:
                wire.send_frame(sock, {"id": next_id, "op": "pull_progress", "args": {"pull_id": pull_id}})
                next_id += 1
                asked = True
                continue
            reply = wire.recv_frame(sock)
            if reply.get("id") == 1:
                break
            asked = False
            status = reply.get("result") if reply.get("ok") else None
            if isinstance(status, dict):
                description, done = status.get("description"), status.get("bytes")
                bar.set_description(description if isinstance(description, str) else "")
                done = done if isinstance(done, int) else 0
                bar.update(max(0, done - shown))
                shown = max(shown, done)
    except (OSError, EOFError, wire.ProtocolError) as exc:
        raise _LazydRefused(f"lost lazyd's connection during the pull ({exc}); see lazyd's log") from None
    finally:
        sock.close()
    if reply.get("ok") is True and isinstance(reply.get("result"), dict):
        return reply["result"]
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    if error.get("code") == "unknown_op":
        return None  # an older lazyd: rpull does the work and asks it to resolve
    if error.get("code") == "unavailable" and os.path.exists(request["address"]):
        return None  # lazyd cannot reach the containerd socket this process sees (another mount namespace)
    failed = wire.reply_error(reply)  # never str()s the reply (a deep one would recurse)
    raise _LazydRefused(failed[1] if failed else "lazyd answered the pull with success and no result")


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
    from lazyd.registry.reference import Reference

    ref = Reference.parse(args.ref)
    cfg = registry_config(args, ref.registry)
    async with LazydSource(args.socket, cfg) as source, ContainerdClient(args.address, args.namespace) as containerd:
        puller = RemotePuller(containerd, source, args.snapshotter, observer=observer,
                              fallback_reasons=_lazyd_reasons(args.socket))
        result = await puller.pull(ref)
        result.resolved_by = source.resolved_by
        return result


def _pull_here(args: argparse.Namespace, bar: "Progress") -> dict[str, Any]:
    """Run the pull in this process (lazyd is not running, or too old for the ``pull`` op)."""
    import asyncio

    from lazyd.containerd.errors import ContainerdError
    from lazyd.containerd.pull import PullError
    from lazyd.containerd.source import ResolveError
    from lazyd.registry.errors import RegistryError

    try:
        return asyncio.run(_pull(args, _BarObserver(bar))).to_json()
    except (PullError, ContainerdError, RegistryError, ResolveError) as err:
        raise _LazydRefused(str(err)) from None


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    show = not args.json and sys.stderr.isatty()
    try:
        with progress(None, "resolving", enabled=show) as bar:
            result = _pull_in_lazyd(args, bar, show)
            pulled_by = "lazyd"
            if result is None:
                result, pulled_by = _pull_here(args, bar), "lazyctl"
    except _LazydRefused as err:
        return fail(f"rpull {args.ref}: {err}")
    except KeyboardInterrupt:
        return fail(f"rpull {args.ref}: interrupted", 130)
    result["pulled_by"] = pulled_by
    if args.json:
        print_json(result)
        return 0
    layers = result["layers"]
    rows = [[la["index"], la["digest"][:19], human_bytes(la["size"]), la["mode"], f"{la['seconds']:.2f}s",
             la["reason"] or ""] for la in layers]
    print_table(["#", "LAYER", "SIZE", "MODE", "TIME", "WHY IN FULL"], rows)
    lazy = sum(1 for la in layers if la["mode"] == "lazy")
    full = [la for la in layers if la["mode"] == "full"]
    print(f"pulled {result['image']} ({result['target_digest'][:19]}) with snapshotter {result['snapshotter']} "
          f"in {time.monotonic() - started:.2f}s: {lazy} lazy, {len(full)} in full, "
          f"{human_bytes(result['bytes_fetched'])} of layers downloaded")
    for la in full:
        print(f"layer {la['index']} {la['digest']} pulled in full: {la['reason']}", file=sys.stderr)
    return 0
