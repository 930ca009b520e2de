"""The eStargz producers of the matrix, each run for real on a source image in the test registry.

A producer turns the plain (gzip) source image ``src`` into an eStargz image pushed as ``dst``:

* ``lazyctl image convert`` (registry to registry), with and without ``--prioritized``;
* ``ctr-remote image convert --estargz --oci`` and ``ctr-remote image optimize --oci`` (0.12.0
  has no --plain-http: ``ctr images pull`` into a containerd first, ``ctr images push`` after);
* the reference ``estargz-build`` per layer of the source's OCI layout (``convert_layout``),
  pushed with skopeo.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.images import REFERENCE_BUILD, convert_layout, reference_builder_with
from tests.support.containerd import Containerd
from tests.support.images import CACHE, push


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
    """The image's content in the workshop's containerd (ctr-remote converts content; no unpack needed)."""
    shop.containerd.ctr("content", "fetch", "--plain-http", ref, timeout=600)


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


def _tool_key(producer: str) -> str:
    """What the output of ``producer`` depends on besides its input: lazyd's sources or the reference binary.

    File contents, not mtimes: the reference tools are rebuilt (same bytes) by setup and fixtures.
    """
    h = hashlib.sha256(producer.encode())
    if producer.startswith("lazyctl"):
        import lazyd

        pkg = Path(lazyd.__file__).parent
        files = sorted([*(pkg / "convert").glob("*.py"), *(pkg / "estargz").glob("*.py")])
    else:
        tool = shutil.which("ctr-remote") if producer.startswith("ctr-remote") else REFERENCE_BUILD
        if tool is None or not Path(tool).exists():
            raise RuntimeError(f"the tool behind {producer!r} is not installed")
        files = [Path(tool)]
    for path in files:
        h.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def cached_produce(shop: Workshop, producer: str, src: Source, dst: str, source_digest: str) -> bool:
    """Run ``producer`` on ``src`` as ``dst``, or push its cached output; True when the cache answered.

    The output is kept in ``$LAZYD_TEST_CACHE`` as an OCI layout, keyed by the source's manifest
    digest and by ``_tool_key``, so a changed lazyd converter (or reference build) makes it again.
    For the big debian source, where converting takes minutes on two cores.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", producer.lower()).strip("-")
    layout = CACHE / f"interop-{src.name}-{slug}-{source_digest.split(':')[1][:12]}-{_tool_key(producer)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(f"{layout}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (layout / ".complete").exists():
            push(f"oci:{layout}:latest", shop.registry_host, dst.split("/", 1)[1])
            return True
        PRODUCERS[producer](shop, src, dst)
        shutil.rmtree(layout, ignore_errors=True)
        _sh("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{dst}", f"oci:{layout}:latest")
        (layout / ".complete").touch()
        for old in CACHE.glob(f"interop-{src.name}-{slug}-*"):
            if old.is_dir() and old != layout:
                shutil.rmtree(old, ignore_errors=True)
                Path(f"{old}.lock").unlink(missing_ok=True)
        return False
