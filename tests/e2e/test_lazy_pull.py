"""Lazy pulls of the debian+python3 eStargz image: lazyctl rpull, ctr-remote rpull and CRI PullImage.

In each case containerd's content store must end up without a single layer blob, and a
container must run from the lazily mounted layers.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.cri.client import CRIImageClient
from tests.e2e.images import manifest_of

from .conftest import HELLO, SNAPSHOTTER, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PRINT = ["python3", "-c", f"print({HELLO!r})"]


def layer_digests(images: Images) -> set[str]:
    _, manifest = manifest_of(images.debian_esgz_layout, "latest")
    return {layer["digest"] for layer in manifest["layers"]}


def test_lazyctl_rpull_downloads_no_layer_and_runs(stack: Stack, images: Images) -> None:
    layers = layer_digests(images)
    result = stack.rpull(images.debian_esgz)
    assert [layer["mode"] for layer in result["layers"]] == ["lazy", "lazy"], result
    assert result["bytes_fetched"] == 0
    assert {layer["digest"] for layer in result["layers"]} == layers
    stored = stack.content_digests()
    assert not layers & stored, "layer blobs were downloaded into containerd's content store"
    assert {result["target_digest"], result["config_digest"]} <= stored
    out = stack.run(images.debian_esgz, "lazy-1", *PRINT)
    assert out.stdout == HELLO + "\n"
    assert not layers & stack.content_digests(), "running the container downloaded layer blobs"


def test_ctr_remote_rpull_downloads_no_layer_and_runs(stack: Stack, images: Images) -> None:
    layers = layer_digests(images)
    subprocess.run(["ctr-remote", "-a", stack.address, "images", "rpull", "--plain-http", "--snapshotter",
                    SNAPSHOTTER, images.debian_esgz], check=True, capture_output=True, timeout=300)
    assert not layers & stack.content_digests(), "ctr-remote rpull downloaded layer blobs"
    out = stack.run(images.debian_esgz, "lazy-remote", *PRINT)
    assert out.stdout == HELLO + "\n"


def test_cri_pull_image_mounts_lazily(cri_stack: Stack, images: Images) -> None:
    layers = layer_digests(images)
    with CRIImageClient(cri_stack.address) as cri:
        image_id = cri.pull(images.debian_esgz)
        status = cri.status(images.debian_esgz)
    assert status is not None and status.id == image_id
    assert images.debian_esgz in status.repo_tags
    assert not layers & cri_stack.content_digests("k8s.io"), "CRI PullImage downloaded layer blobs"
    # The snapshots CRI unpacked are lazyd's remote ones: a container runs from them.
    out = cri_stack.run(images.debian_esgz, "cri-lazy", *PRINT, namespace="k8s.io")
    assert out.stdout == HELLO + "\n"
