"""Pull and push against a real anonymous docker-registry on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lazyd.registry import (DigestMismatchError, ManifestError, NotFoundError, RangeNotSupportedError, Reference,
                            RegistryClient, UnreachableError)
from lazyd.registry.types import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Image
from tests.support.procs import free_port
from tests.support.registry import Registry

from .helpers import BB, blob_file, config, run


def ref(reg: Registry, name: str) -> Reference:
    return Reference.parse(f"{reg.host}/{name}")


def test_resolve_oci_and_docker_manifests(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            await c.ping(ref(registry, f"{BB}:v1"))
            oci = await c.resolve(ref(registry, f"{BB}:v2"))
            assert oci.manifest_media_type == MEDIA_OCI_MANIFEST
            assert len(oci.layers) == 2 and oci.platform.startswith("linux/")
            assert oci.config["rootfs"]["type"] == "layers" and len(oci.config["rootfs"]["diff_ids"]) == 2
            assert oci.manifest_digest == "sha256:" + hashlib.sha256(oci.manifest_bytes).hexdigest()
            assert oci.ref.digest == oci.manifest_digest
            docker = await c.resolve(ref(registry, f"{BB}:docker"))
            assert docker.manifest_media_type == MEDIA_DOCKER_MANIFEST
            assert docker.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
            by_digest = await c.resolve(ref(registry, f"{BB}@{oci.manifest_digest}"))
            assert by_digest.manifest == oci.manifest
    run(main())


def test_image_from_raw_checks_every_digest(registry: Registry, tmp_path: Path) -> None:
    """``Image.from_raw`` (how rpull rebuilds an image lazyd resolved) rebuilds the same
    image from the raw bytes and refuses any byte that does not match its digest."""
    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            img = await c.resolve(ref(registry, f"{BB}:v2"))
        r = ref(registry, f"{BB}:v2")
        same = Image.from_raw(r, img.manifest_bytes, img.manifest_media_type, img.manifest_digest, img.config_bytes)
        assert same == img
        with pytest.raises(DigestMismatchError, match="manifest of .* does not match"):
            Image.from_raw(r, img.manifest_bytes + b" ", img.manifest_media_type, img.manifest_digest,
                           img.config_bytes)
        with pytest.raises(DigestMismatchError, match="config of .* does not match"):
            Image.from_raw(r, img.manifest_bytes, img.manifest_media_type, img.manifest_digest,
                           img.config_bytes.replace(b"layers", b"LAYERS"))
        with pytest.raises(DigestMismatchError, match="index of .* does not match"):
            Image.from_raw(r, img.manifest_bytes, img.manifest_media_type, img.manifest_digest, img.config_bytes,
                           (b"{}", MEDIA_OCI_INDEX, img.manifest_digest))
    run(main())


def test_index_platform_selection_and_digest_check(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            img = await c.resolve(ref(registry, f"{BB}:v1"))
            fake = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": img.config_digest, "size": len(img.config_bytes)},
                    "layers": [img.manifest["layers"][0], img.manifest["layers"][0]]}
            fake_bytes = json.dumps(fake).encode()
            fake_digest = await c.put_manifest(ref(registry, f"{BB}:arm"), fake_bytes, MEDIA_OCI_MANIFEST)
            index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": fake_digest, "size": len(fake_bytes),
                 "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": img.manifest_digest, "size": len(img.manifest_bytes),
                 "platform": {"os": "linux", "architecture": "amd64"}}]}
            await c.put_manifest(ref(registry, f"{BB}:multi"), json.dumps(index).encode(), MEDIA_OCI_INDEX)
            arm = await c.resolve(ref(registry, f"{BB}:multi"), platform="linux/arm64")
            assert arm.manifest_digest == fake_digest and len(arm.layers) == 2 and arm.index_digest
            amd = await c.resolve(ref(registry, f"{BB}:multi"), platform="linux/amd64")
            assert amd.manifest_digest == img.manifest_digest
            with pytest.raises(ManifestError, match="platform linux/riscv64"):
                await c.resolve(ref(registry, f"{BB}:multi"), platform="linux/riscv64")
            # A digest reference whose content hashes differently is refused.
            wrong = "sha256:" + "0" * 64
            with pytest.raises((NotFoundError, DigestMismatchError)):
                await c.resolve(ref(registry, f"{BB}@{wrong}"))
    run(main())


def test_blob_size_ranges_and_whole_blob(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            r = ref(registry, f"{BB}:v2")
            img = await c.resolve(r)
            layer = max(img.layers, key=lambda d: d.size)
            data = blob_file(registry, layer.digest).read_bytes()
            assert await c.blob_size(r, layer.digest) == len(data) == layer.size
            before = c.stats.requests
            want = [(0, 1), (5000, 70000), (len(data) - 10, 10), (100, 50), (5000, 70000), (len(data) // 2, 1 << 20)]
            parts = await c.fetch_ranges(r, layer.digest, want)
            assert parts == [data[o : o + n] for o, n in want]
            assert c.stats.requests - before == 1  # one multi-range request for five distinct ranges
            (single,) = await c.fetch_ranges(r, layer.digest, [(7, 3)])
            assert single == data[7:10]
            got = []
            size = await c.fetch_blob(r, layer.digest, tmp_path / "blob", progress=got.append)
            assert size == len(data) and sum(got) == len(data)
            assert (tmp_path / "blob").read_bytes() == data
            with pytest.raises(RangeNotSupportedError, match="past the end|cannot serve"):
                await c.fetch_ranges(r, layer.digest, [(len(data) - 2, 10)])
            with pytest.raises(ValueError, match="invalid range"):
                await c.fetch_ranges(r, layer.digest, [(-1, 10)])
            with pytest.raises(NotFoundError, match="not found in 127.0.0.1"):
                await c.blob_size(r, "sha256:" + "1" * 64)
            with pytest.raises(NotFoundError, match="manifest nope"):
                await c.resolve(ref(registry, f"{BB}:nope"))
            with pytest.raises(NotFoundError):
                await c.resolve(ref(registry, "no/such:repo"))
            assert c.stats.in_flight == 0 and c.stats.bytes_received > len(data)
    run(main())


def test_corrupt_blob_is_a_digest_mismatch(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            r = ref(registry, f"{BB}:v1")
            payload = os.urandom(4096)
            digest = "sha256:" + hashlib.sha256(payload).hexdigest()
            assert await c.push_blob(r, digest, payload) == "uploaded"
            path = blob_file(registry, digest)
            path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
            with pytest.raises(DigestMismatchError, match=digest):
                await c.fetch_blob(r, digest, tmp_path / "out")
            assert not (tmp_path / "out").exists()
    run(main())


def test_push_monolithic_chunked_and_mount(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path, upload_chunk_size=256 * 1024)) as c:
            dst = ref(registry, "pushed/one:latest")
            big = tmp_path / "big"
            big.write_bytes(os.urandom(1024 * 1024 + 17))
            digest = "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()
            assert await c.push_blob(dst, digest, big) == "uploaded"  # 5 PATCH chunks + PUT
            assert await c.push_blob(dst, digest, big) == "exists"
            assert blob_file(registry, digest).read_bytes() == big.read_bytes()
            other = ref(registry, "pushed/two:latest")
            assert await c.push_blob(other, digest, big, mount_from=dst) == "mounted"
            assert await c.blob_size(other, digest) == big.stat().st_size
            third = ref(registry, "pushed/three:latest")
            assert await c.mount_blob(third, digest, dst)
            assert not await c.mount_blob(third, "sha256:" + "3" * 64, dst)  # unknown blob: declined, no error
            assert await c.blob_size(third, digest) == big.stat().st_size
            bad = "sha256:" + "2" * 64
            with pytest.raises(DigestMismatchError):
                await c.push_blob(dst, bad, b"not that")
    run(main())


def test_unreachable_registry_is_typed(tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(config(tmp_path, retries=1)) as c:
            r = Reference.parse(f"127.0.0.1:{free_port()}/x:y")
            with pytest.raises(UnreachableError, match="unreachable"):
                await c.ping(r)
            with pytest.raises(UnreachableError, match=r"127\.0\.0\.1"):
                await c.resolve(r)
    run(main())
