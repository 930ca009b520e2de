"""``lazyctl rpull`` against a real containerd 1.6 and a real registry (overlayfs snapshotter: fallback path).

The labels rpull writes are compared with what containerd's own ``ctr images pull`` and
stargz-snapshotter's ``ctr-remote images rpull`` write for the same image.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lazyd.api.messages import ApiError
from lazyd.containerd import labels as L
from lazyd.containerd.client import ContainerdClient
from lazyd.containerd.errors import NotFoundError
from tests.support.lazyd import start_lazyd

from .conftest import Images, lazyctl_rpull

pytestmark = pytest.mark.timeout(300)

ContentLabels = dict[str, dict[str, str]]


def ctr(cd: Any, *args: str, namespace: str = "default", check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ctr", "-a", cd.address, "-n", namespace, *args], capture_output=True, text=True,
                          timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def content_labels(address: str, namespace: str) -> ContentLabels:
    """digest -> labels of every blob in a namespace's content store."""

    async def go() -> ContentLabels:
        async with ContainerdClient(address, namespace) as client:
            return {i.digest: i.labels for i in await client.content_list()}

    return asyncio.run(go())


def snapshot_labels(address: str, namespace: str, snapshotter: str, key: str) -> dict[str, str]:
    async def go() -> dict[str, str]:
        async with ContainerdClient(address, namespace) as client:
            return (await client.stat(snapshotter, key)).labels

    return asyncio.run(go())


def rpull_json(cd: Any, ref: str, **kw: Any) -> dict[str, Any]:
    proc = lazyctl_rpull(cd.address, ref, **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_rpull_plain_image_falls_back_and_runs(containerd: Any, images: Images) -> None:
    result = rpull_json(containerd, images.plain)
    assert [layer["mode"] for layer in result["layers"]] == ["full", "full"]
    for layer in result["layers"]:
        assert layer["reason"].startswith("not eStargz"), layer
    assert result["bytes_fetched"] == sum(layer["size"] for layer in result["layers"])
    out = ctr(containerd, "run", "--rm", "--snapshotter", "overlayfs", images.plain, "t1",
              "sh", "-c", "cat /etc/hello.txt; ls /var/log; test -e /etc/group || echo group-gone").stdout
    assert out.split() == ["hello", "from", "lazyd", "new.log", "group-gone"]
    # The lease is gone, and what the image needs is still referenced (a gc keeps it).
    assert ctr(containerd, "leases", "ls", "-q").stdout.strip() == ""
    ctr(containerd, "content", "prune", "references", check=False)
    assert ctr(containerd, "run", "--rm", "--snapshotter", "overlayfs", images.plain, "t2",
               "cat", "/etc/hello.txt").stdout == "hello from lazyd\n"


def test_rpull_writes_the_labels_ctr_pull_writes(containerd: Any, images: Images) -> None:
    ctr(containerd, "images", "pull", "--plain-http", images.index, namespace="ctr")
    result = rpull_json(containerd, images.index, namespace="lazyctl")
    ours, theirs = content_labels(containerd.address, "lazyctl"), content_labels(containerd.address, "ctr")
    assert ours.keys() == theirs.keys()
    for digest, labels in theirs.items():
        assert ours[digest] == labels, f"labels of {digest} differ"
    # The image record points at the index, like ctr's.
    ctr_img = ctr(containerd, "images", "ls", namespace="ctr").stdout.split("\n")[1].split()
    our_img = ctr(containerd, "images", "ls", namespace="lazyctl").stdout.split("\n")[1].split()
    assert our_img[:3] == ctr_img[:3] == [images.index, "application/vnd.oci.image.index.v1+json",
                                          result["target_digest"]]
    assert any(k.startswith(L.GC_REF_MANIFEST_PREFIX) for k in ours[result["target_digest"]])
    assert ours[result["config_digest"]][L.GC_REF_SNAPSHOT_PREFIX + "overlayfs"] == result["chain_id"]


def test_rpull_sends_the_snapshot_labels_ctr_remote_sends(containerd: Any, images: Images) -> None:
    subprocess.run(["ctr-remote", "-a", containerd.address, "-n", "remote", "images", "rpull", "--plain-http",
                    "--snapshotter", "overlayfs", images.esgz], check=True, capture_output=True, timeout=180)
    result = rpull_json(containerd, images.esgz, namespace="lazyctl")
    ignored = ("containerd.io/snapshot/remote/stargz.prefetch", "containerd.io/snapshot/remote/urls.")
    for layer in result["layers"]:
        assert layer["mode"] == "full" and "did not mount it lazily" in layer["reason"]
        theirs = snapshot_labels(containerd.address, "remote", "overlayfs", layer["chain_id"])
        ours = snapshot_labels(containerd.address, "lazyctl", "overlayfs", layer["chain_id"])
        theirs = {k: v for k, v in theirs.items() if not k.startswith(ignored) and not k.startswith("containerd.io/gc.")}
        ours = {k: v for k, v in ours.items() if not k.startswith("containerd.io/gc.")}
        # ctr-remote names the image as typed; we name it canonically with the manifest digest pinned.
        assert ours.pop(L.STARGZ_REFERENCE) == f"{images.esgz}@{result['manifest_digest']}"
        assert theirs.pop(L.STARGZ_REFERENCE) == images.esgz
        assert ours == theirs
        assert ours[L.STARGZ_TOC_DIGEST].startswith("sha256:")


def test_rpull_again_reuses_snapshots(containerd: Any, images: Images) -> None:
    first = rpull_json(containerd, images.esgz)
    assert first["resolved_by"] == "registry"  # no lazyd: rpull asked the registry itself
    second = rpull_json(containerd, images.esgz)
    assert [layer["mode"] for layer in second["layers"]] == ["present", "present"]
    assert second["bytes_fetched"] == 0
    assert second["chain_id"] == first["chain_id"]


def test_rpull_resolves_through_lazyd(containerd: Any, images: Images, tmp_path: Path) -> None:
    """With lazyd running, REF (here an index) is resolved by lazyd's ``resolve`` op; the
    image is stored exactly as when rpull asks the registry itself."""
    daemon = start_lazyd(tmp_path / "lazyd", tmp_path / "lazyd.sock", tmp_path / "lazyd.log")
    try:
        with daemon.client() as c:
            before = c.status().totals.registry_requests
            via_lazyd = rpull_json(containerd, images.index, socket=str(daemon.socket))
            assert via_lazyd["resolved_by"] == "lazyd"
            assert via_lazyd["pulled_by"] == "lazyd"  # the ``pull`` op: lazyd fetched and applied the layers
            assert [layer["mode"] for layer in via_lazyd["layers"]] == ["full", "full"]
            assert c.status().totals.registry_requests >= before + 3  # index, manifest, config
        direct = rpull_json(containerd, images.index, namespace="direct")
        assert direct["resolved_by"] == "registry" and direct["pulled_by"] == "lazyctl"
        for key in ("target_digest", "manifest_digest", "config_digest", "chain_id"):
            assert via_lazyd[key] == direct[key], key
        assert content_labels(containerd.address, "default") == content_labels(containerd.address, "direct")
        ref = images.plain.rsplit(":", 1)[0] + ":no-such-tag"
        proc = lazyctl_rpull(containerd.address, ref, socket=str(daemon.socket))
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"error: rpull {ref}: lazyd could not resolve") and "no-such-tag" in proc.stderr
    finally:
        daemon.close(unmount=tmp_path)


def test_rpull_human_output(containerd: Any, images: Images) -> None:
    proc = lazyctl_rpull(containerd.address, images.plain, json_out=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["#", "LAYER", "SIZE", "MODE", "TIME", "WHY", "IN", "FULL"]
    assert lines[-1].startswith(f"pulled {images.plain} (sha256:") and "0 lazy, 2 in full" in lines[-1]
    assert proc.stderr.count("pulled in full: not eStargz") == 2


def test_rpull_unknown_image_is_a_clear_error(containerd: Any, images: Images) -> None:
    ref = images.plain.rsplit(":", 1)[0] + ":no-such-tag"
    proc = lazyctl_rpull(containerd.address, ref)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: rpull {ref}:") and "no-such-tag" in proc.stderr
    assert ctr(containerd, "images", "ls", "-q").stdout.strip() == ""
    assert ctr(containerd, "leases", "ls", "-q").stdout.strip() == ""


def test_rpull_without_containerd_is_a_clear_error(tmp_path: Any, images: Images) -> None:
    sock = tmp_path / "nothing.sock"
    proc = lazyctl_rpull(str(sock), images.plain)
    assert proc.returncode == 1
    assert str(sock) in proc.stderr and "Traceback" not in proc.stderr


def test_layers_label_respects_containerd_size_limit() -> None:
    digests = [f"sha256:{i:064x}" for i in range(100)]
    labels = L.remote_snapshot_labels("r/x:1", "sha256:" + "c" * 64, digests[0], {}, digests, [])
    value = labels[L.STARGZ_LAYERS]
    assert len(L.STARGZ_LAYERS) + len(value) <= L.LABEL_MAX
    kept = value.split(",")
    assert kept == digests[: len(kept)] and 50 < len(kept) < 100


def test_chain_ids_match_containerd(containerd: Any, images: Images) -> None:
    """chain_ids() against the snapshots containerd's own unpacker committed."""
    ctr(containerd, "images", "pull", "--plain-http", images.plain)
    config = json.loads(ctr(containerd, "content", "get", _config_digest(containerd, images.plain)).stdout)
    chain = L.chain_ids(config["rootfs"]["diff_ids"])
    for key in chain:
        snapshot_labels(containerd.address, "default", "overlayfs", key)  # raises NotFoundError if absent
    with pytest.raises(NotFoundError):
        snapshot_labels(containerd.address, "default", "overlayfs", "sha256:" + "0" * 64)


def _config_digest(cd: Any, ref: str) -> str:
    target = ctr(cd, "images", "ls").stdout.split("\n")[1].split()[2]
    manifest = json.loads(ctr(cd, "content", "get", target).stdout)
    return manifest["config"]["digest"]


def test_rpull_through_lazyd_imports_no_grpc(containerd: Any, images: Images, tmp_path: Path) -> None:
    """With lazyd running, rpull is a thin client: no gRPC, protobuf, asyncio or HTTP client is imported,
    nor what only other commands need."""
    daemon = start_lazyd(tmp_path / "lazyd", tmp_path / "lazyd.sock", tmp_path / "lazyd.log")
    try:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lazyd.cli.lazyctl", "rpull", "--plain-http",
                               "--json", "--address", containerd.address, "--snapshotter", "overlayfs",
                               "--socket", str(daemon.socket), images.esgz],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["pulled_by"] == "lazyd"
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "msgpack" in imported and "lazyd.api.wire" in imported
        for heavy in ("grpc", "google.protobuf", "asyncio", "aiohttp", "lazyd.api.messages", "lazyd.containerd.client",
                      # 10-15 ms of every start between them (each command module is imported to build
                      # the parser: what a command needs only when it runs is imported then)
                      "dataclasses", "pathlib", "shutil"):
            assert heavy not in imported, f"lazyctl rpull imported {heavy}"
    finally:
        daemon.close(unmount=tmp_path)


def test_pull_op_rejects_bad_requests(containerd: Any, images: Images, tmp_path: Path) -> None:
    """The ``pull`` and ``pull_progress`` ops name the field or the object that was wrong."""
    daemon = start_lazyd(tmp_path / "lazyd", tmp_path / "lazyd.sock", tmp_path / "lazyd.log")
    try:
        with daemon.client() as c:
            good = {"ref": images.plain, "address": containerd.address, "namespace": "default",
                    "snapshotter": "overlayfs", "plain_http": True}
            for bad, field in ((dict(good, address="relative.sock"), "address"),
                               (dict(good, namespace="no spaces"), "namespace"),
                               (dict(good, ref="UPPER/case:x"), "ref"),
                               ({k: v for k, v in good.items() if k != "snapshotter"}, "snapshotter")):
                with pytest.raises(ApiError) as err:
                    c.call("pull", bad)
                assert err.value.code == "invalid_request" and field in err.value.message
            with pytest.raises(ApiError) as err:
                c.call("pull", dict(good, address=str(tmp_path / "no-containerd.sock")))
            assert err.value.code == "unavailable" and "no-containerd.sock" in err.value.message
            with pytest.raises(ApiError) as err:
                c.call("pull", dict(good, snapshotter="no-such-snapshotter"))
            assert "no-such-snapshotter" in err.value.message
            with pytest.raises(ApiError) as err:
                c.call("pull_progress", {"pull_id": "nothing-running"})
            assert err.value.code == "not_found"
        assert ctr(containerd, "images", "ls", "-q").stdout.strip() == ""
        assert ctr(containerd, "leases", "ls", "-q").stdout.strip() == ""
    finally:
        daemon.close(unmount=tmp_path)


def test_rpull_through_lazyd_shows_progress_on_a_terminal(containerd: Any, images: Images, tmp_path: Path) -> None:
    """On a terminal rpull polls ``pull_progress`` and draws a bar; the result is the same."""
    daemon = start_lazyd(tmp_path / "lazyd", tmp_path / "lazyd.sock", tmp_path / "lazyd.log")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(["lazyctl", "rpull", "--plain-http", "--address", containerd.address,
                               "--snapshotter", "overlayfs", "--socket", str(daemon.socket), images.plain],
                              stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300)
        os.close(slave)
        slave = -1
        err = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        assert proc.returncode == 0, err.decode(errors="replace")
        assert "0 lazy, 2 in full" in proc.stdout.splitlines()[-1]
        text = err.decode(errors="replace")
        assert "pulled in full: not eStargz" in text
        assert "it/s" in text or "B/s" in text or "layer" in text, text  # tqdm drew the bar
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
        daemon.close(unmount=tmp_path)
