"""Profile prefetch in a real ``lazyd serve`` (registry, FUSE workers), checked from the outside
through a proxy that logs every range request: which chunks a profile fetches before the mount
returns, in how many requests, that reads then need nothing more, and that profiles for other
images or damaged ones leave a normal lazy pull."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyd.estargz import BuildOptions, open_file
from lazyd.profile import artifact
from lazyd.profile.records import Record, dumps
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from lazyd.registry.types import digest_of
from tests.daemon.conftest import DaemonProc, daemon_factory, registry  # noqa: F401 (fixtures)
from tests.e2e.rangeproxy import RangeLogProxy
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.registry import Registry

SMALL = 60  # small files app/small/f000..f059, next to each other in the blob
CONFIG = 'profiles = "{mode}"\nprefetch_wait = true\nbackground_fetch = false\nprefetch_timeout = 30.0\n'


def _content(i: int, size: int) -> bytes:
    return os.urandom(size // 2) + (f"file {i} " * size)[: size - size // 2].encode()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    out = {f"app/small/f{i:03d}": _content(i, 3000) for i in range(SMALL)}
    out["app/big.bin"] = os.urandom(1 << 20)
    out["app/after/x.py"] = _content(99, 5000)
    return out


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for d in ("app", "app/small", "app/after"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        names = sorted(files)
        order = [n for n in names if n.startswith("app/small/f0") and n < "app/small/f030"] + ["app/big.bin"] + [
            n for n in names if n.startswith("app/small/") and n >= "app/small/f030"] + ["app/after/x.py"]
        for name in order:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o644
            tar.addfile(info, io.BytesIO(files[name]))
        link = tarfile.TarInfo("app/hardlink")
        link.type, link.linkname = tarfile.LNKTYPE, "app/small/f045"
        tar.addfile(link)
        sym = tarfile.TarInfo("app/symlink")
        sym.type, sym.linkname = tarfile.SYMTYPE, "small/f046"
        tar.addfile(sym)
    return path


@pytest.fixture(scope="module")
def images(registry: Registry, files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
           ) -> dict[str, EStargzImage]:
    """``plain``: no prioritized files; ``landmark``: f000..f004 before the landmark; ``other``: another image."""
    work = tmp_path_factory.mktemp("profile-images")
    tar = _tar(work / "layer.tar", files)
    plain = build_layers([tar], work / "plain")
    landmark = build_layers([tar], work / "landmark",
                            BuildOptions(prioritized=[f"app/small/f{i:03d}" for i in range(5)]))
    other = build_layers([tar], work / "other", BuildOptions(chunk_size=64 * 1024))
    return {"plain": push_layers(registry.host, "profiled-small:plain", plain),
            "landmark": push_layers(registry.host, "profiled-small:landmark", landmark),
            "other": push_layers(registry.host, "profiled-other:t", other)}


@pytest.fixture
def proxy(registry: Registry) -> Iterator[RangeLogProxy]:  # noqa: F811
    with RangeLogProxy(registry.host) as p:
        yield p


def via(ref: str, proxy: RangeLogProxy) -> str:
    return f"{proxy.host}/{ref.split('/', 1)[1]}"


def members_of(blob: Path, names: list[str]) -> set[tuple[int, int]]:
    """(start, end) of the gzip members holding ``names``' chunks (hardlinks resolved)."""
    with open_file(blob) as reader:
        out = set()
        for name in names:
            entry = reader.toc.lookup(name)
            assert entry is not None and entry.type == "reg", name
            for c in entry.chunks:
                out.add((c.blob_offset, c.blob_end))
        return out


def covered(fetched: list[tuple[int, int]], spans: set[tuple[int, int]]) -> bool:
    """Every [start, end) span lies inside some fetched inclusive (a, b) range."""
    return all(any(a <= s and e - 1 <= b for a, b in fetched) for s, e in spans)


def profile_fetches(proxy: RangeLogProxy, digest: str, blob_size: int) -> list[tuple[tuple[int, int], ...]]:
    """The range GETs of the layer other than the first one (footer and TOC, at the blob's end)."""
    out = []
    for f in proxy.blob_fetches(digest):
        assert f.ranges is not None, "a whole-blob GET"
        if len(f.ranges) == 1 and f.ranges[0][1] == blob_size - 1:
            continue  # the tail: footer + TOC
        out.append(f.ranges)
    return out


def put_profile(d: DaemonProc, digest: str, recs: list[Record]) -> None:
    with d.client() as c:
        c.request("profile_put", {"manifest_digest": digest, "records": dumps(recs).encode()})


def mount_status(d: DaemonProc, mp: Path) -> dict:
    with d.client() as c:
        st = c.status().to_dict()
    (m,) = [m for m in st["mounts"] if m["mountpoint"] == str(mp)]
    return m


def test_profile_prefetch_coalesced_before_the_mount_returns(
        daemon_factory, images: dict[str, EStargzImage], files: dict[str, bytes],  # noqa: F811
        proxy: RangeLogProxy) -> None:
    image = images["plain"]
    layer = image.layers[0]
    profiled = [f"app/small/f{i:03d}" for i in range(32, 56)]  # 24 neighbours
    foreign = "sha256:" + "9" * 64
    recs = ([Record(p, image.manifest_digest, 0) for p in profiled]
            + [Record("app/hardlink", image.manifest_digest, 0), Record("app/symlink", image.manifest_digest, 0),
               Record("app/small", image.manifest_digest, 0), Record("app/after/x.py", foreign, 0)])
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    put_profile(d, image.manifest_digest, recs)
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "plain")
    fetches = profile_fetches(proxy, layer.digest, layer.size)
    spans = members_of(layer.blob, profiled + ["app/small/f045"])
    # 24 files (the hardlink's target among them) in ONE request of one range: they are neighbours.
    assert len(fetches) == 1 and len(fetches[0]) == 1, fetches
    assert covered(list(fetches[0]), spans)
    m = mount_status(d, mp)
    # 24 files and the hardlink to one of them; the symlink and the directory are no regular files
    assert (m["profile"], m["profile_source"], m["profile_files"]) == (image.manifest_digest, "local", 25)
    assert m["profile_bytes"] == sum(e - s for s, e in spans) > 0
    assert m["layer"]["demand_bytes"] == 0 and m["layer"]["prefetch_bytes"] == m["profile_bytes"]
    log = d.log.read_text()
    assert "2 path(s) not regular files of the layer" in log
    assert "1 record(s) for other manifests skipped" in log
    table = _lazyctl("status", "--socket", d.socket)
    assert f"local:{image.manifest_digest[7:19]} 25f" in table and "PROFILE" in table
    # Reading the profiled files now needs no request at all.
    before = len(proxy.blob_fetches(layer.digest))
    for p in profiled:
        assert (mp / p).read_bytes() == files[p]
    assert (mp / "app/hardlink").read_bytes() == files["app/small/f045"]
    assert len(proxy.blob_fetches(layer.digest)) == before
    assert mount_status(d, mp)["layer"]["demand_bytes"] == 0
    # The rest is read lazily, and right.
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name
    assert mount_status(d, mp)["layer"]["demand_bytes"] > 0


def test_scattered_files_are_fetched_in_far_fewer_requests_than_files(
        daemon_factory, images: dict[str, EStargzImage], files: dict[str, bytes],  # noqa: F811
        proxy: RangeLogProxy) -> None:
    """Every other small file on both sides of a 1 MiB file: the small gaps are fetched along
    (one range per side), the big one is not; all ranges go in one multi-range request."""
    image = images["plain"]
    layer = image.layers[0]
    profiled = [f"app/small/f{i:03d}" for i in range(0, SMALL, 2)]  # 30 files, 29 gaps
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    put_profile(d, image.manifest_digest, [Record(p, image.manifest_digest, 0) for p in profiled])
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "scattered")
    fetches = profile_fetches(proxy, layer.digest, layer.size)
    assert len(fetches) == 1, fetches  # one request for 30 files
    (ranges,) = fetches
    assert len(ranges) == 2, ranges  # f000..f028 and f030..f058: app/big.bin between them is left out
    assert covered(list(ranges), members_of(layer.blob, profiled))
    big = members_of(layer.blob, ["app/big.bin"])
    assert not covered(list(ranges), big)
    for p in profiled:
        assert (mp / p).read_bytes() == files[p]
    assert mount_status(d, mp)["layer"]["demand_bytes"] == 0


def test_profile_and_landmark_prefetch_share_one_request_and_no_byte(
        daemon_factory, images: dict[str, EStargzImage], proxy: RangeLogProxy) -> None:  # noqa: F811
    image = images["landmark"]
    layer = image.layers[0]
    profiled = [f"app/small/f{i:03d}" for i in range(3, 12)]  # f003, f004 are before the landmark too
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    put_profile(d, image.manifest_digest, [Record(p, image.manifest_digest, 0) for p in profiled])
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "landmark")
    fetches = profile_fetches(proxy, layer.digest, layer.size)
    assert len(fetches) == 1, fetches
    ranges = sorted(fetches[0])
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), "a byte asked for twice"
    landmark = members_of(layer.blob, [f"app/small/f{i:03d}" for i in range(5)])
    assert covered(ranges, landmark | members_of(layer.blob, profiled))
    m = mount_status(d, mp)
    assert m["layer"]["prefetch_bytes"] == sum(b - a + 1 for a, b in ranges)
    assert m["profile_files"] == len(profiled)


def test_profile_for_another_image_is_ignored(
        daemon_factory, images: dict[str, EStargzImage], files: dict[str, bytes],  # noqa: F811
        proxy: RangeLogProxy) -> None:
    image, other = images["plain"], images["other"]
    layer = image.layers[0]
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    # A profile stored for the other image (whose records name that image) does not apply here.
    put_profile(d, other.manifest_digest, [Record(f"app/small/f{i:03d}", other.manifest_digest, 0)
                                           for i in range(10)])
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "other")
    assert profile_fetches(proxy, layer.digest, layer.size) == []
    m = mount_status(d, mp)
    assert m["profile"] is None and m["profile_bytes"] == 0
    assert (mp / "app/small/f003").read_bytes() == files["app/small/f003"]


def test_damaged_local_profile_is_one_log_line_and_a_normal_lazy_pull(
        daemon_factory, images: dict[str, EStargzImage], files: dict[str, bytes],  # noqa: F811
        proxy: RangeLogProxy) -> None:
    image = images["plain"]
    layer = image.layers[0]
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    put_profile(d, image.manifest_digest, [Record("app/small/f001", image.manifest_digest, 0)])
    stored = d.root / "profiles" / f"{image.manifest_digest.split(':')[1]}.jsonl"
    stored.write_bytes(b'{"path": "app/small/f001", "layerIndex": 0}\n{"path": \n')  # damaged on disk
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "damaged")
    lines = [line for line in d.log.read_text().splitlines() if "ignoring the local profile" in line]
    assert len(lines) == 1, lines
    assert image.manifest_digest in lines[0] and "line 2: not JSON" in lines[0]
    assert profile_fetches(proxy, layer.digest, layer.size) == []
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name
    assert mount_status(d, mp)["profile"] is None


def _push_profile(image: EStargzImage, reg: Registry, data: bytes) -> artifact.PushResult:
    async def go() -> artifact.PushResult:
        async with RegistryClient(RegistryConfig()) as client:
            ref = Reference.parse(image.ref)
            return await artifact.push(client, ref, data, await artifact.subject_of(client, ref))
    return asyncio.run(go())


def test_registry_profile_is_pulled_on_mount_and_stored(
        daemon_factory, registry: Registry, images: dict[str, EStargzImage],  # noqa: F811
        files: dict[str, bytes], proxy: RangeLogProxy) -> None:
    image = images["landmark"]
    layer = image.layers[0]
    profiled = [f"app/small/f{i:03d}" for i in range(40, 50)]
    data = dumps([Record(p, image.manifest_digest, 0) for p in profiled]).encode()
    pushed = _push_profile(image, registry, data)
    assert pushed.method == "referrers-tag"
    d = daemon_factory(extra=CONFIG.format(mode="registry")).start()
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "reg")
    with d.client() as c:
        assert c.request("profile_get", {"manifest_digest": image.manifest_digest}).records == data
    m = mount_status(d, mp)
    assert (m["profile"], m["profile_source"], m["profile_files"]) == (image.manifest_digest, "registry", 10)
    assert covered([r for f in profile_fetches(proxy, layer.digest, layer.size) for r in f],
                   members_of(layer.blob, profiled))
    for p in profiled:
        assert (mp / p).read_bytes() == files[p]
    assert mount_status(d, mp)["layer"]["demand_bytes"] == 0
    assert f"pulled profile {pushed.digest}" in d.log.read_text()


def test_damaged_registry_profile_is_one_log_line_and_a_normal_lazy_pull(
        daemon_factory, registry: Registry, images: dict[str, EStargzImage],  # noqa: F811
        files: dict[str, bytes], proxy: RangeLogProxy) -> None:
    image = images["other"]
    layer = image.layers[0]
    # Padded past artifact.MAX_EMBEDDED, so the records are a blob of their own, fetched and verified
    # (small ones are embedded in the manifest, whose digest the client checks).
    data = dumps([Record(f"app/small/f{i:03d}", image.manifest_digest, 0) for i in range(3)]
                 + [Record(f"app/padding/p{i:04d}", image.manifest_digest, 0) for i in range(400)]).encode()
    assert len(data) > artifact.MAX_EMBEDDED
    _push_profile(image, registry, data)
    blob = registry.blob_path(digest_of(data))
    blob.write_bytes(blob.read_bytes().replace(b"f001", b"f00X"))  # corrupt the records blob in the registry
    d = daemon_factory(extra=CONFIG.format(mode="registry")).start()
    mp = d.mount_layer(via(image.ref, proxy), image.layers[0], "regdamaged")
    lines = [line for line in d.log.read_text().splitlines() if "ignoring the registry profile" in line]
    assert len(lines) == 1, lines
    assert image.manifest_digest in lines[0] and "does not match its digest" in lines[0]
    assert not (d.root / "profiles" / f"{image.manifest_digest.split(':')[1]}.jsonl").exists()
    assert profile_fetches(proxy, layer.digest, layer.size) == []
    for name, content in files.items():
        assert (mp / name).read_bytes() == content, name
    assert mount_status(d, mp)["profile"] is None


def _lazyctl(*args: str) -> str:
    proc = subprocess.run(["lazyctl", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"lazyctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_lazyctl_import_push_pull_show_round_trip(
        daemon_factory, registry: Registry, images: dict[str, EStargzImage], tmp_path: Path) -> None:  # noqa: F811
    image = images["plain"]
    recs = [Record(f"app/small/f{i:03d}", image.manifest_digest, 0) for i in (7, 3, 5)]
    record_file = tmp_path / "record.jsonl"
    record_file.write_text(dumps(recs))
    a = daemon_factory("a", extra=CONFIG.format(mode="local")).start()
    b = daemon_factory("b", extra=CONFIG.format(mode="local")).start()
    ref = image.ref
    imported = json.loads(_lazyctl("profile", "import", ref, str(record_file), "--socket", a.socket, "--json"))
    assert (imported["manifest_digest"], imported["records"]) == (image.manifest_digest, 3)
    pushed = json.loads(_lazyctl("profile", "push", ref, "--plain-http", "--socket", a.socket, "--json"))
    assert pushed["method"] == "referrers-tag"  # distribution 2.8 has no referrers API
    assert pushed["tag"] == "sha256-" + image.manifest_digest.split(":")[1]
    assert pushed["subject"] == image.manifest_digest
    pulled = json.loads(_lazyctl("profile", "pull", ref, "--plain-http", "--socket", b.socket, "--json"))
    assert (pulled["method"], pulled["artifact_digest"]) == ("referrers-tag", pushed["artifact_digest"])
    assert _lazyctl("profile", "show", ref, "--plain-http", "--socket", b.socket) == record_file.read_text()
    assert _lazyctl("profile", "show", image.manifest_digest, "--socket", b.socket) == record_file.read_text()
    listed = json.loads(_lazyctl("profile", "list", "--socket", b.socket, "--json"))["profiles"]
    assert [(p["manifest_digest"], p["records"], p["layers"]) for p in listed] == [(image.manifest_digest, 3, 1)]
    _lazyctl("profile", "delete", image.manifest_digest, "--socket", b.socket)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a", "layerIndex": 0}\n{"path": "b"}\n')
    proc = subprocess.run(["lazyctl", "profile", "import", image.manifest_digest, str(bad), "--socket", b.socket],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "record for 'b' has no layerIndex" in proc.stderr, proc.stderr
    assert json.loads(_lazyctl("profile", "list", "--socket", b.socket, "--json"))["profiles"] == []


def test_profile_of_the_largest_size_travels_over_the_socket(daemon_factory, images: dict[str, EStargzImage]  # noqa: F811
                                                             ) -> None:
    from lazyd.api.messages import ApiError
    from lazyd.profile.store import MAX_PROFILE_BYTES

    image = images["plain"]
    line = ('{"path":"usr/share/some/long/path/to/a/file/%06d.py","layerIndex":0}\n' % 0).encode()
    n = MAX_PROFILE_BYTES // len(line)
    data = b"".join(line.replace(b"000000", b"%06d" % i) for i in range(n))
    assert MAX_PROFILE_BYTES - len(line) < len(data) <= MAX_PROFILE_BYTES
    d = daemon_factory(extra=CONFIG.format(mode="local")).start()
    with d.client() as c:
        summary = c.request("profile_put", {"manifest_digest": image.manifest_digest, "records": data})
        assert (summary.records, summary.size) == (n, len(data))
        assert c.request("profile_get", {"manifest_digest": image.manifest_digest}).records == data
        with pytest.raises(ApiError) as err:
            c.request("profile_put", {"manifest_digest": image.manifest_digest, "records": data + line})
        assert err.value.code == "invalid_request" and "exceed" in err.value.message
        with pytest.raises(ApiError, match="not_found"):
            c.request("profile_get", {"manifest_digest": "sha256:" + "0" * 64})
        assert c.request("profile_get", {"manifest_digest": image.manifest_digest}).records == data  # unchanged
