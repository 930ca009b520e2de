"""A prefetch profile as an OCI artifact that refers to its image (docs/profiles.md).

The artifact is an OCI image manifest::

    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.lazyd.profile.v1+jsonl",
     "config": <the OCI empty descriptor: application/vnd.oci.empty.v1+json, "{}">,
     "layers": [{"mediaType": "application/vnd.lazyd.profile.v1+jsonl", "digest": <records blob>, "size": …}],
     "subject": <descriptor of the image's platform manifest>,
     "annotations": {"org.opencontainers.image.created": "2026-12-03T12:00:00Z"}}

and the records blob is the reference's JSON lines (lazyd.profile.records).  ``push`` uploads
the blobs and the manifest (by digest); a registry with the referrers API answers with an
``OCI-Subject`` header, otherwise the referrers tag schema is kept up to date: the tag
``sha256-<hex of the subject digest>`` holds an OCI index listing the referrers.  ``pull`` asks
``GET /v2/<name>/referrers/<digest>?artifactType=…`` and reads that tag at the same time (the tag
counts only when the API answers 404), picks the newest lazyd profile, and fetches and verifies
it (digests, sizes, records).

Round trips.  A profile is looked up while a pull runs, so every round trip can delay a
container's start.  Small content is therefore also embedded with the OCI descriptor ``data``
field (image-spec v1.1, base64): the records in the manifest's layer descriptor, and the whole
manifest in the fallback tag's index entry.  On a registry without the referrers API the profile
then comes in one round trip (the tag), with it in two (the API's answer names the manifest,
whose layer carries the records).  Embedded content is verified against its descriptor's digest
and size like fetched content; a reader that ignores ``data`` fetches as usual.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from lazyd.profile.store import MAX_PROFILE_BYTES, ProfileStoreError, validate
from lazyd.registry import Descriptor, ManifestError, NotFoundError, Reference, RegistryClient
from lazyd.registry.types import MEDIA_OCI_EMPTY, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MANIFEST_TYPES, digest_of

ARTIFACT_TYPE = "application/vnd.lazyd.profile.v1+jsonl"
"""``artifactType`` of a lazyd profile manifest, and the media type of its one layer (the records)."""
ANNOTATION_CREATED = "org.opencontainers.image.created"
EMPTY_BYTES = b"{}"
EMPTY = Descriptor(MEDIA_OCI_EMPTY, digest_of(EMPTY_BYTES), len(EMPTY_BYTES))
MAX_ARTIFACT_MANIFEST = 64 * 1024
"""Largest profile manifest accepted (ours are under 1 KiB)."""
MAX_REFERRERS_INDEX = 4 * 1024 * 1024
"""Largest referrers index read (the API's answer or the fallback tag's index)."""
MAX_EMBEDDED = 16 * 1024
"""Content up to this size is also embedded in its descriptor's ``data`` (base64): the records
blob in the manifest, and the manifest in the fallback tag's index entry."""


class ArtifactError(Exception):
    """A profile artifact that is malformed, damaged or does not match its image (the message says which)."""


class ProfileNotFoundError(ArtifactError):
    """The registry holds no lazyd profile for the image."""


@dataclass(frozen=True)
class ProfileArtifact:
    """An encoded profile artifact: its manifest and the records blob it refers to."""

    manifest: bytes
    digest: str
    blob: bytes
    blob_digest: str
    subject: Descriptor
    created: str

    def descriptor(self) -> dict[str, Any]:
        """Its entry in a referrers index (with ``artifactType`` and annotations, as the spec asks;
        the manifest itself as ``data`` when it is small)."""
        entry: dict[str, Any] = {"mediaType": MEDIA_OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest),
                                 "artifactType": ARTIFACT_TYPE, "annotations": {ANNOTATION_CREATED: self.created}}
        if len(self.manifest) <= MAX_EMBEDDED:
            entry["data"] = base64.b64encode(self.manifest).decode()
        return entry


@dataclass(frozen=True)
class PushResult:
    """Where ``push`` put a profile: the artifact digest and how its referrer is listed."""

    digest: str
    subject: str
    method: str  # "referrers-api" or "referrers-tag"
    tag: str | None = None


@dataclass(frozen=True)
class PulledProfile:
    """A profile fetched from the registry and verified."""

    manifest_digest: str
    data: bytes
    records: int
    artifact_digest: str
    created: str
    method: str  # "referrers-api" or "referrers-tag"


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def encode(records_blob: bytes, subject: Descriptor, created: str | None = None) -> ProfileArtifact:
    """The artifact manifest for ``records_blob`` (validated first) referring to ``subject``."""
    try:
        validate(subject.digest, records_blob, f"profile for {subject.digest}")
    except ProfileStoreError as exc:
        raise ArtifactError(str(exc)) from None
    created = created or now_rfc3339()
    blob_digest = digest_of(records_blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY.to_json(),
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": blob_digest, "size": len(records_blob),
                    **({"data": base64.b64encode(records_blob).decode()}
                       if len(records_blob) <= MAX_EMBEDDED else {})}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANNOTATION_CREATED: created},
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    return ProfileArtifact(body, digest_of(body), records_blob, blob_digest, subject, created)


def embedded(raw: dict[str, Any], desc: Descriptor, where: str) -> bytes | None:
    """The content a descriptor embeds in ``data``, verified against its digest and size; None
    when it embeds none.  ArtifactError naming ``where`` when ``data`` is not that content."""
    data = raw.get("data")
    if data is None:
        return None
    if not isinstance(data, str) or len(data) > 4 * ((MAX_EMBEDDED + 2) // 3):
        raise ArtifactError(f"{where}: embedded data of {desc.digest} is not a base64 string of at most "
                            f"{MAX_EMBEDDED} bytes")
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ArtifactError(f"{where}: embedded data of {desc.digest} is not valid base64") from None
    if len(content) != desc.size or digest_of(content) != desc.digest:
        raise ArtifactError(f"{where}: embedded data does not match its descriptor {desc.digest} "
                            f"({len(content)} bytes, digest {digest_of(content)})")
    return content


def decode_manifest(body: bytes, subject_digest: str, where: str) -> tuple[Descriptor, str, bytes | None]:
    """The records blob descriptor, creation time and embedded records (or None) of a profile
    manifest; ArtifactError naming ``where`` when it is not a lazyd profile of ``subject_digest``,
    is over the bounds, or embeds records that do not match."""
    if len(body) > MAX_ARTIFACT_MANIFEST:
        raise ArtifactError(f"{where}: manifest of {len(body)} bytes, more than {MAX_ARTIFACT_MANIFEST}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise ArtifactError(f"{where}: manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != MEDIA_OCI_MANIFEST:
        raise ArtifactError(f"{where}: not an OCI image manifest")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise ArtifactError(f"{where}: artifactType is {doc.get('artifactType')!r}, not {ARTIFACT_TYPE}")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        got = subject.get("digest") if isinstance(subject, dict) else None
        raise ArtifactError(f"{where}: subject is {got!r}, not the image manifest {subject_digest}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        raise ArtifactError(f"{where}: expected exactly one layer (the records), got "
                            f"{len(layers) if isinstance(layers, list) else 'none'}")
    try:
        layer = Descriptor.from_json(layers[0], f"{where} layer 0")
    except ManifestError as exc:
        raise ArtifactError(str(exc)) from None
    if layer.media_type != ARTIFACT_TYPE:
        raise ArtifactError(f"{where}: layer media type is {layer.media_type!r}, not {ARTIFACT_TYPE}")
    if layer.size > MAX_PROFILE_BYTES:
        raise ArtifactError(f"{where}: records blob of {layer.size} bytes, more than {MAX_PROFILE_BYTES}")
    annotations = doc.get("annotations")
    created = annotations.get(ANNOTATION_CREATED, "") if isinstance(annotations, dict) else ""
    return layer, str(created), embedded(layers[0], layer, f"{where} layer 0")


def referrers_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag for ``subject_digest``: ``<alg>-<hex>``."""
    algo, _, hexpart = subject_digest.partition(":")
    return f"{algo}-{hexpart}"[:128]


def _index_doc(body: bytes | None, where: str) -> dict[str, Any]:
    if body is None:
        return {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
    try:
        doc = json.loads(body)
    except ValueError:
        raise ArtifactError(f"{where}: not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ArtifactError(f"{where}: not an image index (no 'manifests' list)")
    return doc


def add_referrer(index: bytes | None, entry: dict[str, Any], where: str = "referrers index") -> bytes:
    """``index`` (an OCI index, or None for a new one) with ``entry`` added (an older entry of the
    same digest is replaced; older lazyd profiles lose their embedded ``data``, so the index stays
    small); other entries are kept as they were."""
    doc = _index_doc(index, where)
    doc["manifests"] = [m for m in doc["manifests"] if not (isinstance(m, dict) and m.get("digest") == entry["digest"])]
    for m in doc["manifests"]:
        if isinstance(m, dict) and m.get("artifactType") == ARTIFACT_TYPE:
            m.pop("data", None)
    doc["manifests"].append(entry)
    doc.setdefault("schemaVersion", 2)
    doc["mediaType"] = MEDIA_OCI_INDEX
    return json.dumps(doc, separators=(",", ":")).encode()


def newest_profile(index: bytes, where: str) -> tuple[Descriptor, bytes | None] | None:
    """The newest lazyd profile listed in a referrers index (by creation annotation, then
    position), with the manifest its entry embeds (verified), if any."""
    return _newest(_index_doc(index, where), where)


def _newest(doc: dict[str, Any], where: str) -> tuple[Descriptor, bytes | None] | None:
    """``newest_profile`` of an index already parsed and checked (``_index_doc``)."""
    best: tuple[str, int, Descriptor, dict[str, Any]] | None = None
    for i, m in enumerate(doc["manifests"]):
        if not isinstance(m, dict) or m.get("artifactType") != ARTIFACT_TYPE:
            continue
        try:
            desc = Descriptor.from_json(m, f"{where} entry {i}")
        except ManifestError as exc:
            raise ArtifactError(str(exc)) from None
        if desc.media_type not in MANIFEST_TYPES:
            continue
        key = (desc.annotations.get(ANNOTATION_CREATED, ""), i, desc, m)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return None
    return best[2], embedded(best[3], best[2], f"{where} entry {best[1]}")


async def subject_of(client: RegistryClient, ref: Reference) -> Descriptor:
    """The descriptor of ``ref``'s platform manifest (the one records name)."""
    image = await client.resolve(ref)
    return Descriptor(image.manifest_media_type, image.manifest_digest, len(image.manifest_bytes))


async def push(client: RegistryClient, ref: Reference, records_blob: bytes, subject: Descriptor,
               created: str | None = None) -> PushResult:
    """Publish ``records_blob`` as a profile artifact referring to ``subject`` in ``ref``'s repository."""
    art = encode(records_blob, subject, created)
    repo = Reference(ref.registry, ref.repository)
    await client.push_blob(repo, EMPTY.digest, EMPTY_BYTES)
    await client.push_blob(repo, art.blob_digest, art.blob)
    pushed = await client.push_manifest(repo, art.manifest, MEDIA_OCI_MANIFEST)
    if pushed.subject == subject.digest:
        return PushResult(art.digest, subject.digest, "referrers-api")
    tag = referrers_tag(subject.digest)
    try:
        current, _, _ = await client.get_manifest(repo.with_tag(tag))
    except NotFoundError:
        current = None
    index = add_referrer(current, art.descriptor(), f"referrers tag {tag} of {ref.name}")
    await client.push_manifest(repo, index, MEDIA_OCI_INDEX, tag=tag)
    return PushResult(art.digest, subject.digest, "referrers-tag", tag)


async def pull(client: RegistryClient, ref: Reference, manifest_digest: str) -> PulledProfile:
    """The newest lazyd profile for image manifest ``manifest_digest`` in ``ref``'s repository,
    verified; ProfileNotFoundError when there is none, ArtifactError when it is damaged."""
    repo = Reference(ref.registry, ref.repository)
    tag = referrers_tag(manifest_digest)

    async def tagged() -> bytes | None:
        try:
            body, _, _ = await client.get_manifest(repo.with_tag(tag))
        except NotFoundError:
            return None
        return body

    # Both at once: the tag's answer is used only when the registry has no referrers API.
    api, by_tag = await asyncio.gather(client.referrers(repo, manifest_digest, ARTIFACT_TYPE, MAX_REFERRERS_INDEX),
                                       tagged(), return_exceptions=True)
    if isinstance(api, BaseException):
        raise api
    index, method, where = api, "referrers-api", f"referrers of {manifest_digest} in {ref.name}"
    if index is None:
        if isinstance(by_tag, BaseException):
            raise by_tag
        if by_tag is None:
            raise ProfileNotFoundError(f"no profile for {manifest_digest} in {ref.name} (no referrers API, "
                                       f"no tag {tag})")
        method, where = "referrers-tag", f"referrers tag {tag} of {ref.name}"
        index = _index_doc(by_tag, where)
    found = _newest(index, where)  # the client parsed and checked the referrers API's answer
    if found is None:
        raise ProfileNotFoundError(f"no profile for {manifest_digest} in {ref.name} ({where} lists none)")
    entry, body = found
    art = f"profile {entry.digest} in {ref.name}"
    if entry.size > MAX_ARTIFACT_MANIFEST:
        raise ArtifactError(f"{art}: manifest of {entry.size} bytes, more than {MAX_ARTIFACT_MANIFEST}")
    if body is None:
        body, _, _ = await client.get_manifest(repo, entry.digest)  # digest verified by the client
    if len(body) != entry.size:
        raise ArtifactError(f"{art}: manifest is {len(body)} bytes, the referrers index says {entry.size}")
    layer, created, data = decode_manifest(body, manifest_digest, art)
    if data is None:
        data = await client.fetch_bytes(repo, layer.digest, max_size=layer.size)  # digest verified by the client
    if len(data) != layer.size:
        raise ArtifactError(f"{art}: records blob is {len(data)} bytes, the manifest says {layer.size}")
    try:
        records = validate(manifest_digest, data, f"{art} records {layer.digest}")
    except ProfileStoreError as exc:
        raise ArtifactError(str(exc)) from None
    return PulledProfile(manifest_digest, data, len(records), entry.digest, created, method)
