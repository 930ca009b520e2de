"""Source tars for eStargz tests, the reference tools, and a checker that compares a blob with its tar."""

from __future__ import annotations

import io
import json
import math
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

