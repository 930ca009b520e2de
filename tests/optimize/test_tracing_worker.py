"""The tracing worker: started for ``mount`` with ``trace``, never used for other mounts, adopted by a
restarted fetcher, stopped once it serves nothing; ``trace`` gives first opens in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyd.api.messages import ApiError
from lazyd.registry import Reference
from tests.support.lazyd import start_lazyd
from tests.support.procs import wait_until

from .conftest import OptImages


def _layers(ref: str) -> list[str]:
    import asyncio

    from lazyd.registry import RegistryClient, RegistryConfig

    async def resolve() -> list[str]:
        parsed = Reference.parse(ref)
        async with RegistryClient(RegistryConfig(plain_http=[parsed.registry])) as client:
            return [d.digest for d in (await client.resolve(parsed)).layers]

    return asyncio.run(resolve())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def test_tracing_worker_lifecycle(opt_images: OptImages, tmp_path: Path) -> None:
    base = _layers(opt_images.debian_esgz)[0]
    root, sock, log = tmp_path / "root", tmp_path / "lazyd.sock", tmp_path / "lazyd.log"
    traced, plain = tmp_path / "traced", tmp_path / "plain"
    traced.mkdir()
    plain.mkdir()
    d = start_lazyd(root, sock, log)
    try:
        with d.client() as c:
            m = c.request("mount", {"ref": opt_images.debian_esgz, "layer_digest": base, "mountpoint": str(traced),
                                    "trace": True})
            c.request("mount", {"ref": opt_images.debian_esgz, "layer_digest": base, "mountpoint": str(plain)})
            st = c.status()
        by_mp = {x.mountpoint: x for x in st.mounts}
        assert by_mp[str(traced)].worker_id == -1 and by_mp[str(plain)].worker_id == 0
        tracer = [w for w in st.workers if w.state == "tracing"]
        assert len(tracer) == 1 and tracer[0].pid == m.worker_pid and tracer[0].no_open is False
        assert (root / "workers" / "trace" / "worker.json").exists()
        for name in ("etc/debian_version", "etc/passwd", "etc/debian_version"):
            (traced / name).read_bytes()
        os.stat(traced / "etc/shadow")  # a stat is no open
        (plain / "etc/group").read_bytes()  # another mount, another worker: not traced
        with d.client() as c:
            assert c.request("trace", {"mountpoint": str(traced)}).paths == ["etc/debian_version", "etc/passwd"]
            with pytest.raises(ApiError, match="not traced"):
                c.request("trace", {"mountpoint": str(plain)})

        d.stop()  # SIGTERM: the fetcher goes, the workers and their mounts stay
        assert _alive(m.worker_pid)
        d = start_lazyd(root, sock, log)
        with d.client() as c:
            st = c.status()
            assert [w.pid for w in st.workers if w.state == "tracing"] == [m.worker_pid], "adopted, not replaced"
            assert {x.state for x in st.mounts} == {"ready"}
            (traced / "etc/group").read_bytes()
            assert c.request("trace", {"mountpoint": str(traced)}).paths == ["etc/debian_version", "etc/passwd",
                                                                             "etc/group"]
            c.unmount(str(traced))
            st = c.status()
        assert {w.state for w in st.workers} == {"ready"} and all(w.worker_id >= 0 for w in st.workers)
        wait_until(lambda: not _alive(m.worker_pid), 20, "the idle tracing worker to exit")
        assert (plain / "etc/group").read_bytes()
    finally:
        d.close(unmount=tmp_path)
