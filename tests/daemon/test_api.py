"""Hostile and malformed API input, config errors, and lazyctl."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from lazyd.api import wire
from lazyd.api.client import Client
from lazyd.api.messages import ApiError, FetchArgs, MountArgs
from tests.daemon.conftest import DaemonProc
from tests.support.estargz_images import EStargzImage


def _raw(sock_path: str, frames: list[bytes]) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    try:
        for f in frames:
            s.sendall(f)
        return [wire.recv_frame(s) for _ in frames]
    finally:
        s.close()


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_hostile_messages_get_error_replies(daemon: DaemonProc) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    digest = "sha256:" + "0" * 64
    cases = [
        (_frame([1, 2, 3]), "invalid_request"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "invalid_request"),
        (_frame({"id": 1, "op": "nope", "args": {}}), "unknown_op"),
        (_frame({"id": 2, "op": "mount", "args": {"ref": 5}}), "invalid_request"),
        (_frame({"id": 3, "op": "mount", "args": "x"}), "invalid_request"),
        (_frame({"op": "status"}), "invalid_request"),
        (_frame({"id": 4, "op": "fetch", "args": {"layer_digest": digest, "chunks": [[0, 0]] * 5000}}),
         "invalid_request"),
        (_frame({"id": 5, "op": "fetch", "args": {"layer_digest": digest, "chunks": [[0, 0]]}}), "not_found"),
        (_frame({"id": 6, "op": "fetch", "args": {"layer_digest": "../x", "chunks": [[0, 0]]}}), "invalid_request"),
        (_frame({"id": 7, "op": "unmount", "args": {"mountpoint": "/" + "a" * 10000}}), "invalid_request"),
        (_frame({"id": 8, "op": "unmount", "args": {"mountpoint": "/nowhere"}}), "not_found"),
        (_frame({"id": 9, "op": "cache", "args": {"action": "explode"}}), "invalid_request"),
        (_frame({"id": 10, "op": "status", "args": {"extra": 1}}), "invalid_request"),
        (_frame({"id": 11, "op": "mount", "args": {"ref": "x", "layer_digest": digest, "mountpoint": "/nonexistent/dir"}}),
         "invalid_request"),
        (_frame({"id": True, "op": "status", "args": {}}), "invalid_request"),
        (struct.pack(">I", 200001) + b"\x91" * 200000 + b"\xc0", "invalid_request"),  # nesting bomb
        (_frame({"id": 12, "op": "fallback", "args": {"ref": "r", "layer_digest": digest, "reason": "x" * 5000}}),
         "invalid_request"),
    ]
    replies = _raw(daemon.socket, [f for f, _ in cases])
    by_id = {}
    for r in replies:
        assert r["ok"] is False
        by_id.setdefault(r["id"], []).append(r["error"]["code"])
    got = sorted(code for codes in by_id.values() for code in codes)
    assert got == sorted(code for _, code in cases)
    assert by_id[1] == ["unknown_op"] and by_id[5] == ["not_found"] and by_id[8] == ["not_found"]
    # A length prefix over the limit: an error reply, then the connection ends.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(daemon.socket)
    s.sendall(struct.pack(">I", 0xFFFFFFF0))
    reply = wire.recv_frame(s)
    assert reply["error"]["code"] == "invalid_request"
    assert s.recv(1) == b""
    s.close()
    # Half a frame and a hang-up do not hurt either.
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    s.sendall(struct.pack(">I", 100) + b"abc")
    s.close()
    with daemon.client() as c:
        assert c.status().pid == daemon.proc.pid


def test_message_validation() -> None:
    with pytest.raises(ApiError, match="chunks"):
        FetchArgs.from_args({"layer_digest": "sha256:" + "a" * 64, "chunks": []})
    with pytest.raises(ApiError, match="offsets must not be negative"):
        FetchArgs.from_args({"layer_digest": "sha256:" + "a" * 64, "chunks": [[-1, 0]]})
    with pytest.raises(ApiError, match="priority"):
        FetchArgs.from_args({"layer_digest": "sha256:" + "a" * 64, "chunks": [[0, 0]], "priority": "urgent"})
    with pytest.raises(ApiError, match="mountpoint"):
        MountArgs.from_args({"ref": "r", "layer_digest": "sha256:" + "a" * 64, "mountpoint": "relative"})
    with pytest.raises(ApiError, match="missing field ref"):
        MountArgs.from_args({"layer_digest": "sha256:" + "a" * 64, "mountpoint": "/m"})
    args = MountArgs.from_args({"ref": "r", "layer_digest": "sha256:" + "a" * 64, "mountpoint": "/m"})
    assert args.toc_digest is None and MountArgs.from_args(args.to_dict()) == args


@pytest.mark.parametrize("text,key", [
    ("workerz = 2", "workerz"),
    ("workers = \"two\"", "workers"),
    ("cache_size = 1.5", "cache_size"),
    ("[registry]\ntimeout = \"slow\"", "registry.timeout"),
    ("[registry]\nbogus = 1", "registry.bogus"),
    ("workers = 0", "workers"),
    ("fuse_backend = \"fuse2\"", "fuse_backend"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(cfg), "--root",
                        str(tmp_path / "root"), "--socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert key in r.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "s.sock").exists()


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(tmp_path / "none.toml"),
                        "--root", str(tmp_path / "root")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_lazyctl_mount_status_check_umount(daemon: DaemonProc, busybox: EStargzImage) -> None:
    layer = busybox.layers[0]
    mp = daemon.mountpoint("cli")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["lazyctl", *args, "--socket", daemon.socket], capture_output=True, text=True,
                              timeout=120)

    r = ctl("mount", busybox.ref, layer.digest, str(mp), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["toc_digest"] == layer.toc_digest
    assert (mp / "etc/hello.txt").read_text() == "hello from lazyd\n"
    r = ctl("status", "--json")
    st = json.loads(r.stdout)
    (m,) = st["mounts"]
    assert m["mountpoint"] == str(mp) and m["layer"]["layer_size"] == layer.size and m["reads"] >= 1
    assert st["cache"]["limit"] == 1073741824 and st["totals"]["registry_requests"] >= 2
    r = ctl("status")
    assert r.returncode == 0 and "MOUNTPOINT" in r.stdout and str(mp) in r.stdout
    r = ctl("check", str(mp))
    assert r.returncode == 0 and "reachable" in r.stdout
    r = ctl("mount", busybox.ref, layer.digest, str(mp))
    assert r.returncode == 1 and "already_exists" in r.stderr
    r = ctl("cache", "stats", "--json")
    assert json.loads(r.stdout)["count"] > 0
    assert ctl("umount", str(mp)).returncode == 0
    assert not os.path.ismount(mp)
    r = ctl("cache", "evict", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["count"] == 0
    with Client(daemon.socket) as c:
        c.fallback(busybox.ref, layer.digest, "not eStargz")
        st2 = c.status()
        assert st2.totals.fallbacks == 1 and st2.fallbacks[0].reason == "not eStargz"


def test_not_estargz_layer(daemon: DaemonProc, registry, tmp_path: Path) -> None:
    """A plain gzip layer (no footer/TOC) is reported as not_estargz."""
    import gzip
    import hashlib

    from tests.support.estargz_images import EStargzLayer, push_layers

    blob = tmp_path / "plain.tar.gz"
    blob.write_bytes(gzip.compress(b"\0" * 10240))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    fake = EStargzLayer(blob, blob, digest, blob.stat().st_size, "sha256:" + "1" * 64, digest, 10240)
    image = push_layers(registry.host, "plain:t", [fake])
    with daemon.client() as c:
        with pytest.raises(ApiError) as exc:
            c.mount(image.ref, digest, str(daemon.mountpoint("plain")))
        assert exc.value.code == "not_estargz"


def test_resolve_returns_the_registrys_bytes(daemon: DaemonProc, busybox: EStargzImage) -> None:
    """``resolve`` hands a client the manifest and config exactly as the registry serves them."""
    from lazyd.registry.reference import Reference
    from lazyd.registry.types import Image

    with daemon.client() as c:
        r = c.request("resolve", {"ref": busybox.ref})
        image = Image.from_raw(Reference.parse(busybox.ref), r.manifest, r.manifest_media_type, r.manifest_digest,
                               r.config)
        assert [d.digest for d in image.layers] == [layer.digest for layer in busybox.layers]
        assert r.ref == f"{busybox.ref}@{r.manifest_digest}" and r.index_digest is None
        with pytest.raises(ApiError) as exc:
            c.request("resolve", {"ref": busybox.ref.rsplit(":", 1)[0] + ":no-such-tag"})
        assert exc.value.code == "not_found" and "no-such-tag" in exc.value.message
        with pytest.raises(ApiError) as exc:
            c.request("resolve", {"ref": "UPPER/case:x"})
        assert exc.value.code == "invalid_request" and exc.value.message.startswith("ref:")
