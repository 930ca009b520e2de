"""The eStargz producers of the matrix, each run for real on a source image in the test registry.

A producer turns the plain (gzip) source image ``src`` into an eStargz image pushed as ``dst``:

* ``lazyctl image convert`` (registry to registry), with and without ``--prioritized``;
* ``ctr-remote image convert --estargz --oci`` and ``ctr-remote image optimize --oci`` (0.12.0
  has no --plain-http: ``ctr images pull`` into a containerd first, ``ctr images push`` after);
* the reference ``estargz-build`` per layer of the source's OCI layout (``convert_layout``),
  pushed with skopeo.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.images import convert_layout, reference_builder_with
from tests.support.containerd import Containerd
from tests.support.images import push


@dataclass(frozen=True)
class Source:
    """A plain source image: its OCI layout, its ref in the registry, and a command that proves it runs."""

    name: str
    layout: Path
    tag: str
    ref: str
    cmd: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Workshop:
    """Where producers work: a plain containerd (for ctr-remote), the registry, scratch space."""

    containerd: Containerd
    registry_host: str
    work: Path


Producer = Callable[[Workshop, Source, str], None]


def _sh(*argv: str | Path, timeout: float = 600) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def lazyctl_convert(shop: Workshop, src: Source, dst: str) -> None:
    _sh("lazyctl", "image", "convert", "--plain-http", "--json", src.ref, dst)


# Files the prioritized conversion puts first; the ones a source does not have are skipped by lazyctl.
PRIORITIZED = ("bin/busybox", "etc/hello.txt", "data/file.txt", "var/log/fresh.log")


def lazyctl_convert_prioritized(shop: Workshop, src: Source, dst: str) -> None:
    listing = shop.work / f"prioritized-{src.name}.txt"
    listing.write_text("".join(f"{p}\n" for p in PRIORITIZED))
    _sh("lazyctl", "image", "convert", "--plain-http", "--json", "--prioritized", listing, src.ref, dst)


def _pulled(shop: Workshop, ref: str) -> None:
    shop.containerd.ctr("images", "pull", "--plain-http", ref, timeout=600)


def ctr_remote_convert(shop: Workshop, src: Source, dst: str) -> None:
    _pulled(shop, src.ref)
    shop.containerd.ctr_remote("image", "convert", "--estargz", "--oci", src.ref, dst, timeout=900)
    shop.containerd.ctr("images", "push", "--plain-http", dst, timeout=600)


def ctr_remote_optimize(shop: Workshop, src: Source, dst: str) -> None:
    """``ctr-remote image optimize``: runs ``src.cmd`` in a container and puts the files it read first."""
    _pulled(shop, src.ref)
    shop.containerd.ctr_remote("image", "optimize", "--oci", "--period", "2",
                               "--entrypoint", json.dumps(list(src.cmd[:1])), "--args", json.dumps(list(src.cmd[1:])),
                               src.ref, dst, timeout=900)
    shop.containerd.ctr("images", "push", "--plain-http", dst, timeout=600)


def estargz_build(*flags: str) -> Producer:
    """The reference ``estargz-build FLAGS`` on every layer of the source's layout, pushed with skopeo."""
    builder = reference_builder_with(*flags)

    def produce(shop: Workshop, src: Source, dst: str) -> None:
        out = shop.work / f"{builder.__name__}-{src.name}"
        layout = convert_layout(src.layout, src.tag, out, builder)
        pushed = push(layout, shop.registry_host, dst.split("/", 1)[1])
        if pushed != dst:
            raise RuntimeError(f"pushed {pushed}, wanted {dst}")

    return produce


PRODUCERS: dict[str, Producer] = {
    "lazyctl convert": lazyctl_convert,
    "lazyctl convert --prioritized": lazyctl_convert_prioritized,
    "ctr-remote convert": ctr_remote_convert,
    "ctr-remote optimize": ctr_remote_optimize,
    "estargz-build -chunk-size 4096": estargz_build("-chunk-size", "4096"),
    "estargz-build -mode writer": estargz_build("-mode", "writer", "-chunk-size", "4096"),
}
