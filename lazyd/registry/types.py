"""Data types the registry client returns: descriptors, resolved images, counters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DigestMismatchError, ManifestError
from .reference import Reference

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
"""The OCI empty descriptor's media type (content ``{}``): the config of an artifact manifest."""

MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
GZIP_LAYER_TYPES = (MEDIA_OCI_LAYER_GZIP, MEDIA_DOCKER_LAYER_GZIP)

ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ANNOTATION_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"


def hasher(digest: str) -> "hashlib._Hash":
    """A hash object for ``digest``'s algorithm (sha256 or sha512)."""
    algo = digest.split(":", 1)[0]
    if algo not in ("sha256", "sha512"):
        raise DigestMismatchError(f"unsupported digest algorithm in {digest}")
    return hashlib.new(algo)


def digest_of(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _check_digest(what: str, data: bytes, digest: str) -> None:
    h = hasher(digest)
    h.update(data)
    if f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
        raise DigestMismatchError(f"{what} does not match its digest {digest}")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Descriptor":
        """Build from a manifest's JSON object; ``where`` names it in errors."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: descriptor is not an object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(digest, str) or ":" not in digest:
            raise ManifestError(f"{where}: descriptor has no valid digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: descriptor {digest} has no valid size")
        if not isinstance(media_type, str):
            raise ManifestError(f"{where}: descriptor {digest} has no mediaType")
        annotations = data.get("annotations") or {}
        urls = data.get("urls") or []
        if not isinstance(annotations, dict) or not isinstance(urls, list):
            raise ManifestError(f"{where}: descriptor {digest} has malformed annotations or urls")
        platform = data.get("platform")
        return cls(media_type, digest, size, {str(k): str(v) for k, v in annotations.items()},
                   [str(u) for u in urls], platform if isinstance(platform, dict) else None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @property
    def toc_digest(self) -> str | None:
        """The eStargz TOC digest annotation, if the layer carries one."""
        return self.annotations.get(ANNOTATION_TOC_DIGEST)


@dataclass(frozen=True)
class Image:
    """A resolved single-platform image: its manifest, config and layers.

    When ``ref`` named an index, ``index_digest``/``index_media_type``/``index_bytes`` are the
    index it was resolved through (so a client storing the image need not fetch it again).
    """

    ref: Reference
    manifest_digest: str
    manifest_media_type: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layers: list[Descriptor]
    config_media_type: str = MEDIA_OCI_CONFIG
    manifest_bytes: bytes = b""
    config_bytes: bytes = b""
    index_digest: str | None = None
    index_media_type: str | None = None
    index_bytes: bytes = b""

    @classmethod
    def from_raw(cls, ref: Reference, manifest_bytes: bytes, media_type: str, digest: str, config_bytes: bytes,
                 index: tuple[bytes, str, str] | None = None) -> Image:
        """Parse a manifest and its config as fetched; ``index`` is (bytes, media type, digest)
        of the index the manifest was picked from.  Every digest is checked against its bytes."""
        _check_digest(f"manifest of {ref.name}", manifest_bytes, digest)
        if index is not None:
            _check_digest(f"index of {ref.name}", index[0], index[2])
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise ManifestError(f"manifest {digest} of {ref.name} is not JSON") from exc
        where = f"manifest {digest} of {ref.name}"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
            raise ManifestError(f"{where} has no layers list")
        config_desc = Descriptor.from_json(manifest.get("config"), f"{where} config")
        layers = [Descriptor.from_json(layer, f"{where} layer {i}") for i, layer in enumerate(manifest["layers"])]
        _check_digest(f"config of {ref.name}", config_bytes, config_desc.digest)
        try:
            config = json.loads(config_bytes)
        except ValueError as exc:
            raise ManifestError(f"config {config_desc.digest} of {ref.name} is not JSON") from exc
        if not isinstance(config, dict):
            raise ManifestError(f"config {config_desc.digest} of {ref.name} is not a JSON object")
        return cls(ref=ref.with_digest(digest) if not ref.digest else ref, manifest_digest=digest,
                   manifest_media_type=media_type, manifest=manifest, config_digest=config_desc.digest,
                   config=config, layers=layers, config_media_type=config_desc.media_type,
                   manifest_bytes=manifest_bytes, config_bytes=config_bytes,
                   index_digest=index[2] if index else None, index_media_type=index[1] if index else None,
                   index_bytes=index[0] if index else b"")

    @property
    def platform(self) -> str:
        """``os/arch[/variant]`` from the config."""
        parts = [str(self.config.get("os", "")), str(self.config.get("architecture", ""))]
        if self.config.get("variant"):
            parts.append(str(self.config["variant"]))
        return "/".join(parts)


@dataclass(frozen=True)
class RegistryStats:
    """Request counters of one client (no URLs, no secrets)."""

    requests: int = 0
    bytes_received: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class ManifestPush:
    """What a manifest push returned: the digest, and the registry's ``OCI-Subject`` header
    (set by registries with the referrers API when the manifest has a ``subject``)."""

    digest: str
    subject: str | None = None
