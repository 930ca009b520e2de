"""Label names and helpers shared with containerd and stargz-snapshotter (same strings as theirs)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

# containerd garbage-collection references (images/mediatypes.go ChildGCLabels)
GC_REF_CONFIG = "containerd.io/gc.ref.content.config"
GC_REF_MANIFEST_PREFIX = "containerd.io/gc.ref.content.m."
GC_REF_LAYER_PREFIX = "containerd.io/gc.ref.content.l."
GC_REF_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."
UNCOMPRESSED = "containerd.io/uncompressed"

# snapshot labels (containerd unpacker + stargz-snapshotter fs/source)
SNAPSHOT_REF = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
STARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
REMOTE_URLS = "containerd.io/snapshot/remote/urls"
REMOTE_SNAPSHOT = "containerd.io/snapshot/remote"

LABEL_MAX = 4096  # containerd labels.Validate: len(key) + len(value) <= 4096

LAYER_MEDIA_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")


def is_layer(media_type: str) -> bool:
    """containerd's images.IsLayerType."""
    return media_type.startswith(LAYER_MEDIA_PREFIXES)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain ID of every prefix of ``diff_ids`` (identity.ChainIDs)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def distribution_source(registry: str, repository: str, existing: str = "") -> tuple[str, str]:
    """The ``containerd.io/distribution.source.<host>`` label (host without port, as containerd's url.Hostname())."""
    host = registry
    if host.startswith("["):
        host = host[1:host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    repos = sorted({r for r in existing.split(",") if r} | {repository})
    return DISTRIBUTION_SOURCE_PREFIX + host, ",".join(repos)


def joined_within_limit(key: str, values: Sequence[str]) -> str:
    """Comma-join ``values`` while the label stays within containerd's size limit (later ones are dropped)."""
    out = ""
    for v in values:
        candidate = f"{out}{v},"
        if len(key) + len(candidate.rstrip(",")) > LABEL_MAX:
            break
        out = candidate
    return out.rstrip(",")


def remote_snapshot_labels(
    ref: str,
    chain_id: str,
    layer_digest: str,
    layer_annotations: Mapping[str, str],
    later_layer_digests: Sequence[str],
    urls: Sequence[str],
) -> dict[str, str]:
    """Prepare labels for one layer, as ctr-remote's rpull sends them.

    ``later_layer_digests`` are this layer's digest and those above it in the manifest.
    Descriptor annotations prefixed ``containerd.io/snapshot/`` (the TOC digest) are
    inherited, as containerd's unpacker does.
    """
    labels = {k: v for k, v in layer_annotations.items() if k.startswith(INHERITED_PREFIX)}
    labels[STARGZ_REFERENCE] = ref
    labels[STARGZ_DIGEST] = layer_digest
    labels[STARGZ_LAYERS] = joined_within_limit(STARGZ_LAYERS, later_layer_digests)
    labels[REMOTE_URLS] = joined_within_limit(REMOTE_URLS, urls)
    labels[SNAPSHOT_REF] = chain_id
    return labels
