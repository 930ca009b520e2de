"""Interop with containerd and the reference converter (ctr-remote), containerd started by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazyd.convert.layer import is_estargz
from lazyd.registry import Reference, RegistryClient
from tests.registry.helpers import BB, config, run
from tests.support.images import debian_python_layout, push
from tests.support.registry import Registry

from tests.support.containerd import Containerd, start_containerd
from .helpers import lazyctl, read_estargz_file
from .test_convert import check_converted


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    ctrd = start_containerd(tmp_path_factory.mktemp("containerd"))
    try:
        yield ctrd
    finally:
        ctrd.stop()


def test_reference_converted_image_is_recognised_and_reads(tmp_path: Path, registry: Registry,
                                                         containerd: Containerd) -> None:
    src, dst = f"{registry.host}/{BB}:v2", f"{registry.host}/refconv/bb:esgz"
    containerd.ctr("images", "pull", "--plain-http", src)
    containerd.ctr_remote("image", "convert", "--estargz", "--oci", src, dst)
    containerd.ctr("images", "push", "--plain-http", dst)

    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as c:
            ref = Reference.parse(dst)
            img = await c.resolve(ref)
            assert len(img.layers) == 2
            for layer in img.layers:
                assert layer.toc_digest and await is_estargz(c, ref, layer)
            busybox = await read_estargz_file(c, ref, img.layers[0], "bin/busybox")
            assert busybox == Path("/bin/busybox").read_bytes()
            assert await read_estargz_file(c, ref, img.layers[1], "data/file.txt") == b"payload\n"
            big = await read_estargz_file(c, ref, img.layers[1], "data/big.bin")
            assert len(big) == 9 * 1024 * 1024 + 123
            # and the original (non-eStargz) layers are not mistaken for eStargz
            orig = await c.resolve(Reference.parse(src))
            assert not any([await is_estargz(c, Reference.parse(src), d) for d in orig.layers])

    run(main())
    summary = json.loads(lazyctl("image", "convert", "--json", "--hosts-dir", str(tmp_path), dst,
                                 f"{registry.host}/refconv/bb:again").stdout)
    assert [layer["action"] for layer in summary["manifests"][0]["layers"]] == ["kept", "kept"]


@pytest.mark.slow
def test_converted_debian_python_runs_with_ctr(tmp_path: Path, registry: Registry, containerd: Containerd) -> None:
    layout = debian_python_layout()
    push(f"oci:{layout}:latest", registry.host, "debian-python:latest")
    src, dst = f"{registry.host}/debian-python:latest", f"{registry.host}/debian-python:esgz"
    lazyctl("image", "convert", "--json", "--hosts-dir", str(tmp_path), src, dst)
    check_converted(tmp_path, registry, dst)
    containerd.ctr("images", "pull", "--plain-http", dst)
    out = containerd.ctr("run", "--rm", dst, "lazyd-convert-test", "python3", "-c", "print(6 * 7)")
    assert out.stdout.strip() == "42"
