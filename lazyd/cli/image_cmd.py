"""``lazyctl image convert`` (a registry image to eStargz) and ``lazyctl image optimize``
(profile a workload, then rebuild with its files first in each layer); both push the result."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from lazyd.cli.args import path_arg, registry_config
from lazyd.cli.output import fail, format_table, human_bytes, print_json, progress
from lazyd.cli.registry import add_global
from lazyd.cli.workload_args import WorkloadUsageError, add_workload_args, workload_from_args

if TYPE_CHECKING:
    from collections.abc import Callable

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
    p.add_argument("--prioritized", metavar="FILE", type=path_arg,
                   help="file listing paths (one a line) to place first, before the prefetch landmark")
    p.add_argument("--chunk-size", metavar="N", type=int, help="eStargz chunk size in bytes")
    add_global(p, "json", default=False, help="print a JSON summary (no progress bar)")
    add_registry_args(p)
    p.set_defaults(func=_convert)
    _register_optimize(isub)


def _convert(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.convert import ConvertError, ConvertOptions
    from lazyd.registry import Reference, RegistryError

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
    cfg = registry_config(args, src.registry, dst.registry)
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


# -- optimize ----------------------------------------------------------------------

OPTIMIZE_SRC_SUFFIX = "-lazyd-optimize-src"


def _register_optimize(isub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    from lazyd.cli.lazyctl import DEFAULT_SOCKET

    p = isub.add_parser(
        "optimize", help="profile a workload and push an image with its files first in each layer",
        description="Run the workload once in a container (containerd + runc) on SRC's layers, mounted lazily "
                    "through lazyd with tracing, and record the files it opens; then rebuild every layer of SRC "
                    "as eStargz with those files first, in access order, before .prefetch.landmark (layers it "
                    "never touched get .no.prefetch.landmark), and push DST. A SRC that is not eStargz is "
                    "converted first (pushed as DST's tag + '" + OPTIMIZE_SRC_SUFFIX + "') to be profiled. "
                    "Needs lazyd serve and containerd, unless --prioritized-only reuses a record.")
    p.add_argument("src", metavar="SRC", help="source image reference")
    p.add_argument("dst", metavar="DST", help="destination image reference (with a tag)")
    p.add_argument("--plain-http", action="store_true", help="allow plain HTTP for the hosts of SRC and DST")
    add_workload_args(p, "write the profile as JSON lines (the reference's record format, ctr-remote --record-in)")
    p.add_argument("--prioritized-only", metavar="FILE", type=path_arg,
                   help="use this record (ours or from ctr-remote image optimize --record-out) and run nothing")
    p.add_argument("--chunk-size", metavar="N", type=int, help="eStargz chunk size in bytes")
    add_global(p, "json", default=False, help="print a JSON summary (no progress)")
    add_global(p, "socket", default=DEFAULT_SOCKET, help="lazyd's socket (it mounts the layers for profiling)")
    add_global(p, "address", default=None,
               help="containerd socket that runs the workload (default $CONTAINERD_ADDRESS or "
                    "/run/containerd/containerd.sock)")
    add_registry_args(p)
    p.set_defaults(func=_optimize)


class _UsageError(Exception):
    """A bad option value (exit status 2)."""


def _optimize(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.convert import ConvertError
    from lazyd.profile.records import RecordError
    from lazyd.profile.workload import WorkloadError
    from lazyd.registry import Reference, RegistryError

    try:
        src, dst = Reference.parse(args.src), Reference.parse(args.dst)
        if dst.tag is None:
            raise _UsageError(f"destination {dst} needs a tag")
        if args.chunk_size is not None and args.chunk_size <= 0:
            raise _UsageError("--chunk-size must be a positive number of bytes")
        workload = workload_from_args(args)
    except (_UsageError, WorkloadUsageError, RegistryError) as exc:
        return fail(str(exc), 2)
    cfg = registry_config(args, src.registry, dst.registry)
    show = not args.json and sys.stderr.isatty()

    def say(message: str) -> None:
        if show:
            print(message, file=sys.stderr)

    try:
        summary = asyncio.run(_run_optimize(cfg, src, dst, workload, args, say))
    except (RegistryError, ConvertError, WorkloadError, RecordError) as exc:
        return fail(str(exc))
    if args.json:
        print_json(summary)
        return 0
    if summary["profile"]["converted_source"]:
        print(f"note: {summary['source']} is not eStargz; it was converted to {summary['profile']['ref']} "
              "to be profiled")
    rows = [[layer["index"], layer["source_digest"][:19], layer["digest"][:19], layer["prioritized"],
             len(layer["missing"]), layer["landmark"]] for layer in summary["layers"]]
    print(format_table(["LAYER", "SOURCE", "DIGEST", "PRIORITIZED", "MISSING", "LANDMARK"], rows))
    prof = summary["profile"]
    if prof["records_from"] is None:
        how = "stopped at the end of the period" if prof["stopped"] else f"exited {prof['exit_code']}"
        print(f"profile: {prof['records']} file(s) in {prof['seconds']:.1f}s (workload {how} after "
              f"{prof['run_seconds']:.1f}s){'; the trace was truncated' if prof['truncated'] else ''}")
    else:
        print(f"profile: {prof['records']} file(s) from {prof['records_from']}")
    print(f"pushed {summary['destination']}@{summary['digest']} (convert {summary['convert_seconds']:.1f}s, "
          f"total {summary['seconds']:.1f}s)")
    return 0


async def _run_optimize(cfg: RegistryConfig, src: Reference, dst: Reference, workload: Any,
                        args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Profile (or load the record), convert with per-layer lists, push; the summary as a JSON-able dict."""
    import asyncio
    import time

    from lazyd.convert import ConvertOptions, convert_image
    from lazyd.convert.layer import is_estargz
    from lazyd.profile import records as rec
    from lazyd.profile.workload import check_environment, record_workload
    from lazyd.registry import Reference, RegistryClient

    started = time.monotonic()
    async with RegistryClient(cfg) as client:
        image = await client.resolve(src)
        pinned = src.with_digest(image.manifest_digest)
        n_layers = len(image.layers)
        converted_source = False
        profile_ref = str(pinned)
        profile: dict[str, Any] = {"ref": profile_ref, "converted_source": False, "records_from": None,
                                   "seconds": 0.0, "run_seconds": 0.0, "exit_code": None, "stopped": False,
                                   "truncated": False, "output": ""}
        if args.prioritized_only is not None:
            records = rec.load(args.prioritized_only)
            others = sorted({r.manifest_digest for r in records
                             if r.manifest_digest and r.manifest_digest != image.manifest_digest})
            if others:
                raise rec.RecordError(f"record file {args.prioritized_only} is for manifest {', '.join(others)}, "
                                      f"not for {src}'s {image.manifest_digest}")
            profile["records_from"] = str(args.prioritized_only)
        else:
            await check_environment(args.socket, args.address)  # before any conversion
            checks = await asyncio.gather(*(is_estargz(client, pinned, d) for d in image.layers))
            if not all(checks):
                tmp = Reference(dst.registry, dst.repository, f"{dst.tag}{OPTIMIZE_SRC_SUFFIX}", None)
                say(f"{src} is not eStargz: converting it to {tmp} to profile it")
                result = await convert_image(client, pinned, tmp, ConvertOptions())
                profile_ref = str(tmp.with_digest(result.digest))
                converted_source = True
            recorded = await record_workload(profile_ref, workload, socket=args.socket, plain_http=args.plain_http,
                                             hosts_dir=args.hosts_dir, progress=say, address=args.address)
            # The profiled image may be an eStargz copy of SRC: same layers, in the same order.
            records = [rec.Record(r.path, image.manifest_digest, r.layer_index) for r in recorded.records]
            profile.update(ref=profile_ref, converted_source=converted_source, seconds=recorded.seconds,
                           run_seconds=recorded.run_seconds, exit_code=recorded.exit_code, stopped=recorded.stopped,
                           truncated=recorded.truncated, output=recorded.output)
        by_layer = rec.by_layer(records, image.manifest_digest)
        beyond = sorted(i for i in by_layer if i >= n_layers)
        if beyond:
            raise rec.RecordError(f"records name layer(s) {beyond} but {src} has {n_layers} layer(s)")
        profile["records"] = sum(len(v) for v in by_layer.values())
        if args.record_out is not None:
            try:
                args.record_out.write_text(rec.dumps(records))
            except OSError as exc:
                raise rec.RecordError(f"cannot write --record-out {args.record_out}: {exc.strerror}") from None
        say(f"rebuilding {n_layers} layer(s) with the profiled files first")
        converted = time.monotonic()
        options = ConvertOptions(chunk_size=args.chunk_size, layer_prioritized=by_layer, rebuild=True)
        with progress(None, "convert", enabled=not args.json) as bar:
            result = await convert_image(client, pinned, dst, options, progress=bar.update)
    layers = [{"index": i, "source_digest": layer.source_digest, "digest": layer.digest, "size": layer.size,
               "toc_digest": layer.toc_digest, "prioritized": layer.prioritized - len(layer.missing),
               "missing": layer.missing, "landmark": layer.landmark}
              for i, layer in enumerate(result.manifests[0].layers)]
    return {"source": str(src), "source_manifest": image.manifest_digest, "destination": str(dst),
            "digest": result.digest, "layers": layers, "profile": profile,
            "convert_seconds": round(time.monotonic() - converted, 3),
            "seconds": round(time.monotonic() - started, 3)}
