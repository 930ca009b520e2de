"""Memory of the fetcher: what a mounted layer costs, what background fetch adds, TOC bombs,
and the layer table's garbage collection.

Bounds (docs/design.md, "Fetcher memory"): a mounted layer costs the fetcher at most
``ENTRY_BOUND`` bytes of RSS per TOC entry, and a background fetch of every layer adds at
most ``BACKGROUND_BOUND`` (the store threads' SQLite connections and malloc arenas, whatever
the number of entries).  The tests fail at twice these bounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pytest

from lazyd.api.messages import ApiError
from lazyd.cache.store import ChunkStore
from lazyd.estargz import BuildOptions, footer_bytes
from lazyd.fetcher import layers as layers_module
from lazyd.fetcher.layers import INDEX_FILE, ChunkIndex, ChunkIndexError, LayerTable, Member, layer_dir
from lazyd.fetcher.scheduler import TRIM_AFTER, Scheduler
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.daemon.conftest import DaemonProc, via
from tests.support.estargz_images import EStargzImage, EStargzLayer, build_layers, push_layers
from tests.support.lazyd import cached_chunks
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.tars import small_files_tar
from tests.support.tcpproxy import TCPProxy

ENTRY_BOUND = 1024
"""Fetcher RSS per mounted TOC entry, in bytes (measured: about 280)."""
BACKGROUND_BOUND = 24 << 20
"""Fetcher RSS that a background fetch of every mounted layer may add (measured: 10-19 MiB
for 20,000-100,000 entries, the same at any count: nothing is kept per chunk fetched)."""
PEAK_BOUND = 256 << 20
"""Fetcher peak RSS while it refuses a TOC bomb."""
LAYERS = 12
FILES = 2000


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _files_tar(path: Path, files: int, seed: int) -> Path:
    """``files`` small files (200 B to 3 kB, a third random) in 40 directories."""
    return small_files_tar(path, files, seed, dirs=40, dir_name="usr/lib/pkg{d:02d}",
                           file_name="usr/lib/pkg{d:02d}/module_{i:05d}.py", random_part=3, text="{seed} file {i} ")


@pytest.fixture(scope="module")
def many(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """``LAYERS`` layers of ``FILES`` small files each, pushed as memory-many:t."""
    work = tmp_path_factory.mktemp("memory-many")
    layers = []
    for i in range(LAYERS):
        layers += build_layers([_files_tar(work / f"{i}.tar", FILES, i)], work / f"esgz{i}",
                               BuildOptions(workers=1))
    return push_layers(registry.host, "memory-many:t", layers)


def test_fetcher_rss_per_entry_and_after_background_fetch(daemon_factory, many: EStargzImage) -> None:
    d: DaemonProc = daemon_factory(extra="background_delay = 5.0\nprefetch = false")
    d.start()
    pid = d.proc.popen.pid
    time.sleep(1.0)
    idle = _status_kib(pid, "VmRSS") * 1024
    d.mount_layers(many, "m")
    mounted = _status_kib(pid, "VmRSS") * 1024
    entries = sum(len(json.loads(p.read_bytes())["entries"]) for p in d.root.glob("layers/*/toc.json"))
    chunks = sum(len(ChunkIndex.loads((p.parent / INDEX_FILE).read_bytes(), json.loads(
        (p.parent / "meta.json").read_bytes())["toc_digest"]).c_inner) for p in d.root.glob("layers/*/toc.json"))
    assert entries > LAYERS * FILES
    per_entry = (mounted - idle) / entries
    wait_until(lambda: cached_chunks(d.root) >= chunks, 300, "the background fetch of every layer", interval=0.5)
    time.sleep(TRIM_AFTER + 1.5)
    fetched = _status_kib(pid, "VmRSS") * 1024
    grown = fetched - mounted
    print(f"fetcher RSS: idle {idle / 2**20:.1f} MiB, {entries} entries mounted {mounted / 2**20:.1f} MiB "
          f"({per_entry:.0f} B/entry), after background fetch {fetched / 2**20:.1f} MiB (+{grown / 2**20:.1f} MiB)")
    assert per_entry < 2 * ENTRY_BOUND, f"{per_entry:.0f} bytes of fetcher RSS per mounted TOC entry"
    assert grown < 2 * BACKGROUND_BOUND, f"background fetch grew the fetcher by {grown / 2**20:.1f} MiB"
    with d.client() as c:
        st = c.status()
    assert {m.layer.background_state for m in st.mounts} == {"done"}


def _zeros_member(header_size: int, inflated: int) -> bytes:
    """A TOC member whose tar header announces ``header_size`` bytes, followed by
    ``inflated`` zero bytes: about 1 MB of gzip per GiB."""
    info = tarfile.TarInfo("stargz.index.json")
    info.size = header_size
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(info.tobuf())]
    block = bytes(1 << 20)
    for _ in range(inflated >> 20):
        out.append(c.compress(block))
    out.append(c.flush())
    return b"".join(out)


def _push_blob(registry: Registry, work: Path, name: str, blob: bytes, toc_digest: str) -> EStargzImage:
    import hashlib

    path = work / f"{name}.blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    layer = EStargzLayer(path, path, digest, len(blob), toc_digest, digest, len(blob))
    return push_layers(registry.host, f"{name}:t", [layer])


def test_toc_bomb_is_refused_under_the_peak_bound(daemon_factory, registry: Registry, tmp_path: Path) -> None:
    """1 MB TOC members inflating to 1 GiB (one with an honest tar header, one announcing the
    largest JSON accepted): refused, the fetcher's peak RSS stays under ``PEAK_BOUND``."""
    from lazyd.estargz.toc import MAX_TOC_JSON_SIZE

    wrong = "sha256:" + "0" * 64
    honest = _push_blob(registry, tmp_path, "bomb-honest", _zeros_member(1 << 30, 1 << 30) + footer_bytes(0), wrong)
    lying = _push_blob(registry, tmp_path, "bomb-lying", _zeros_member(MAX_TOC_JSON_SIZE, 1 << 30) + footer_bytes(0),
                       wrong)
    d: DaemonProc = daemon_factory().start()
    with d.client() as c:
        for image, why in ((honest, "larger than"), (lying, "goes on for more than")):
            with pytest.raises(ApiError, match=why) as exc:
                c.mount(image.ref, image.layers[0].digest, str(d.mountpoint(image.ref.rsplit("/", 1)[1][:10])),
                        image.layers[0].toc_digest)
            assert exc.value.code == "not_estargz"
    peak = _status_kib(d.proc.popen.pid, "VmHWM") * 1024
    print(f"fetcher peak RSS after refusing two TOC bombs: {peak / 2**20:.1f} MiB")
    assert peak < PEAK_BOUND, f"fetcher peak RSS {peak / 2**20:.1f} MiB refusing TOC bombs"


def test_hostile_footer_is_refused_before_fetching_the_toc(daemon_factory, registry: Registry, tmp_path: Path,
                                                           proxy: TCPProxy) -> None:
    """A footer putting the TOC at offset 0 of a 64 MiB blob: refused after the tail request."""
    from lazyd.estargz.toc import MAX_TOC_MEMBER_SIZE

    blob = random.Random(5).randbytes(64 << 20)
    image = _push_blob(registry, tmp_path, "hostile-footer", blob + footer_bytes(0), "sha256:" + "0" * 64)
    digest = image.layers[0].digest
    d: DaemonProc = daemon_factory().start()
    with d.client() as c, pytest.raises(ApiError, match=f"is larger than {MAX_TOC_MEMBER_SIZE}"):
        c.mount(via(image.ref, proxy), digest, str(d.mountpoint("hostile")), image.layers[0].toc_digest)
    assert len(proxy.range_requests(digest)) == 1, "only the tail was fetched"
    assert proxy.bytes_down < 2 << 20


def _table(tmp_path: Path, name: str) -> tuple[RegistryClient, LayerTable]:
    client = RegistryClient(RegistryConfig(hosts_dir=str(tmp_path / "certs.d"), retries=0))
    return client, LayerTable(tmp_path / name, client)


def test_chunk_index_keeps_what_the_scheduler_needs(tmp_path: Path, busybox: EStargzImage) -> None:
    """The packed index gives the members, chunks and prefetch end of the TOC; it survives a
    dump and load, and a damaged or foreign dump is refused."""
    async def run() -> None:
        client, table = _table(tmp_path, "r")
        try:
            layer = await table.open(Reference.parse(busybox.ref), busybox.layers[0].digest,
                                     busybox.layers[0].toc_digest, 30)
        finally:
            await client.close()
        toc = layer.read_toc()
        assert layer.prefetch_end == toc.prefetch_end is not None
        chunks = [c for m in layer.members for c in m.chunks]
        assert chunks == toc.chunks
        assert len(layer.by_chunk) == len(toc.chunks)
        for c in toc.chunks:
            member = layer.member_of(c.blob_offset, c.inner_offset)
            assert member is not None and member.blob_offset == c.blob_offset and member.blob_end == c.blob_end
        assert layer.member_of(toc.chunks[0].blob_offset + 1, 0) is None
        assert layer.members.before(layer.prefetch_end) == [m for m in layer.members
                                                             if m.blob_offset < layer.prefetch_end]
        dump = layer.index.dumps(layer.meta.toc_digest)
        again = ChunkIndex.loads(dump, layer.meta.toc_digest)
        assert [c for i in range(len(again)) for c in Member.at(again, i).chunks] == toc.chunks
        with pytest.raises(ChunkIndexError, match="not of TOC"):
            ChunkIndex.loads(dump, "sha256:" + "1" * 64)
        with pytest.raises(ChunkIndexError):
            ChunkIndex.loads(dump[: len(dump) // 2], layer.meta.toc_digest)
        assert Member(10, 20) == Member(10, 20) and Member(10, 20).chunks == ()

    asyncio.run(run())


def test_load_runs_off_the_loop_and_falls_back_to_the_toc(tmp_path: Path, busybox: EStargzImage) -> None:
    async def run() -> None:
        client, table = _table(tmp_path, "r")
        ref = Reference.parse(busybox.ref)
        try:
            layer = await table.open(ref, busybox.layers[0].digest, busybox.layers[0].toc_digest, 30)
        finally:
            await client.close()
        digest = layer.digest
        client2, fresh = _table(tmp_path, "r")
        threads: list[int] = []
        real = fresh._load

        def spy(d: str):  # noqa: ANN202
            threads.append(threading.get_ident())
            return real(d)

        fresh._load = spy  # type: ignore[method-assign]
        try:
            index_file = layer_dir(tmp_path / "r", digest) / INDEX_FILE
            index_file.unlink()  # an older lazyd's directory: the TOC is parsed, the index written again
            loaded = await fresh.load(digest)
            assert loaded is not None and threads and threads[0] != threading.get_ident()
            assert [c for m in loaded.members for c in m.chunks] == [c for m in layer.members for c in m.chunks]
            assert index_file.exists()
            assert await fresh.load("sha256:" + "2" * 64) is None
        finally:
            await client2.close()

    asyncio.run(run())


def test_collect_forgets_unused_layers(tmp_path: Path, busybox: EStargzImage, many: EStargzImage,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``collect`` drops unused layers from memory (at most MAX_UNUSED_LAYERS stay), and deletes
    the directory of an unused layer only once the store holds none of its chunks."""
    async def run() -> None:
        client, table = _table(tmp_path, "r")
        store = ChunkStore(tmp_path / "r" / "cache", 1 << 30)
        sched = Scheduler(client, store, 4, 16 << 20)
        try:
            opened = []
            for image in (busybox, many):
                for layer in image.layers[:2]:
                    opened.append(await table.open(Reference.parse(image.ref), layer.digest, layer.toc_digest, 30))
            mounted, cached, bare, recent = opened
            await sched.fetch(cached, list(cached.members)[:3], "background")

            def has_chunks(digest: str) -> bool:
                return store.layer_usage(digest)[0] > 0

            recent.used = time.monotonic()
            for layer in (mounted, cached, bare):
                layer.used -= 3600
                os.utime(layer_dir(tmp_path / "r", layer.digest) / "meta.json", (0, 0))
            deleted = await table.collect({mounted.digest}, has_chunks, idle=600)
            assert deleted == [bare.digest]
            assert not layer_dir(tmp_path / "r", bare.digest).exists()
            assert {layer.digest for layer in table.all()} == {mounted.digest, recent.digest}
            assert layer_dir(tmp_path / "r", cached.digest).exists(), "its chunks are still stored"
            reloaded = table.get(cached.digest)
            assert reloaded is not None and len(reloaded.members) == len(cached.members)
            # The bound on unused layers kept in memory, whatever their age.
            monkeypatch.setattr(layers_module, "MAX_UNUSED_LAYERS", 1)
            reloaded.used = time.monotonic()
            recent.used = time.monotonic() - 10
            assert await table.collect({mounted.digest}, has_chunks, idle=600) == []
            assert {layer.digest for layer in table.all()} == {mounted.digest, cached.digest}
            # Once the store dropped its chunks, the directory goes too.
            await sched.in_store_thread(store.evict, cached.digest)
            deleted = await table.collect({mounted.digest}, has_chunks, idle=0)
            assert cached.digest in deleted and mounted.digest not in deleted
            assert table.get(mounted.digest) is mounted
        finally:
            sched.close()
            await client.close()
            store.close()

    asyncio.run(run())
