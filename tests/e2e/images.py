"""eStargz copies of the test images, as OCI layouts ready for ``tests.support.images.push``.

Each layer of the source image is converted on its own (``LayerBuilder``); the manifest gets
the ``containerd.io/snapshot/stargz/toc.digest`` and uncompressed-size annotations and the
config gets the new diff IDs. Converted layouts of cached images are cached next to them.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import CACHE

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REFERENCE_BUILD = "/opt/lazyd-interop/bin/estargz-build"


@dataclass(frozen=True)
class BuiltLayer:
    blob: Path
    digest: str
    size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int


LayerBuilder = Callable[[Path, Path], BuiltLayer]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return "sha256:" + h.hexdigest()


def lazyd_builder(tar: Path, out: Path) -> BuiltLayer:
    """Convert with lazyd's own writer (``lazyd.estargz.build``)."""
    from lazyd.estargz import build  # imported here: only this builder needs it
    from lazyd.estargz.writer import BuildOptions

    result = build(str(tar), str(out), BuildOptions())
    return BuiltLayer(out, result.blob_digest, result.blob_size, result.diff_id, result.toc_digest,
                      result.uncompressed_size)


def _reference_build(tar: Path, out: Path, args: tuple[str, ...] = ()) -> BuiltLayer:
    """Run ``estargz-build -json ARGS -o OUT TAR`` and describe the blob it wrote."""
    proc = subprocess.run([REFERENCE_BUILD, "-json", *args, "-o", str(out), str(tar)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"estargz-build {' '.join((*args, str(tar)))} failed: {proc.stderr}")
    info = json.loads(proc.stdout)
    size = 0
    with gzip.open(out, "rb") as f:
        while piece := f.read(1 << 20):
            size += len(piece)
    return BuiltLayer(out, info["blobDigest"], int(info["blobSize"]), info["diffID"], info["tocDigest"], size)


def reference_builder(tar: Path, out: Path) -> BuiltLayer:
    """Convert with the reference tool (stargz-snapshotter 0.12 ``estargz.Build``)."""
    return _reference_build(tar, out)


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def manifest_of(layout: Path, tag: str) -> tuple[str, dict]:
    """(digest, manifest) of ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    return desc["digest"], json.loads(_blob(layout, desc["digest"]).read_text())


def convert_layout(src: Path, tag: str, dst: Path, builder: LayerBuilder = reference_builder) -> str:
    """Write an eStargz copy of ``src:tag`` into the OCI layout ``dst`` (same tag); returns ``oci:DST:TAG``."""
    _, manifest = manifest_of(src, tag)
    config = json.loads(_blob(src, manifest["config"]["digest"]).read_text())
    (dst / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (dst / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    work = dst / ".work"
    work.mkdir(exist_ok=True)
    layers, diff_ids = [], []
    for i, layer in enumerate(manifest["layers"]):
        tar = work / f"layer{i}.tar"
        with gzip.open(_blob(src, layer["digest"]), "rb") as fin, open(tar, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        built = builder(tar, work / f"layer{i}.esgz")
        if _sha256_file(built.blob) != built.digest:
            raise RuntimeError(f"builder reported {built.digest} for {built.blob}, which hashes differently")
        target = _blob(dst, built.digest)
        shutil.move(built.blob, target)
        tar.unlink()
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": built.digest, "size": built.size,
                       "annotations": {TOC_DIGEST: built.toc_digest, UNCOMPRESSED_SIZE: str(built.uncompressed_size)}})
        diff_ids.append(built.diff_id)
    shutil.rmtree(work)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    cdigest, csize = _put(dst, json.dumps(config, separators=(",", ":")).encode())
    new_manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                               "size": csize},
                    "layers": layers}
    mdigest, msize = _put(dst, json.dumps(new_manifest, separators=(",", ":")).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (dst / "index.json").write_text(json.dumps(index))
    return f"oci:{dst}:{tag}"


def _builder_key(builder: LayerBuilder) -> str:
    """Part of the cache key: for lazyd's builder, a hash of the writer source, so a changed writer rebuilds."""
    if builder is lazyd_builder:
        import lazyd.estargz.writer as writer

        return hashlib.sha256(Path(writer.__file__).read_bytes()).hexdigest()[:12]
    return "ref"


def cached_estargz(src: Path, tag: str, builder: LayerBuilder = reference_builder) -> str:
    """``convert_layout`` of a cached image, itself cached (keyed by source manifest and builder)."""
    mdigest, _ = manifest_of(src, tag)
    dst = CACHE / f"estargz-{builder.__name__}-{_builder_key(builder)}-{mdigest.split(':')[1][:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dst / ".complete").exists():
            shutil.rmtree(dst, ignore_errors=True)
            convert_layout(src, tag, dst, builder)
            (dst / ".complete").touch()
            # Copies made by an older writer of the same source are stale now.
            for old in CACHE.glob(f"estargz-{builder.__name__}-*-{mdigest.split(':')[1][:16]}"):
                if old != dst and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    old.with_name(old.name + ".lock").unlink(missing_ok=True)
    return f"oci:{dst}:{tag}"


def add_opaque_layer(layout: Path, tag: str) -> None:
    """Put a layer on top of ``layout:tag`` that makes ``/var/log`` opaque (``.wh..wh..opq``) and adds one file.

    ``build_busybox(with_deletions=True)`` deletes files with per-file whiteouts only (that is
    what umoci writes); this layer adds the opaque-directory case.
    """
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.mtime = kind, mode, len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data) if data else None)

        add("var", tarfile.DIRTYPE, mode=0o755)
        add("var/log", tarfile.DIRTYPE, mode=0o755)
        add("var/log/.wh..wh..opq", tarfile.REGTYPE, mode=0o644)
        add("var/log/fresh.log", tarfile.REGTYPE, b"fresh\n")
    add_layer(layout, tag, buf.getvalue(), "lazyd e2e: opaque /var/log")


def reference_builder_with(*args: str) -> LayerBuilder:
    """``reference_builder`` with extra ``estargz-build`` flags, e.g. ``("-chunk-size", "4096")``."""

    def builder(tar: Path, out: Path) -> BuiltLayer:
        return _reference_build(tar, out, args)

    builder.__name__ = "reference_builder_" + "_".join(a.lstrip("-") for a in args)
    return builder


def add_layer(layout: Path, tag: str, raw_tar: bytes, created_by: str) -> None:
    """Put the uncompressed tar ``raw_tar`` on top of ``layout:tag`` as a new gzip layer (config and index updated)."""
    _, manifest = manifest_of(layout, tag)
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    ldigest, lsize = _put(layout, gzip.compress(raw_tar, mtime=0))
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw_tar).hexdigest())
    config.setdefault("history", []).append({"created": "2026-01-01T00:00:00Z", "created_by": created_by})
    cdigest, csize = _put(layout, json.dumps(config, separators=(",", ":")).encode())
    manifest["config"] = {**manifest["config"], "digest": cdigest, "size": csize}
    manifest["layers"].append({"mediaType": OCI_LAYER_GZIP, "digest": ldigest, "size": lsize})
    mdigest, msize = _put(layout, json.dumps(manifest, separators=(",", ":")).encode())
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            desc.update(digest=mdigest, size=msize)
    (layout / "index.json").write_text(json.dumps(index))


# Raw tar names of odd_names_tar() and where a reader must put them (Go's path.Clean("/"+name) minus "/").
ODD_NAMES = {
    "./": "",
    "/": "",
    "/abs/": "abs",
    "/abs/file": "abs/file",
    "a/": "a",
    "a/../b": "b",
    "../../x": "x",
    "./dot/": "dot",
    "./dot/f": "dot/f",
    "c//": "c",
    "c//d": "c/d",
    "./lnk": "lnk",
}


def odd_names_tar() -> bytes:
    """A hand-made layer whose names are ``./``, ``/``, absolute, ``a/../b``, ``../../x`` and ``c//d`` (ODD_NAMES).

    Every name is written byte for byte as given (GNU format, so tarfile does not rewrite them);
    ``lnk`` is a symlink to the absolute ``/abs/file``.
    """
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in ODD_NAMES:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid = 1_700_000_000, 0, 0
            if name == "./lnk":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/abs/file", 0o777
                tf.addfile(info)
            elif name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                data = f"content of {name}\n".encode()
                info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as check:
        written = [m.name + ("/" if m.isdir() and m.name not in ("", "/") else "") for m in check.getmembers()]
    if len(written) != len(ODD_NAMES):
        raise RuntimeError(f"odd_names_tar wrote {written}, not {list(ODD_NAMES)}")
    return raw


def layer_names(layout: Path, tag: str) -> list[list[str]]:
    """The raw tar names of each layer of ``layout:tag`` (bottom first), read from the gzip blobs."""
    import tarfile

    _, manifest = manifest_of(layout, tag)
    out = []
    for layer in manifest["layers"]:
        with tarfile.open(_blob(layout, layer["digest"]), "r|gz") as tf:
            out.append([m.name for m in tf])
    return out


def with_parent_dirs(src: Path, tag: str, dst: Path) -> str:
    """Copy ``src:tag`` to the OCI layout ``dst`` with every layer carrying its entries' parent directories.

    umoci leaves unchanged parents out of upper layers (``bin/.wh.vi`` without ``bin/``), which
    ``ctr-remote image optimize`` rejects (``file: "bin": not found``). A missing parent is
    inserted before its first child with the owner, mode and mtime it has in the layers below,
    so the image's root filesystem stays the same. Returns ``oci:DST:TAG``.
    """
    import io
    import tarfile

    shutil.copytree(src, dst)
    _, manifest = manifest_of(dst, tag)
    config = json.loads(_blob(dst, manifest["config"]["digest"]).read_text())
    below: dict[str, tarfile.TarInfo] = {}  # directories of the layers below, by clean name
    new_layers, diff_ids = [], []

    def clean(name: str) -> str:
        return "/".join(p for p in name.split("/") if p not in ("", "."))

    for layer in manifest["layers"]:
        with tarfile.open(_blob(src, layer["digest"]), "r:gz") as tf:
            members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf]  # type: ignore[union-attr]
        buf = io.BytesIO()
        present: set[str] = set()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
            for m, data in members:
                parts = clean(m.name).split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent in present:
                        continue
                    if parent not in below:
                        raise RuntimeError(f"{m.name}: parent {parent} is in no layer of {src}:{tag}")
                    copy_dir = below[parent]
                    info = tarfile.TarInfo(parent + "/")
                    info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, copy_dir.mode, copy_dir.uid, copy_dir.gid
                    info.mtime, info.uname, info.gname = copy_dir.mtime, copy_dir.uname, copy_dir.gname
                    info.pax_headers = {k: v for k, v in copy_dir.pax_headers.items() if k.startswith("SCHILY.xattr.")}
                    out.addfile(info)
                    present.add(parent)
                out.addfile(m, io.BytesIO(data) if data is not None else None)
                if clean(m.name):
                    present.add(clean(m.name))
                if m.isdir():
                    below[clean(m.name)] = m
        raw = buf.getvalue()
        ldigest, lsize = _put(dst, gzip.compress(raw, compresslevel=6, mtime=0))
        new_layers.append({"mediaType": OCI_LAYER_GZIP, "digest": ldigest, "size": lsize})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config["rootfs"]["diff_ids"] = diff_ids
    cdigest, csize = _put(dst, json.dumps(config, separators=(",", ":")).encode())
    manifest["config"] = {**manifest["config"], "digest": cdigest, "size": csize}
    manifest["layers"] = new_layers
    mdigest, msize = _put(dst, json.dumps(manifest, separators=(",", ":")).encode())
    index = json.loads((dst / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            desc.update(digest=mdigest, size=msize)
    (dst / "index.json").write_text(json.dumps(index))
    return f"oci:{dst}:{tag}"
