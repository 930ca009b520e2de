"""Small eStargz blobs for the fuzz and hostile-layer tests: built with lazyd's writer, or with
their TOC replaced by hand-written JSON (the payload members stay as the writer made them)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from lazyd.estargz import FOOTER_SIZE, BuildOptions, build, decode_toc_member, footer_bytes, read_footer
from tests.fuzz.toc_docs import member_of


def write_tar(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None,
              hardlinks: dict[str, str] | None = None) -> Path:
    """A layer tar: regular files, then symlinks (name -> target) and hardlinks (name -> target)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mode, info.mtime = kind, target, 0o777, 1_600_000_000
                tf.addfile(info)
    return path


def build_blob(tar: Path, out: Path, chunk_size: int = 1000) -> bytes:
    build(tar, out, BuildOptions(chunk_size=chunk_size, workers=1))
    return out.read_bytes()


def toc_of(blob: bytes) -> tuple[int, dict[str, Any]]:
    """(TOC offset, TOC document) of a blob."""
    footer = read_footer(blob[-FOOTER_SIZE:], len(blob))
    return footer.toc_offset, json.loads(decode_toc_member(blob[footer.toc_offset : len(blob) - footer.size]))


def with_toc(blob: bytes, toc_json: bytes) -> bytes:
    """``blob`` with its TOC member replaced by one holding ``toc_json`` (the footer re-pointed)."""
    footer = read_footer(blob[-FOOTER_SIZE:], len(blob))
    return blob[: footer.toc_offset] + member_of(toc_json) + footer_bytes(footer.toc_offset)
