"""Source tars for eStargz tests, the reference tools, and a checker that compares a blob with its tar."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from lazyd.estargz import TOCEntry, normalize_name, open_file

INTEROP_BIN = Path("/opt/lazyd-interop/bin")
ESTARGZ_BUILD = INTEROP_BIN / "estargz-build"
ESTARGZ_VERIFY = INTEROP_BIN / "estargz-verify"
BUILD_SH = Path(__file__).resolve().parents[3] / "shared" / "interop" / "build.sh"

MTIME = 1_700_000_000
KINDS = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink",
         tarfile.DIRTYPE: "dir", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def ensure_reference_tools() -> None:
    """Build the reference tools if they are missing (build.sh is idempotent)."""
    if ESTARGZ_BUILD.exists() and ESTARGZ_VERIFY.exists():
        return
    subprocess.run(["sh", str(BUILD_SH)], check=True, capture_output=True)


def reference_build(src: Path, out: Path, *args: str) -> dict[str, object]:
    """Run ``estargz-build -json`` (pinned to one proc unless args say otherwise)."""
    cmd = [str(ESTARGZ_BUILD), "-json", *args, "-o", str(out), str(src)]
    if "-procs" not in args:
        cmd[1:1] = ["-procs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def reference_verify(blob: Path, toc_digest: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(ESTARGZ_VERIFY)]
    if toc_digest:
        cmd += ["-toc-digest", toc_digest]
    return subprocess.run([*cmd, str(blob)], capture_output=True, text=True)


@dataclass
class Spec:
    """One tar entry to generate."""

    name: str
    kind: str = "reg"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)
    mtime: int = MTIME


_TYPES = {v: k for k, v in KINDS.items() if k != tarfile.AREGTYPE}


def write_tar(path: Path, specs: list[Spec], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for s in specs:
            info = tarfile.TarInfo(s.name)
            info.type = _TYPES[s.kind]
            info.mode, info.uid, info.gid, info.uname, info.gname = s.mode, s.uid, s.gid, s.uname, s.gname
            info.mtime = s.mtime
            info.linkname = s.link
            info.devmajor, info.devminor = s.dev
            if s.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in s.xattrs.items()}
            if s.kind == "reg":
                info.size = len(s.data)
                tf.addfile(info, io.BytesIO(s.data))
            else:
                tf.addfile(info)
    return path


def every_type_specs(big: int = 20_000) -> list[Spec]:
    """Every entry type, xattrs, hardlinks, unicode, >100 and >255-byte names, empty and many-chunk files."""
    long_dir = "d" * 120
    longer = "/".join(["seg" + str(i) * 40 for i in range(7)])  # > 255 bytes
    pattern = bytes(range(256)) * (big // 256 + 1)
    return [
        Spec("./", "dir", mode=0o755),
        Spec("./etc/", "dir", mode=0o755, uname="root", gname="root"),
        Spec("./etc/hosts", data=b"127.0.0.1 localhost\n", uname="root", gname="root"),
        Spec("./etc/empty", data=b""),
        Spec("./etc/secret", data=b"x" * 1000, mode=0o600, uid=1000, gid=1000, uname="alice", gname="staff",
             xattrs={"user.comment": "hello", "security.capability": "\x01\x00\x00\x02"}),
        Spec("./etc/hosts.link", "hardlink", link="./etc/hosts"),
        Spec("./etc/alt", "symlink", link="/etc/hosts"),
        Spec("./dev/", "dir", mode=0o755),
        Spec("./dev/null", "char", mode=0o666, dev=(1, 3)),
        Spec("./dev/sda", "block", mode=0o660, dev=(8, 0), gid=6, gname="disk"),
        Spec("./dev/pipe", "fifo", mode=0o644),
        Spec("./usr/", "dir", mode=0o755),
        Spec("./usr/bin/", "dir", mode=0o755),
        Spec("./usr/bin/tool", data=pattern[:big], mode=0o4755),
        Spec("./usr/ünïcødé-文件.txt", data="héllo wörld\n".encode()),
        Spec(f"./usr/{long_dir}/", "dir", mode=0o700),
        Spec(f"./usr/{long_dir}/{'f' * 100}.bin", data=b"long name payload" * 10),
        Spec(f"./usr/{longer}", data=b"very long path"),
        Spec("./usr/.wh.removed", data=b""),
        Spec("./usr/bin/.wh..wh..opq", data=b""),
        Spec("./sticky/", "dir", mode=0o1777),
    ]


def python_tree_tar(path: Path) -> Path:
    """A real tree: the json, email and http packages of the running Python's stdlib."""
    import email
    import http
    import json as jsonmod

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for mod in (jsonmod, email, http):
            root = Path(mod.__file__).parent
            tf.add(root, arcname=f"usr/lib/python3/{root.name}",
                   filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return path


def _mtime(value: float) -> int:
    return math.floor(value + 0.5)


def check_blob_against_tar(blob: Path, tar_path: Path, toc_digest: str | None = None,
                           skip: frozenset[str] = frozenset()) -> int:
    """Every tar entry (later duplicates win) is in the blob with the same metadata and bytes.

    Returns the number of entries compared.
    """
    with tarfile.open(tar_path) as tf, open_file(blob, toc_digest) as reader:
        members: dict[str, tarfile.TarInfo] = {}
        for m in tf.getmembers():
            members[normalize_name(m.name)] = m
        count = 0
        for name, m in members.items():
            if name in skip:
                continue
            raw = reader.toc.lookup(name, resolve=False)
            assert raw is not None and not raw.implied, f"{name!r} missing from the TOC"
            kind = KINDS[m.type]
            assert raw.type == kind, (name, raw.type, kind)
            _check_meta(raw, m, name)
            if kind == "hardlink":
                assert raw.link_name == normalize_name(m.linkname)
                target = reader.lookup(name)
                assert target is not None and target.type == "reg"
            if kind == "reg":
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                assert raw.size == len(data), name
                assert reader.read(name) == data, f"bytes of {name!r} differ"
                if len(data) > 3:
                    mid = len(data) // 3
                    assert reader.read(name, mid, 3) == data[mid : mid + 3]
            count += 1
        return count


def _check_meta(e: TOCEntry, m: tarfile.TarInfo, name: str) -> None:
    assert e.mode == m.mode, (name, oct(e.mode), oct(m.mode))
    assert (e.uid, e.gid) == (m.uid, m.gid), name
    # The TOC records a user/group name only when it changes for an id, so an empty name in
    # the tar reads back as the id's last name: compare only names the tar has.
    if m.uname:
        assert e.uname == m.uname, (name, e.uname, m.uname)
    if m.gname:
        assert e.gname == m.gname, (name, e.gname, m.gname)
    want_mtime = _mtime(m.mtime)
    assert int(e.modtime) == want_mtime, (name, e.modtime, m.mtime)
    if e.type == "symlink":
        assert e.link_name == m.linkname
    if e.type in ("char", "block"):
        assert (e.dev_major, e.dev_minor) == (m.devmajor, m.devminor), name
    want_x = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert e.xattrs == want_x, (name, e.xattrs, want_x)


def toc_digest_of(blob: Path) -> str:
    with open_file(blob) as r:
        return r.toc.digest



# -- odd entry names, read by lazyd and by the reference -------------------------------------

GO_ENV = {"GO111MODULE": "off", "GOPATH": f"{INTEROP_BIN.parent / 'gopath'}:/usr/share/gocode",
          "GOCACHE": str(INTEROP_BIN.parent / "gocache"), "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
GO_SOURCES = Path(__file__).resolve().parent

# path -> (type, mode & 0o7777, uid, gid, size, symlink target, sha256 of the bytes); the root is "".
Tree = dict[str, tuple[str, int, int, int, int, str, str]]


def odd_names_specs() -> list[Spec]:
    """Names a reference-made or hand-made layer can carry: root entries, absolute names, '..',
    duplicates after cleaning, and hardlinks whose targets need cleaning."""
    return [
        Spec("/", "dir", mode=0o755),
        Spec("./", "dir", mode=0o700),            # a second root entry: the later one wins
        Spec("./etc/", "dir", mode=0o750),
        Spec("/etc/hosts", data=b"hosts\n"),
        Spec("etc/../bin/", "dir", mode=0o711),
        Spec("a/../b", data=b"b\n"),
        Spec("../../x", data=b"x\n", mode=0o600),  # cannot climb out of the layer
        Spec("/../y", data=b"y\n"),
        Spec("./dup", data=b"first\n"),
        Spec("dup", data=b"second\n", mode=0o640),
        Spec("link", "hardlink", link="/etc/../etc/hosts"),
        Spec("bin/link2", "hardlink", link="../../x"),
        Spec("bin/sym", "symlink", link="../../../etc/passwd"),
        Spec("deep/./dir//f", data=b"deep\n"),
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ODD_NAMES_TREE: Tree = {
    "": ("dir", 0o700, 0, 0, 0, "", ""),
    "etc": ("dir", 0o750, 0, 0, 0, "", ""),
    "etc/hosts": ("reg", 0o644, 0, 0, 6, "", _sha(b"hosts\n")),
    "bin": ("dir", 0o711, 0, 0, 0, "", ""),
    "bin/link2": ("reg", 0o600, 0, 0, 2, "", _sha(b"x\n")),
    "bin/sym": ("symlink", 0o644, 0, 0, 0, "../../../etc/passwd", ""),
    "b": ("reg", 0o644, 0, 0, 2, "", _sha(b"b\n")),
    "x": ("reg", 0o600, 0, 0, 2, "", _sha(b"x\n")),
    "y": ("reg", 0o644, 0, 0, 2, "", _sha(b"y\n")),
    "dup": ("reg", 0o640, 0, 0, 7, "", _sha(b"second\n")),
    "link": ("reg", 0o644, 0, 0, 6, "", _sha(b"hosts\n")),
    "deep": ("dir", 0o755, 0, 0, 0, "", ""),
    "deep/dir": ("dir", 0o755, 0, 0, 0, "", ""),
    "deep/dir/f": ("reg", 0o644, 0, 0, 5, "", _sha(b"deep\n")),
}


def go_tool(name: str, outdir: Path) -> Path:
    """Build the Go program ``tests/estargz/<name>/main.go`` against the reference sources."""
    out = outdir / name
    if not out.exists():
        ensure_reference_tools()
        env = {**os.environ, **GO_ENV}
        proc = subprocess.run(["go", "build", "-o", str(out), str(GO_SOURCES / name / "main.go")],
                              capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"go build {name} failed: {proc.stderr}")
    return out


def reference_tree(blob: Path, reftree: Path) -> Tree:
    """The tree the reference reader builds (Lookup("") and ForeachChild, bytes by OpenFile)."""
    proc = subprocess.run([str(reftree), str(blob)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tree: Tree = {}
    for line in proc.stdout.splitlines():
        n = json.loads(line)
        assert n["path"] not in tree, f"reference lists {n['path']!r} twice"
        tree[n["path"]] = (n["type"], n["mode"] & 0o7777, n["uid"], n["gid"], n["size"], n.get("link", ""),
                           n.get("sha256", ""))
    return tree


def lazyd_tree(blob: Path) -> Tree:
    """The tree lazyd's TOC builds (root, then children; hardlinks resolved), bytes by Reader.read."""
    tree: Tree = {}
    with open_file(blob) as reader:
        def walk(path: str, e: TOCEntry) -> None:
            assert path not in tree, f"lazyd lists {path!r} twice"
            sha = _sha(reader.read(path)) if e.type == "reg" else ""
            link = e.link_name if e.type == "symlink" else ""
            tree[path] = (e.type, e.mode & 0o7777, e.uid, e.gid, e.size, link, sha)
            for base, child in (e.children or {}).items():
                walk(f"{path}/{base}" if path else base, child)

        walk("", reader.toc.root)
    return tree


def unpacked_tree(blob: Path) -> Tree:
    """The tree of the reference's ``estargz.Unpack`` stream (what a non-lazy pull applies),
    read as tar semantics: names cleaned, later entries win, hardlinks copy their target.
    Chunks are not verified here (estargz-verify's own check trips on the duplicate names the
    reference's Writer keeps); callers verify the blob separately."""
    proc = subprocess.run([str(ESTARGZ_VERIFY), "-no-chunk-verify", "-unpack", str(blob)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and b"RESULT: OK" in proc.stderr, proc.stderr
    tree: Tree = {"": ("dir", 0o755, 0, 0, 0, "", "")}
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tf:
        for m in tf:
            name = normalize_name(m.name)
            parts = name.split("/") if name else []
            for i in range(1, len(parts)):
                tree.setdefault("/".join(parts[:i]), ("dir", 0o755, 0, 0, 0, "", ""))
            kind = KINDS[m.type]
            if kind == "hardlink":
                tree[name] = tree[normalize_name(m.linkname)]
                continue
            data = tf.extractfile(m).read() if kind == "reg" else b""  # type: ignore[union-attr]
            tree[name] = (kind, m.mode & 0o7777, m.uid, m.gid, len(data), m.linkname if kind == "symlink" else "",
                          _sha(data) if kind == "reg" else "")
    return tree
