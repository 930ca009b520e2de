"""``lazyctl layer convert`` and ``lazyctl layer inspect``: eStargz layer blobs on local disk."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import TYPE_CHECKING

from lazyd.cli.output import fail, human_bytes, print_json, print_table, progress
from lazyd.cli.registry import add_global

if TYPE_CHECKING:
    from lazyd.estargz import TOCEntry


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``layer convert`` and ``layer inspect``."""
    layer = sub.add_parser("layer", help="convert and inspect eStargz layer blobs")
    lsub = layer.add_subparsers(dest="layer_command", metavar="SUBCOMMAND")
    lsub.required = True

    conv = lsub.add_parser("convert", help="convert a tar or tar.gz layer to eStargz")
    conv.add_argument("input", metavar="IN.tar[.gz]")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--prioritized", metavar="FILE",
                      help="file listing paths to place first (one per line), then .prefetch.landmark")
    conv.add_argument("--chunk-size", type=int, default=None, metavar="N",
                      help="payload chunk size in bytes (default 4 MiB)")
    conv.add_argument("--level", type=int, default=None, metavar="N",
                      help="gzip compression level 0-9 (default 9)")
    add_global(conv, "json", default=False, help="print the result as JSON")
    conv.set_defaults(func=_convert)

    insp = lsub.add_parser("inspect", help="verify an eStargz blob, list it or extract a file")
    insp.add_argument("blob", metavar="BLOB")
    insp.add_argument("--toc-digest", metavar="sha256:...", help="expected TOC digest")
    insp.add_argument("--list", action="store_true", help="list the TOC entries")
    insp.add_argument("--extract", metavar="PATH", help="write this file's bytes to stdout")
    insp.add_argument("--no-chunk-verify", action="store_true", help="check only the footer and TOC")
    add_global(insp, "json", default=False, help="print the result as JSON")
    insp.set_defaults(func=_inspect)


def _read_prioritized(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [line.strip() for line in lines if line.strip()]


def _convert(args: argparse.Namespace) -> int:
    from lazyd.estargz import BuildOptions, EStargzError, build

    try:
        prioritized = _read_prioritized(args.prioritized) if args.prioritized else []
        with open(args.input, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        total = None if gz else os.stat(args.input).st_size  # progress counts uncompressed bytes
    except OSError as exc:
        return fail(f"layer convert: {exc}")
    with progress(total, "convert", enabled=not args.json) as bar:
        defaults = BuildOptions()
        opts = BuildOptions(chunk_size=defaults.chunk_size if args.chunk_size is None else args.chunk_size,
                            level=defaults.level if args.level is None else args.level,
                            prioritized=prioritized, progress=bar.update)
        try:
            result = build(args.input, args.output, opts)
        except (EStargzError, OSError) as exc:
            return fail(f"layer convert {args.input}: {exc}")
    fields = {
        "tocDigest": result.toc_digest,
        "diffID": result.diff_id,
        "blobDigest": result.blob_digest,
        "blobSize": result.blob_size,
        "uncompressedSize": result.uncompressed_size,
    }
    if args.json:
        print_json(fields)
    else:
        print_table(["FIELD", "VALUE"], list(fields.items()))
    return 0


def _entry_json(e: TOCEntry) -> dict[str, object]:
    out: dict[str, object] = {"name": e.name, "type": e.type, "mode": oct(e.mode & 0o7777), "uid": e.uid,
                              "gid": e.gid, "size": e.size, "modtime": e.modtime}
    if e.type == "chunk":
        return {"name": e.name, "type": e.type, "offset": e.offset, "chunkOffset": e.chunk_offset,
                "chunkSize": e.chunk_size}
    if e.link_name:
        out["linkName"] = e.link_name
    if e.type in ("char", "block"):
        out["devMajor"], out["devMinor"] = e.dev_major, e.dev_minor
    if e.digest:
        out["digest"] = e.digest
    if e.xattrs:
        out["xattrs"] = sorted(e.xattrs)
    return out


def _inspect(args: argparse.Namespace) -> int:
    from lazyd.estargz import EStargzError, open_file
    from lazyd.estargz.verify import verify_blob

    if args.extract is not None and (args.list or args.json):
        return fail("layer inspect: --extract writes raw bytes and cannot be combined with --list or --json", 2)
    try:
        with open_file(args.blob, args.toc_digest) as reader:
            if args.extract is not None:
                out = sys.stdout.buffer
                for piece in reader.iter_file(args.extract):
                    out.write(piece)
                out.flush()
                return 0
            report = None
            if not args.no_chunk_verify:
                with progress(reader.footer.toc_offset, "verify", enabled=not args.json) as bar:
                    report = verify_blob(reader, bar.update)
            toc = reader.toc
            summary: dict[str, object] = {
                "blobSize": reader.blob_size,
                "footer": "estargz" if reader.footer.size == 51 else "legacy-stargz",
                "tocOffset": reader.footer.toc_offset,
                "tocDigest": toc.digest,
                "tocDigestVerified": args.toc_digest is not None,
                "entries": sum(1 for e in toc.entries if e.type != "chunk"),
                "chunks": len(toc.chunks),
                "prefetchEnd": toc.prefetch_end,
                "chunksVerified": report.chunks if report else 0,
                "filesVerified": report.files if report else 0,
            }
            if args.json:
                if args.list:
                    summary["list"] = [_entry_json(e) for e in toc.entries if e.type != "chunk"]
                print_json(summary)
                return 0
            if args.list:
                rows = []
                for e in toc.entries:
                    if e.type == "chunk":
                        continue
                    name = e.name or "."
                    if e.link_name:
                        name += (" -> " if e.type == "symlink" else " link to ") + e.link_name
                    rows.append([e.type, stat.filemode(e.st_mode), f"{e.uid}/{e.gid}", e.size, name])
                print_table(["TYPE", "MODE", "OWNER", "SIZE", "NAME"], rows)
                return 0
            rows = [[k, human_bytes(v) if k == "blobSize" else v] for k, v in summary.items()]
            print_table(["FIELD", "VALUE"], rows)
            return 0
    except BrokenPipeError:  # e.g. `lazyctl layer inspect --list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (EStargzError, OSError) as exc:
        return fail(f"layer inspect {args.blob}: {exc}")
