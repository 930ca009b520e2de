"""Layers that cannot be served lazily: a plain (non-eStargz) image, and a registry that goes away.

What happens when the registry of a lazily pulled image is stopped:
* a running container gets EIO for reads of chunks that were never fetched, and only for those;
* a new container fails to start with an error naming the layer and the unreachable registry
  (the snapshotter checks remote layers with lazyd before handing out mounts);
* other images keep working, and when the registry is back the same snapshots work again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.e2e.images import TOC_DIGEST, manifest_of
from tests.support.images import layer_tars, push
from tests.support.registry import Registry, start_registry

from .conftest import HELLO, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_plain_image_falls_back_and_runs(stack: Stack, images: Images) -> None:
    result = stack.rpull(images.busybox_plain)
    assert [layer["mode"] for layer in result["layers"]] == ["full"] * 3, result
    for layer in result["layers"]:
        assert "not eStargz" in layer["reason"]
    assert result["bytes_fetched"] == sum(layer["size"] for layer in result["layers"])
    out = stack.run(images.busybox_plain, "plain-1", "sh", "-c", "cat /etc/hello.txt /data/file.txt")
    assert out.stdout == "hello from lazyd\npayload\n"


def _big_file_sha256(layout: Path, tmp: Path) -> str:
    """sha256 of /data/big.bin as the image's second layer holds it."""
    top = layer_tars(layout, "latest", tmp)[1]
    with tarfile.open(top) as tf:
        member = tf.extractfile("data/big.bin")
        assert member is not None
        return hashlib.sha256(member.read()).hexdigest()


# Without background fetching, the chunks of a file nobody read stay remote (the image has no prefetch landmark).
@pytest.mark.lazyd_config(background_fetch=False)
def test_registry_gone_between_rpull_and_run(stack: Stack, images: Images, tmp_path: Path) -> None:
    reg = start_registry(tmp_path, name="doomed")
    try:
        ref = push(f"oci:{images.busybox_esgz_layout}:latest", reg.host, "busybox:doomed")
        result = stack.rpull(ref)
        assert [layer["mode"] for layer in result["layers"]] == ["lazy"] * 3, result
        stack.ctr("run", "-d", "--snapshotter", "lazyd", ref, "running", "sleep", "600")
        assert stack.ctr("tasks", "exec", "--exec-id", "e0", "running", "cat", "/etc/hello.txt").stdout == \
            "hello from lazyd\n"
        reg.stop()

        # A container that was already running: busybox was read above, the 9 MiB file never was,
        # so its chunks are not cached and reading it fails with EIO (and only that read fails).
        broken = stack.ctr("tasks", "exec", "--exec-id", "e1", "running", "sha256sum", "/data/big.bin", check=False)
        assert broken.returncode != 0
        assert "input/output error" in (broken.stdout + broken.stderr).lower(), broken
        assert stack.ctr("tasks", "exec", "--exec-id", "e2", "running", "cat", "/etc/hello.txt").stdout == \
            "hello from lazyd\n"

        # A new container: the snapshotter checks the layers with lazyd and refuses to hand out
        # mounts that cannot be served, naming the layer and the unreachable registry.
        refused = stack.run(ref, "doomed-1", "true", check=False)
        assert refused.returncode != 0
        message = refused.stdout + refused.stderr
        assert "unreachable" in message and reg.host in message, message
        assert any(layer["digest"] in message for layer in result["layers"]), message

        # Nothing else broke: lazyd answers, another lazily pulled image and a plain one still run.
        stack.status()
        stack.rpull(images.debian_esgz)
        assert stack.run(images.debian_esgz, "alive-1", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"
        stack.rpull(images.busybox_plain)
        assert stack.run(images.busybox_plain, "alive-2", "cat", "/etc/hello.txt").stdout == "hello from lazyd\n"

        # The registry comes back at the same address: the same snapshots read correctly again.
        reg = start_registry(tmp_path, name="doomed", port=reg.port, storage_root=reg.root)
        expected = _big_file_sha256(images.busybox_layout, tmp_path / "tars")
        healed = stack.ctr("tasks", "exec", "--exec-id", "e3", "running", "sha256sum", "/data/big.bin")
        assert healed.stdout.split()[0] == expected
        assert stack.run(ref, "doomed-2", "sha256sum", "/data/big.bin").stdout.split()[0] == expected
    finally:
        reg.stop()


def test_estargz_layers_have_toc_annotations(images: Images) -> None:
    """Guard for the fixtures above: the eStargz image really is eStargz (so 'lazy' above means lazy)."""
    _, manifest = manifest_of(images.busybox_esgz_layout, "latest")
    for layer in manifest["layers"]:
        assert layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"].startswith("sha256:")


def _with_wrong_toc_digest(src: Path, dst: Path) -> str:
    """A copy of the eStargz layout whose top layer's TOC digest annotation is wrong."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "index.json").read_text())
    old = index["manifests"][0]["digest"]
    manifest = json.loads((dst / "blobs/sha256" / old.split(":")[1]).read_text())
    manifest["layers"][-1]["annotations"][TOC_DIGEST] = "sha256:" + hashlib.sha256(b"not the toc").hexdigest()
    body = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    (dst / "blobs/sha256" / digest.split(":")[1]).write_bytes(body)
    index["manifests"][0].update(digest=digest, size=len(body))
    (dst / "index.json").write_text(json.dumps(index))
    return f"oci:{dst}:latest"


def test_wrong_toc_digest_falls_back_with_lazyds_reason(stack: Stack, images: Images, registry: Registry,
                                                         tmp_path: Path) -> None:
    ref = push(_with_wrong_toc_digest(images.busybox_esgz_layout, tmp_path / "bad-toc"), registry.host,
               "busybox:bad-toc")
    result = stack.rpull(ref)
    assert [layer["mode"] for layer in result["layers"]] == ["lazy", "lazy", "full"], result
    reason = result["layers"][-1]["reason"]
    assert reason.startswith("snapshotter 'lazyd' did not mount it lazily: "), reason
    assert "digest" in reason.lower(), reason
    assert result["bytes_fetched"] == result["layers"][-1]["size"]
    fallbacks = stack.status()["fallbacks"]
    assert [f["layer_digest"] for f in fallbacks] == [result["layers"][-1]["digest"]]
    out = stack.run(ref, "bad-toc", "sh", "-c", "cat /etc/hello.txt; ls /var/log")
    assert out.stdout == "hello from lazyd\nfresh.log\n"
