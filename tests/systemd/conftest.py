"""Fixtures for the systemd tests: a real registry and a small one-layer eStargz image."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lazyd.estargz import BuildOptions
from tests.support.tars import write_tar
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.registry import Registry, running_registry

# name -> size; random content, so every file needs its own range requests
FILES = {"data/first.bin": 300_000, "data/second.bin": 2_000_000, "data/third.bin": 1_000_000}
HELLO = b"hello from an eStargz layer\n"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("systemd-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def layer_files() -> dict[str, bytes]:
    """The regular files of the image's one layer, by path."""
    return {"etc/hello.txt": HELLO, **{name: os.urandom(size) for name, size in FILES.items()}}


@pytest.fixture(scope="session")
def image(registry: Registry, layer_files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """``layer_files`` as a one-layer eStargz image (256 KiB chunks) pushed as systemd-esgz:t."""
    work = tmp_path_factory.mktemp("systemd-image")
    tar_path = write_tar(work / "layer.tar", ["etc", "data"], layer_files)
    layers = build_layers([tar_path], work / "esgz", BuildOptions(chunk_size=256 * 1024))
    return push_layers(registry.host, "systemd-esgz:t", layers)

