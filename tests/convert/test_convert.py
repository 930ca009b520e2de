"""``lazyctl image convert`` against a real registry, checked with the reference eStargz tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazyd.registry import Reference, RegistryClient
from lazyd.registry.types import (ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE, MEDIA_OCI_INDEX,
                                  MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_MANIFEST)
from tests.registry.helpers import BB, blob_file, config, run
from tests.support.registry import Registry

from .helpers import diff_id_of, dump_toc, estargz_verify, lazyctl, lazyctl_on_tty


async def _resolve(tmp_path: Path, text: str, platform: str | None = None):  # type: ignore[no-untyped-def]
    async with RegistryClient(config(tmp_path)) as c:
        return await c.resolve(Reference.parse(text), platform=platform)


def check_converted(tmp_path: Path, reg: Registry, ref: str, platform: str | None = None) -> list[str]:
    """Every layer is gzip eStargz with both annotations, passes estargz-verify, and matches diff_ids."""
    img = run(_resolve(tmp_path, ref, platform))
    assert img.manifest_media_type == MEDIA_OCI_MANIFEST
    diff_ids = img.config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(img.layers)
    for layer, diff_id in zip(img.layers, diff_ids):
        assert layer.media_type == MEDIA_OCI_LAYER_GZIP
        toc = layer.annotations[ANNOTATION_TOC_DIGEST]
        blob = blob_file(reg, layer.digest)
        estargz_verify(blob, toc)
        actual_diff, size = diff_id_of(blob)
        assert actual_diff == diff_id
        assert int(layer.annotations[ANNOTATION_UNCOMPRESSED_SIZE]) == size
    return [d.digest for d in img.layers]


def test_convert_busybox_keeps_estargz_layers_and_shows_progress(tmp_path: Path, registry: Registry) -> None:
    hosts = ["--hosts-dir", str(tmp_path / "certs.d")]
    out = lazyctl("image", "convert", "--json", *hosts, f"{registry.host}/{BB}:v2", f"{registry.host}/conv/bb:esgz")
    summary = json.loads(out.stdout)
    assert summary["media_type"] == MEDIA_OCI_MANIFEST and len(summary["manifests"]) == 1
    assert [layer["action"] for layer in summary["manifests"][0]["layers"]] == ["converted", "converted"]
    assert out.stderr == ""  # --json: no bar
    layers = check_converted(tmp_path, registry, f"{registry.host}/conv/bb:esgz")
    assert layers == [layer["digest"] for layer in summary["manifests"][0]["layers"]]
    img = run(_resolve(tmp_path, f"{registry.host}/conv/bb:esgz"))
    assert img.config["config"]["Cmd"] == ["/bin/sh"]
    # Converting the converted image keeps every layer as it is.
    again = json.loads(lazyctl("image", "convert", "--json", *hosts, f"{registry.host}/conv/bb:esgz",
                               f"{registry.host}/conv2/bb:esgz").stdout)
    assert [layer["action"] for layer in again["manifests"][0]["layers"]] == ["kept", "kept"]
    assert [layer["digest"] for layer in again["manifests"][0]["layers"]] == layers
    assert again["digest"] == summary["digest"]  # same config, same layers: same manifest
    # On a terminal there is a progress bar (and a table on stdout).
    status, drawn = lazyctl_on_tty("image", "convert", *hosts, f"{registry.host}/{BB}:v1", f"{registry.host}/conv/bb:v1")
    assert status == 0 and "convert" in drawn and "%" in drawn


def test_convert_options_chunk_size_and_prioritized(tmp_path: Path, registry: Registry) -> None:
    prio = tmp_path / "prio.txt"
    prio.write_text("bin/busybox\netc/hello.txt\n")
    lazyctl("image", "convert", "--json", "--hosts-dir", str(tmp_path), "--chunk-size", "1048576",
            "--prioritized", str(prio), f"{registry.host}/{BB}:v2", f"{registry.host}/conv/bb:opts")
    img = run(_resolve(tmp_path, f"{registry.host}/conv/bb:opts"))
    base = dump_toc(blob_file(registry, img.layers[0].digest))
    names = [e["name"] for e in base["entries"]]
    assert names.index("bin/busybox") < names.index(".prefetch.landmark")
    assert names.index("etc/hello.txt") < names.index(".prefetch.landmark")
    top = dump_toc(blob_file(registry, img.layers[1].digest))
    big = [e for e in top["entries"] if e["name"] == "data/big.bin" or (e["type"] == "chunk" and e["name"] == "data/big.bin")]
    assert len(big) == 10  # 9 MiB + 123 bytes in 1 MiB chunks
    check_converted(tmp_path, registry, f"{registry.host}/conv/bb:opts")


def test_convert_index_all_platforms_and_one_platform(tmp_path: Path, registry: Registry) -> None:
    async def make_index() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            v1 = await c.resolve(Reference.parse(f"{registry.host}/{BB}:v1"))
            v2 = await c.resolve(Reference.parse(f"{registry.host}/{BB}:v2"))
            arm_config = json.loads(v2.config_bytes)
            arm_config["architecture"] = "arm64"
            cfg = json.dumps(arm_config).encode()
            from lazyd.registry.client import digest_of
            await c.push_blob(Reference.parse(f"{registry.host}/{BB}:x"), digest_of(cfg), cfg)
            arm = dict(v2.manifest, config={"mediaType": "application/vnd.oci.image.config.v1+json",
                                             "digest": digest_of(cfg), "size": len(cfg)})
            arm_body = json.dumps(arm).encode()
            arm_digest = await c.put_manifest(Reference.parse(f"{registry.host}/{BB}:arm64"), arm_body,
                                              MEDIA_OCI_MANIFEST)
            index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": v1.manifest_digest, "size": len(v1.manifest_bytes),
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": arm_digest, "size": len(arm_body),
                 "platform": {"os": "linux", "architecture": "arm64"}}]}
            await c.put_manifest(Reference.parse(f"{registry.host}/{BB}:multi"), json.dumps(index).encode(),
                                 MEDIA_OCI_INDEX)

    run(make_index())
    summary = json.loads(lazyctl("image", "convert", "--json", "--all-platforms", "--hosts-dir", str(tmp_path),
                                 f"{registry.host}/{BB}:multi", f"{registry.host}/conv/multi:esgz").stdout)
    assert summary["media_type"] == MEDIA_OCI_INDEX
    assert sorted(m["platform"] for m in summary["manifests"]) == ["linux/amd64", "linux/arm64"]
    check_converted(tmp_path, registry, f"{registry.host}/conv/multi:esgz", "linux/amd64")
    check_converted(tmp_path, registry, f"{registry.host}/conv/multi:esgz", "linux/arm64")
    one = json.loads(lazyctl("image", "convert", "--json", "--platform", "linux/arm64", "--hosts-dir", str(tmp_path),
                             f"{registry.host}/{BB}:multi", f"{registry.host}/conv/arm:esgz").stdout)
    assert one["media_type"] == MEDIA_OCI_MANIFEST and one["manifests"][0]["platform"] == "linux/arm64"
    assert len(one["manifests"][0]["layers"]) == 2


def test_convert_errors_are_clear(tmp_path: Path, registry: Registry) -> None:
    bad = lazyctl("image", "convert", "Bad/Ref", f"{registry.host}/x:y", check=False)
    assert bad.returncode == 2 and "invalid repository name" in bad.stderr
    missing = lazyctl("image", "convert", "--hosts-dir", str(tmp_path), f"{registry.host}/nothing:here",
                      f"{registry.host}/x:y", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    nochunk = lazyctl("image", "convert", "--chunk-size", "0", f"{registry.host}/{BB}:v1", f"{registry.host}/x:y",
                      check=False)
    assert nochunk.returncode == 2 and "--chunk-size" in nochunk.stderr
    with pytest.raises(AssertionError, match="no manifest for platform|not linux/s390x"):
        lazyctl("image", "convert", "--platform", "linux/s390x", "--hosts-dir", str(tmp_path),
                f"{registry.host}/{BB}:v1", f"{registry.host}/x:y")


def test_convert_docker_schema2_and_copy_kept_layers_to_another_registry(tmp_path: Path, registry: Registry) -> None:
    from tests.support.registry import start_registry

    hosts = ["--hosts-dir", str(tmp_path / "certs.d")]
    first = json.loads(lazyctl("image", "convert", "--json", *hosts, f"{registry.host}/{BB}:docker",
                               f"{registry.host}/conv/docker:esgz").stdout)
    assert [layer["action"] for layer in first["manifests"][0]["layers"]] == ["converted"]
    check_converted(tmp_path, registry, f"{registry.host}/conv/docker:esgz")
    other = start_registry(tmp_path, name="other")
    try:
        second = json.loads(lazyctl("image", "convert", "--json", *hosts, f"{registry.host}/conv/docker:esgz",
                                    f"{other.host}/copied/docker:esgz").stdout)
        assert [layer["action"] for layer in second["manifests"][0]["layers"]] == ["kept"]
        assert second["digest"] == first["digest"]
        check_converted(tmp_path, other, f"{other.host}/copied/docker:esgz")
    finally:
        other.stop()
