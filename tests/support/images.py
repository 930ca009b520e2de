"""Test images built locally (nothing is pulled from the internet) and pushed with skopeo.

* ``busybox``: one layer, busybox-static with its applet symlinks, plus an optional
  second layer that deletes files (whiteouts) and replaces a directory (opaque).
* ``debian-python``: ``debootstrap --variant=minbase bookworm`` as one layer and
  ``apt-get install python3`` as a second. Built once and kept under
  ``$LAZYD_TEST_CACHE`` (default ``/var/cache/lazyd-test``) because it takes ~1 minute.

Images are OCI layouts on disk (``oci:DIR:TAG``); ``push`` copies one to a registry.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("LAZYD_TEST_CACHE", "/var/cache/lazyd-test"))
DEBIAN_MIRROR = os.environ.get("LAZYD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
_DEBIAN_VERSION = "v1"  # bump to rebuild the cached debian-python image


def run(*argv: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run a command, raising with its output when it fails."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builders of one cached artefact across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _new_bundle(layout: Path, tag: str, bundle: Path, base: str | None = None) -> None:
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", layout)
    if base is None:
        run("umoci", "new", "--image", f"{layout}:{tag}")
        run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    else:
        run("umoci", "unpack", "--image", f"{layout}:{base}", bundle)


def _repack(layout: Path, tag: str, bundle: Path, cmd: list[str] | None = None) -> None:
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    if cmd:
        args = ["umoci", "config", "--image", f"{layout}:{tag}"]
        for part in cmd:
            args += ["--config.cmd", part]
        run(*args)
    shutil.rmtree(bundle)


def install_busybox(rootfs: Path) -> None:
    """Put busybox-static and a symlink per applet into ``rootfs``."""
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in run("/bin/busybox", "--list").split():
        link = rootfs / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev", "root", "var/log"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (rootfs / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")


def build_busybox(layout: Path, tag: str = "latest", *, with_deletions: bool = False) -> str:
    """Build the busybox image into the OCI layout ``layout``; returns ``oci:DIR:TAG``.

    With ``with_deletions`` a second layer removes ``/etc/group`` and some applets
    (whiteouts), replaces ``/var/log`` (umoci writes this as per-file whiteouts, not an opaque marker), and adds files
    with xattrs, a hardlink, a fifo and an empty file.
    """
    bundle = layout.parent / f".bundle-{tag}"
    shutil.rmtree(bundle, ignore_errors=True)
    base_tag = f"{tag}-base" if with_deletions else tag
    _new_bundle(layout, base_tag, bundle)
    rootfs = bundle / "rootfs"
    install_busybox(rootfs)
    (rootfs / "var/log/old.log").write_text("old\n")
    (rootfs / "var/log/sub").mkdir()
    (rootfs / "var/log/sub/x").write_text("x\n")
    (rootfs / "etc/hello.txt").write_text("hello from lazyd\n")
    _repack(layout, base_tag, bundle, cmd=["/bin/sh"])
    if with_deletions:
        run("umoci", "unpack", "--image", f"{layout}:{base_tag}", bundle)
        rootfs = bundle / "rootfs"
        (rootfs / "etc/group").unlink()
        for applet in ("vi", "wget", "telnet"):
            (rootfs / "bin" / applet).unlink()
        shutil.rmtree(rootfs / "var/log")
        (rootfs / "var/log").mkdir()
        (rootfs / "var/log/new.log").write_text("new\n")
        data = rootfs / "data"
        data.mkdir()
        (data / "empty").write_bytes(b"")
        (data / "big.bin").write_bytes(os.urandom(9 * 1024 * 1024 + 123))
        (data / "file.txt").write_text("payload\n")
        os.link(data / "file.txt", data / "hardlink.txt")
        os.mkfifo(data / "fifo")
        os.setxattr(data / "file.txt", "user.lazyd", b"xattr-value")
        os.chown(data / "file.txt", 1000, 1000)
        os.chmod(data / "file.txt", 0o640)
        _repack(layout, tag, bundle, cmd=["/bin/sh"])
    run("umoci", "gc", "--layout", layout)
    return f"oci:{layout}:{tag}"


def _debootstrap(rootfs: Path) -> None:
    run("debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()


def debian_python_layout() -> Path:
    """The cached debian+python3 OCI layout (tag ``latest``), built on first use."""
    layout = CACHE / f"debian-python-{_DEBIAN_VERSION}"
    with _locked(CACHE / f"debian-python-{_DEBIAN_VERSION}.lock"):
        if (layout / ".complete").exists():
            return layout
        shutil.rmtree(layout, ignore_errors=True)
        work = CACHE / f"debian-python-{_DEBIAN_VERSION}.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        rootfs_cache = CACHE / "bookworm-minbase"
        if not (rootfs_cache / ".complete").exists():
            shutil.rmtree(rootfs_cache, ignore_errors=True)
            _debootstrap(rootfs_cache)
            (rootfs_cache / ".complete").touch()
        bundle = work / "bundle"
        _new_bundle(layout, "base", bundle)
        run("cp", "-a", "--", *[str(p) for p in rootfs_cache.iterdir() if p.name != ".complete"], bundle / "rootfs")
        _repack(layout, "base", bundle, cmd=["/bin/bash"])
        run("umoci", "unpack", "--image", f"{layout}:base", bundle)
        rootfs = bundle / "rootfs"
        shutil.copy2("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        run("chroot", rootfs, "apt-get", "-o", "Acquire::Retries=3", "update", "-qq")
        run("chroot", rootfs, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
            "--no-install-recommends", "python3")
        run("chroot", rootfs, "apt-get", "clean")
        for p in (rootfs / "var/lib/apt/lists").glob("*"):
            if p.is_file():
                p.unlink()
        (rootfs / "etc/resolv.conf").write_text("")
        _repack(layout, "latest", bundle, cmd=["/usr/bin/python3"])
        run("umoci", "gc", "--layout", layout)
        shutil.rmtree(work)
        (layout / ".complete").touch()
        return layout


def push(src: str, registry_host: str, name: str, *, dest_creds: str | None = None, fmt: str | None = None) -> str:
    """``skopeo copy`` an image (``oci:DIR:TAG``) to ``registry_host/name``; returns the pushed ref."""
    dest = f"{registry_host}/{name}"
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if dest_creds:
        args += ["--dest-creds", dest_creds]
    if fmt:
        args += ["--format", fmt]
    run(*args, src, f"docker://{dest}")
    return dest


def layer_tars(layout: Path, tag: str, out: Path) -> list[Path]:
    """Each layer of an OCI layout image as an uncompressed tar file in ``out`` (bottom first)."""
    import gzip
    import json

    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

    def blob(digest: str) -> Path:
        algo, hexd = digest.split(":")
        return layout / "blobs" / algo / hexd

    manifest = json.loads(blob(desc["digest"]).read_text())
    tars = []
    for i, layer in enumerate(manifest["layers"]):
        dst = out / f"layer{i}.tar"
        with gzip.open(blob(layer["digest"]), "rb") as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        tars.append(dst)
    return tars


_DEBIAN_INSERT_VERSION = "v1"  # bump to rebuild the cached debian-python-insert image


def debian_python_insert_layout() -> Path:
    """debian+python3 whose base layer is written by ``umoci insert ROOTFS /`` (tag ``latest``), cached.

    Same two layers as ``debian_python_layout()`` (the debootstrap rootfs, then the python3
    layer, reused as is), but ``umoci insert`` names the base layer's root directory ``/``
    instead of ``.``: the entry that the reference's converter keeps in its TOC as ``/``.
    """
    import gzip
    import hashlib
    import json

    src = debian_python_layout()
    layout = CACHE / f"debian-python-insert-{_DEBIAN_INSERT_VERSION}"
    with _locked(CACHE / f"debian-python-insert-{_DEBIAN_INSERT_VERSION}.lock"):
        if (layout / ".complete").exists():
            return layout
        shutil.rmtree(layout, ignore_errors=True)
        rootfs = CACHE / "bookworm-minbase"  # left complete by debian_python_layout()
        run("umoci", "init", "--layout", layout)
        run("umoci", "new", "--image", f"{layout}:latest")
        run("umoci", "insert", "--image", f"{layout}:latest", rootfs, "/")
        run("umoci", "config", "--image", f"{layout}:latest", "--config.cmd", "/usr/bin/python3")

        def blob(root: Path, digest: str) -> Path:
            algo, hexd = digest.split(":", 1)
            return root / "blobs" / algo / hexd

        def put(data: bytes) -> tuple[str, int]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            blob(layout, digest).write_bytes(data)
            return digest, len(data)

        def manifest(root: Path) -> tuple[dict, dict]:
            index = json.loads((root / "index.json").read_text())
            desc = next(m for m in index["manifests"]
                        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest")
            return index, json.loads(blob(root, desc["digest"]).read_text())

        _, src_manifest = manifest(src)
        python_layer = src_manifest["layers"][1]
        shutil.copyfile(blob(src, python_layer["digest"]), blob(layout, python_layer["digest"]))
        h = hashlib.sha256()
        with gzip.open(blob(src, python_layer["digest"]), "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
        index, man = manifest(layout)
        config = json.loads(blob(layout, man["config"]["digest"]).read_text())
        config["rootfs"]["diff_ids"].append("sha256:" + h.hexdigest())
        config.setdefault("history", []).append({"created": "2026-01-01T00:00:00Z",
                                                 "created_by": "apt-get install python3 (from debian-python)"})
        cdigest, csize = put(json.dumps(config, separators=(",", ":")).encode())
        man["config"] = {**man["config"], "digest": cdigest, "size": csize}
        man["layers"].append({k: v for k, v in python_layer.items() if k != "annotations"})
        mdigest, msize = put(json.dumps(man, separators=(",", ":")).encode())
        for desc in index["manifests"]:
            if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest":
                desc.update(digest=mdigest, size=msize)
        (layout / "index.json").write_text(json.dumps(index))
        run("umoci", "gc", "--layout", layout)
        (layout / ".complete").touch()
        return layout
