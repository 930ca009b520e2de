"""The containerd client against a real containerd: content writes under a lease, errors, snapshots."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from typing import Any

import pytest

from lazyd.containerd.client import ContainerdClient, Descriptor
from lazyd.containerd.errors import AlreadyExistsError, ContainerdError, NotFoundError

pytestmark = pytest.mark.timeout(120)


def _desc(data: bytes) -> Descriptor:
    return Descriptor("application/octet-stream", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_content_write_read_and_labels(containerd: Any) -> None:
    data = b"lazyd " * 400_000  # 2.4 MB: several 1 MiB write messages

    async def go() -> None:
        async with ContainerdClient(containerd.address, "t") as cd:
            async with cd.lease() as lease_id:
                assert await cd.write_content("blob-1", _desc(data), data, {"a": "1"}) is True
                assert await cd.write_content("blob-1", _desc(data), data, {"b": "2"}) is False
                leases = subprocess.run(["ctr", "-a", containerd.address, "-n", "t", "leases", "ls", "-q"],
                                        capture_output=True, text=True, check=True).stdout.split()
                assert leases == [lease_id]
                # Checked inside the lease: once it is deleted, containerd's gc may remove the unreferenced blob.
                info = await cd.content_info(_desc(data).digest)
                assert info.size == len(data) and info.labels == {"a": "1", "b": "2"}
                assert await cd.content_read(_desc(data).digest) == data
                assert await cd.content_read(_desc(data).digest, offset=6, size=5) == b"lazyd"

    asyncio.run(go())


def test_content_write_refuses_wrong_bytes(containerd: Any) -> None:
    data = b"right bytes"
    lying = Descriptor("application/octet-stream", _desc(b"other bytes").digest, len(data))

    async def go() -> None:
        async with ContainerdClient(containerd.address) as cd:
            async with cd.lease():
                with pytest.raises(ContainerdError, match="expected 11 bytes with sha256:"):
                    await cd.write_content("blob-bad", lying, data)
            assert not await cd.content_exists(lying.digest)
            assert not await cd.content_exists(_desc(data).digest)

    asyncio.run(go())


def test_snapshot_errors_are_typed(containerd: Any) -> None:
    async def go() -> None:
        async with ContainerdClient(containerd.address) as cd:
            with pytest.raises(NotFoundError, match="snapshot stat missing"):
                await cd.stat("overlayfs", "missing")
            async with cd.lease():
                mounts = await cd.prepare("overlayfs", "k1")
                assert mounts[0].type == "bind"
                with pytest.raises(AlreadyExistsError):
                    await cd.prepare("overlayfs", "k1")
                await cd.commit("overlayfs", "c1", "k1", {"x": "y"})
                info = await cd.stat("overlayfs", "c1")
                assert (info.kind, info.labels) == ("committed", {"x": "y"})
                view = await cd.view("overlayfs", "v1", "c1")
                assert view[0].source == mounts[0].source
                await cd.remove("overlayfs", "v1")
                await cd.remove("overlayfs", "c1")
            with pytest.raises(NotFoundError):
                await cd.stat("overlayfs", "c1")

    asyncio.run(go())


def test_missing_socket_is_a_clear_error(tmp_path: Any) -> None:
    async def go() -> None:
        async with ContainerdClient(str(tmp_path / "none.sock")):
            pass

    with pytest.raises(ContainerdError, match="none.sock does not exist"):
        asyncio.run(go())
