"""Hand-made TOC JSON documents (what the eStargz writer would not make), for TOC parsing tests."""

from __future__ import annotations

import json
from typing import Any

D = "sha256:" + "ab" * 32
"""A well-formed digest for entries whose content is never checked."""


def toc_json(*entries: Any, **top: Any) -> bytes:
    """A version 1 TOC document of ``entries``, with ``top`` added to its top-level keys."""
    return json.dumps({"version": 1, "entries": list(entries), **top}).encode()


def reg(name: str, size: int, offset: int, **kw: Any) -> dict[str, Any]:
    """A regular file entry of ``size`` bytes whose member starts at ``offset``; ``kw`` adds or replaces fields."""
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D, "chunkDigest": D, **kw}
