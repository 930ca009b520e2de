"""``lazyctl promote``: promote an image's (or one layer's) lazily mounted layers to local snapshots now."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lazyd.cli.lazyctl import DEFAULT_SOCKET
from lazyd.cli.output import fail, print_json
from lazyd.cli.registry import add_global

if TYPE_CHECKING:
    from lazyd.api.client import Client


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``promote``."""
    p = sub.add_parser("promote", help="fetch an image's lazy layers in full now and promote them to local snapshots",
                       description="lazyd fetches every chunk the layers still miss at once (no background "
                                   "delay); the snapshotter then extracts each layer into a plain directory that "
                                   "new containers use without lazyd or the registry. Works with the "
                                   "snapshotter's promote setting 'after_fetch' or 'manual', not 'off'.")
    add_global(p, "socket", default=DEFAULT_SOCKET, help="daemon socket")
    add_global(p, "json", default=False, help="one JSON document for scripts")
    p.add_argument("target", metavar="REF|LAYER_DIGEST",
                   help="an image reference (its mounted layers) or one layer digest (sha256:...)")
    p.set_defaults(func=_promote)


def _promote(args: argparse.Namespace) -> int:
    from lazyd.api.client import Client
    from lazyd.api.messages import DIGEST_RE, ApiError, PromoteArgs, PromoteResult

    is_digest = bool(DIGEST_RE.match(args.target))
    try:
        request = PromoteArgs(layer_digest=args.target) if is_digest else PromoteArgs(ref=args.target)
        client: Client
        with Client(args.socket, timeout=60.0, connect_timeout=2.0) as client:
            result: PromoteResult = client.request("promote", request)
    except ApiError as exc:
        return fail(f"promote {args.target}: {exc.code}: {exc.message}")
    if args.json:
        print_json(result.to_dict())
        return 0
    for digest in result.layers:
        print(f"{digest}: fetching the rest, then promoting (snapshotter promote = {result.mode})")
    for digest in result.local:
        print(f"{digest}: already local")
    return 0
