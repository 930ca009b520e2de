#!/usr/bin/env python3
"""Regenerate the Python stubs for lazyd/proto/**/*.proto with grpcio-tools.

The .proto files import each other by their path from the repository root
(``lazyd/proto/containerd/types/mount.proto``), so the generated modules import
each other as ``lazyd.proto.containerd...`` and need no fixing up.  Run from
anywhere: ``python3 scripts/gen_protos.py``; the stubs are committed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "lazyd" / "proto"


class ProtocError(RuntimeError):
    """protoc rejected a .proto file."""


def proto_files() -> list[Path]:
    """Every .proto file under lazyd/proto, sorted."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def ensure_packages() -> None:
    """Give every directory under lazyd/proto an ``__init__.py`` so the stubs import."""
    for directory in [PROTO_ROOT, *(p for p in PROTO_ROOT.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf modules (see scripts/gen_protos.py)."""\n')


def generate(out: Path = REPO) -> list[Path]:
    """Run protoc for every .proto file, writing stubs under ``out``; return the .proto files."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = proto_files()
    for proto in files:
        rel = proto.relative_to(REPO)
        argv = ["grpc_tools.protoc", f"-I{REPO}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}"]
        if "services" in rel.parts:
            argv.append(f"--grpc_python_out={out}")
        argv.append(str(rel))
        if protoc.main(argv) != 0:
            raise ProtocError(f"protoc failed on {rel}")
    if out == REPO:
        ensure_packages()
    return files


def stale_stubs() -> list[str]:
    """Generated files that differ from (or are missing next to) their .proto files."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp)
        stale = []
        for new in sorted(p for p in fresh.rglob("*") if p.is_file()):
            rel = new.relative_to(fresh)
            old = REPO / rel
            if not old.exists() or not filecmp.cmp(new, old, shallow=False):
                stale.append(str(rel))
        shutil.rmtree(fresh, ignore_errors=True)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stubs that are out of date (exit 1)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_stubs()
            for rel in stale:
                print(f"gen_protos: out of date: {rel}", file=sys.stderr)
            return 1 if stale else 0
        files = generate()
    except ProtocError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 1
    print(f"generated stubs for {len(files)} proto files under {PROTO_ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
