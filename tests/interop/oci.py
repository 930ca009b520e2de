"""Read images back from the test registry (plain HTTP): manifest, config, and the raw TOC of a layer.

The TOC is fetched the way a lazy puller does it (footer, then the TOC member, by range
requests) and returned as the JSON the producer wrote, names untouched.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

from lazyd.estargz import FOOTER_SIZE, decode_toc_member, parse_footer

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


@dataclass(frozen=True)
class Image:
    """An image in the registry: its manifest and config."""

    ref: str
    digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]

    @property
    def diff_ids(self) -> list[str]:
        return self.config["rootfs"]["diff_ids"]


def _split(ref: str) -> tuple[str, str, str]:
    host, rest = ref.split("/", 1)
    repo, _, tag = rest.rpartition(":")
    if not repo:
        raise ValueError(f"{ref!r}: expected HOST/REPO:TAG")
    return host, repo, tag


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


def read_image(ref: str) -> Image:
    """Manifest and config of ``HOST/REPO:TAG`` (a single-platform image)."""
    host, repo, tag = _split(ref)
    raw = _get(f"http://{host}/v2/{repo}/manifests/{tag}", {"Accept": MANIFEST_TYPES})
    manifest = json.loads(raw)
    if "layers" not in manifest:
        raise ValueError(f"{ref}: not a single image manifest: {manifest.get('mediaType')}")
    config = json.loads(_get(f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}"))
    return Image(ref, "sha256:" + hashlib.sha256(raw).hexdigest(), manifest, config)


def _range(host: str, repo: str, digest: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a blob."""
    return _get(f"http://{host}/v2/{repo}/blobs/{digest}", {"Range": f"bytes={start}-{end - 1}"})


def raw_toc(ref: str, layer: dict[str, Any]) -> bytes:
    """The TOC JSON bytes of an eStargz layer of ``ref`` as its producer wrote them."""
    host, repo, _ = _split(ref)
    size = layer["size"]
    tail = _range(host, repo, layer["digest"], size - FOOTER_SIZE, size)
    toc_offset = parse_footer(tail, size)
    member = _range(host, repo, layer["digest"], toc_offset, size - FOOTER_SIZE)
    return decode_toc_member(member)
