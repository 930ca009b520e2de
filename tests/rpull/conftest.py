"""Fixtures for the rpull tests: a real registry with busybox images and a real containerd.

These tests use containerd's own overlayfs snapshotter, so every layer takes the
fallback path (fetch + diff Apply + Commit); the lazy path is covered in tests/e2e.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.images import convert_layout, reference_builder
from tests.support.containerd import start_containerd
from tests.support.images import build_busybox, push, run
from tests.support.registry import Registry, running_registry


@dataclass(frozen=True)
class Images:
    plain: str      # busybox with deletions, gzip layers
    esgz: str       # the same, eStargz layers
    index: str      # the plain image behind an OCI image index


def _index_layout(src: Path, tag: str, dst: Path) -> str:
    """Copy ``src:tag`` into ``dst`` with an OCI index (one linux/amd64 entry) as its top object."""
    run("cp", "-a", str(src), str(dst))
    index_json = json.loads((dst / "index.json").read_text())
    desc = next(m for m in index_json["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    child = {k: v for k, v in desc.items() if k != "annotations"}
    child["platform"] = {"architecture": "amd64", "os": "linux"}
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [child]}).encode()
    import hashlib

    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    (dst / "blobs/sha256" / digest.split(":")[1]).write_bytes(body)
    index_json["manifests"] = [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
                                "size": len(body), "annotations": {"org.opencontainers.image.ref.name": tag}}]
    (dst / "index.json").write_text(json.dumps(index_json))
    return f"oci:{dst}:{tag}"


@pytest.fixture(scope="package")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("rpull-registry")) as reg:
        yield reg


@pytest.fixture(scope="package")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("rpull-images")
    layout = work / "busybox"
    build_busybox(layout, "latest", with_deletions=True)
    convert_layout(layout, "latest", work / "busybox-esgz", reference_builder)
    index_src = _index_layout(layout, "latest", work / "busybox-index")
    plain = push(f"oci:{layout}:latest", registry.host, "busybox:plain")
    esgz = push(f"oci:{work / 'busybox-esgz'}:latest", registry.host, "busybox:esgz")
    index = f"{registry.host}/busybox:index"
    run("skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", index_src, f"docker://{index}")
    return Images(plain=plain, esgz=esgz, index=index)


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[object]:
    cd = start_containerd(tmp_path / "containerd")
    try:
        yield cd
    finally:
        cd.stop()


NO_LAZYD = "/nonexistent/lazyd.sock"


def lazyctl_rpull(address: str, ref: str, *extra: str, namespace: str = "default",
                  snapshotter: str = "overlayfs", json_out: bool = True,
                  socket: str = NO_LAZYD) -> subprocess.CompletedProcess[str]:
    """``lazyctl rpull``; with the default ``socket`` no lazyd runs, so rpull resolves REF itself."""
    argv = ["lazyctl", "rpull", "--plain-http", "--address", address, "--namespace", namespace,
            "--snapshotter", snapshotter, "--socket", socket, *extra]
    if json_out:
        argv.append("--json")
    return subprocess.run([*argv, ref], capture_output=True, text=True, timeout=300)
