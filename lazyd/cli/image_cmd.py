"""``lazyctl image convert``: convert a registry image to eStargz and push it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lazyd.cli.output import fail, format_table, human_bytes, print_json, progress
from lazyd.cli.registry import add_global

if TYPE_CHECKING:
    from lazyd.convert import ConvertOptions, ConvertResult
    from lazyd.registry import Reference, RegistryConfig


def add_registry_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that talks to a registry."""
    p.add_argument("--hosts-dir", metavar="DIR", default=None,
                   help="containerd-style hosts dir with <host>/hosts.toml (default /etc/containerd/certs.d)")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``image convert``."""
    image = sub.add_parser("image", help="registry image commands")
    isub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    isub.required = True
    p = isub.add_parser("convert", help="convert an image to eStargz and push it",
                        description="Pull each layer of SRC, convert it to eStargz (layers that already are "
                                    "eStargz are kept) and push the image as DST.")
    p.add_argument("src", metavar="SRC", help="source image reference")
    p.add_argument("dst", metavar="DST", help="destination image reference (with a tag)")
    p.add_argument("--plain-http", action="store_true", help="allow plain HTTP for the hosts of SRC and DST")
    plat = p.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="os/arch[/variant] to convert (default: this host's)")
    plat.add_argument("--all-platforms", action="store_true", help="convert every platform and push an index")
    p.add_argument("--prioritized", metavar="FILE", type=Path,
                   help="file listing paths (one a line) to place first, before the prefetch landmark")
    p.add_argument("--chunk-size", metavar="N", type=int, help="eStargz chunk size in bytes")
    add_global(p, "json", default=False, help="print a JSON summary (no progress bar)")
    add_registry_args(p)
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.convert import ConvertError, ConvertOptions
    from lazyd.registry import Reference, RegistryConfig, RegistryError

    try:
        src, dst = Reference.parse(args.src), Reference.parse(args.dst)
    except RegistryError as exc:
        return fail(str(exc), 2)
    if args.chunk_size is not None and args.chunk_size <= 0:
        return fail("--chunk-size must be a positive number of bytes", 2)
    prioritized = None
    if args.prioritized is not None:
        try:
            prioritized = [line.strip() for line in args.prioritized.read_text().splitlines() if line.strip()]
        except OSError as exc:
            return fail(f"cannot read --prioritized file {args.prioritized}: {exc.strerror}", 2)
    cfg = RegistryConfig()
    if args.hosts_dir:
        cfg = dataclasses.replace(cfg, hosts_dir=args.hosts_dir)
    if args.plain_http:
        cfg = dataclasses.replace(cfg, plain_http=[*cfg.plain_http, src.registry, dst.registry])
    options = ConvertOptions(platform=args.platform, all_platforms=args.all_platforms,
                             chunk_size=args.chunk_size, prioritized=prioritized)
    try:
        result = asyncio.run(_run(cfg, src, dst, options, show_progress=not args.json))
    except (RegistryError, ConvertError) as exc:
        return fail(str(exc))
    for path in result.missing_prioritized:
        print(f"warning: prioritized file {path} is in no layer of {result.source}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
        return 0
    rows = []
    for m in result.manifests:
        for layer in m.layers:
            rows.append([m.platform, layer.action, layer.source_digest[:19], layer.digest[:19],
                         human_bytes(layer.size), (layer.toc_digest or "-")[:19]])
    print(format_table(["PLATFORM", "ACTION", "SOURCE", "LAYER", "SIZE", "TOC"], rows))
    print(f"pushed {result.destination}@{result.digest} in {result.seconds:.1f}s")
    return 0


async def _run(cfg: RegistryConfig, src: Reference, dst: Reference, options: ConvertOptions,
               show_progress: bool) -> ConvertResult:
    from lazyd.convert import convert_image
    from lazyd.registry import RegistryClient

    with progress(None, "convert", enabled=show_progress) as bar:
        def set_total(n: int) -> None:
            if hasattr(bar, "total"):
                bar.total = n  # type: ignore[attr-defined]
                bar.refresh()  # type: ignore[attr-defined]

        async with RegistryClient(cfg) as client:
            return await convert_image(client, src, dst, options, progress=bar.update, total=set_total)
