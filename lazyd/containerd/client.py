"""A containerd gRPC client over its Unix socket (asyncio).

Only what ``lazyctl rpull`` needs: content (Info, Update, Read, Write, Status),
images (Get, Create, Update), leases (Create, Delete), snapshots (Prepare,
Commit, Stat, Mounts, Remove, List) and diff (Apply). Every call carries the
``containerd-namespace`` metadata; calls made inside ``lease()`` also carry
``containerd-lease`` so what they create is protected from garbage collection.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from lazyd.registry.types import Descriptor  # the one OCI descriptor type, shared with the registry client

from . import DEFAULT_ADDRESS, DEFAULT_NAMESPACE
from . import _proto as pb
from .errors import AlreadyExistsError, ContainerdError, ContainerdUnavailableError, NotFoundError, from_rpc

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_NAMESPACE", "ContainerdClient", "ContentInfo", "Descriptor", "ImageRecord",
           "IngestStatus", "Mount", "SnapshotInfo", "WRITE_CHUNK", "open_channel"]

WRITE_CHUNK = 1 << 20  # containerd's own client copies in 1 MiB pieces


def _desc_to_pb(d: Descriptor) -> pb.types.Descriptor:
    """containerd.types.Descriptor (it has no urls or platform)."""
    return pb.types.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations))


def _desc_from_pb(d: pb.types.Descriptor) -> Descriptor:
    return Descriptor(media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations))


@dataclass(frozen=True)
class Mount:
    """A mount as containerd hands it out (containerd.types.Mount)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    def to_pb(self) -> pb.types.Mount:
        return pb.types.Mount(type=self.type, source=self.source, target=self.target, options=list(self.options))

    @classmethod
    def from_pb(cls, m: pb.types.Mount) -> "Mount":
        return cls(type=m.type, source=m.source, options=tuple(m.options), target=m.target)


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str]


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: str  # "view" | "active" | "committed"
    labels: dict[str, str]


@dataclass(frozen=True)
class ImageRecord:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestStatus:
    ref: str
    offset: int
    total: int
    expected: str


_KINDS = {0: "unknown", 1: "view", 2: "active", 3: "committed"}


def open_channel(address: str) -> grpc.aio.Channel:
    """A gRPC channel to containerd's socket at ``address`` (it connects on first use)."""
    return grpc.aio.insecure_channel(
        f"unix://{address}",
        options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)],
    )


class ContainerdClient:
    """One channel to containerd's socket; use ``async with``.

    ``lease_id`` (set by ``lease()``) is sent with every call while it is active.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE, timeout: float = 60.0,
                 channel: grpc.aio.Channel | None = None) -> None:
        """``channel`` (from :func:`open_channel`) is shared: the client then uses it and leaves it open."""
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease_id: str | None = None
        self._shared = channel
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> "ContainerdClient":
        if not Path(self.address).exists():
            raise ContainerdUnavailableError(
                f"containerd socket {self.address} does not exist (is containerd running?)")
        self._channel = self._shared or open_channel(self.address)
        self._content = pb.content_grpc.ContentStub(self._channel)
        self._images = pb.images_grpc.ImagesStub(self._channel)
        self._leases = pb.leases_grpc.LeasesStub(self._channel)
        self._snapshots = pb.snapshots_grpc.SnapshotsStub(self._channel)
        self._diff = pb.diff_grpc.DiffStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None and self._channel is not self._shared:
            await self._channel.close()
        self._channel = None

    def _md(self) -> tuple[tuple[str, str], ...]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease_id:
            md.append(("containerd-lease", self.lease_id))
        return tuple(md)

    async def _call(self, what: str, method: Callable, request: object, timeout: float | None = None) -> object:
        try:
            return await method(request, metadata=self._md(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc(err, what) from None

    # --- leases ---------------------------------------------------------

    async def create_lease(self, expire: _dt.timedelta = _dt.timedelta(hours=24)) -> str:
        """Create a lease that expires after ``expire`` (like containerd's client.WithLease)."""
        lease_id = f"lazyctl-{secrets.token_hex(8)}"
        until = (_dt.datetime.now(_dt.timezone.utc) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        req = pb.leases.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": until})
        resp = await self._call(f"create lease {lease_id}", self._leases.Create, req)
        return resp.lease.id

    async def delete_lease(self, lease_id: str) -> None:
        await self._call(f"delete lease {lease_id}", self._leases.Delete, pb.leases.DeleteRequest(id=lease_id))

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[str]:
        """Run the block under a new lease, deleted afterwards (as ctr-remote does)."""
        lease_id = await self.create_lease()
        previous, self.lease_id = self.lease_id, lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = previous
            await self.delete_lease(lease_id)

    # --- content --------------------------------------------------------

    async def content_info(self, digest: str) -> ContentInfo:
        resp = await self._call(f"content info {digest}", self._content.Info, pb.content.InfoRequest(digest=digest))
        return ContentInfo(digest=resp.info.digest, size=resp.info.size, labels=dict(resp.info.labels))

    async def content_exists(self, digest: str) -> bool:
        try:
            await self.content_info(digest)
            return True
        except NotFoundError:
            return False

    async def content_update_labels(self, digest: str, labels: Mapping[str, str]) -> ContentInfo:
        """Set (merge) ``labels`` on a blob; other labels are kept."""
        info = pb.content.Info(digest=digest, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        resp = await self._call(
            f"content update {digest}", self._content.Update, pb.content.UpdateRequest(info=info, update_mask=mask)
        )
        return ContentInfo(digest=resp.info.digest, size=resp.info.size, labels=dict(resp.info.labels))

    async def content_list(self, filters: list[str] | None = None) -> list[ContentInfo]:
        out: list[ContentInfo] = []
        try:
            call = self._content.List(pb.content.ListContentRequest(filters=filters or []), metadata=self._md(),
                                      timeout=self.timeout)
            async for resp in call:
                out.extend(ContentInfo(digest=i.digest, size=i.size, labels=dict(i.labels)) for i in resp.info)
        except grpc.RpcError as err:
            raise from_rpc(err, "content list") from None
        return out

    async def content_read(self, digest: str, offset: int = 0, size: int = 0) -> bytes:
        """Read a blob (or ``size`` bytes from ``offset``; 0 means to the end)."""
        parts: list[bytes] = []
        try:
            call = self._content.Read(pb.content.ReadContentRequest(digest=digest, offset=offset, size=size),
                                      metadata=self._md(), timeout=self.timeout)
            async for resp in call:
                parts.append(resp.data)
        except grpc.RpcError as err:
            raise from_rpc(err, f"content read {digest}") from None
        return b"".join(parts)

    async def content_status(self, ref: str) -> IngestStatus:
        resp = await self._call(f"content status {ref}", self._content.Status, pb.content.StatusRequest(ref=ref))
        s = resp.status
        return IngestStatus(ref=s.ref, offset=s.offset, total=s.total, expected=s.expected)

    async def content_abort(self, ref: str) -> None:
        await self._call(f"content abort {ref}", self._content.Abort, pb.content.AbortRequest(ref=ref))

    async def write_content(
        self,
        ref: str,
        desc: Descriptor,
        data: AsyncIterator[bytes] | bytes,
        labels: Mapping[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Write a blob through containerd's Write stream and commit it.

        Returns False when the blob was already in the store (then ``labels`` are
        merged into it instead). The commit checks size and digest on containerd's side.
        """
        labels = dict(labels or {})
        what = f"content write {desc.digest}"
        call = self._content.Write(metadata=self._md(), timeout=None)
        try:
            await call.write(pb.content.WriteContentRequest(
                action=pb.content.STAT, ref=ref, total=desc.size, expected=desc.digest))
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ContainerdError(f"containerd {what}: stream closed at STAT")
            # Writing from offset 0 truncates any interrupted ingest of the same ref (containerd's rule).
            offset = 0
            chunks = _chunks(data) if isinstance(data, (bytes, bytearray)) else data
            sha = hashlib.sha256()
            async for piece in chunks:
                sha.update(piece)
                await call.write(pb.content.WriteContentRequest(
                    action=pb.content.WRITE, ref=ref, offset=offset, data=piece))
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ContainerdError(f"containerd {what}: stream closed while writing")
                offset += len(piece)
                if resp.offset != offset:
                    raise ContainerdError(f"containerd {what}: wrote to offset {offset}, containerd is at {resp.offset}")
                if progress:
                    progress(len(piece))
            if offset != desc.size or f"sha256:{sha.hexdigest()}" != desc.digest:
                raise ContainerdError(
                    f"containerd {what}: data is {offset} bytes with sha256:{sha.hexdigest()}, "
                    f"expected {desc.size} bytes with {desc.digest}")
            await call.write(pb.content.WriteContentRequest(
                action=pb.content.COMMIT, ref=ref, total=desc.size, offset=offset, expected=desc.digest, labels=labels))
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ContainerdError(f"containerd {what}: stream closed at COMMIT")
            if resp.digest and resp.digest != desc.digest:
                raise ContainerdError(f"containerd {what}: committed {resp.digest}")
            await call.done_writing()
            return True
        except grpc.RpcError as err:
            error = from_rpc(err, what)
            if not isinstance(error, AlreadyExistsError):
                raise error from None
        finally:
            call.cancel()
        if labels:
            await self.content_update_labels(desc.digest, labels)
        return False

    # --- images ---------------------------------------------------------

    async def get_image(self, name: str) -> ImageRecord:
        resp = await self._call(f"image get {name}", self._images.Get, pb.images.GetImageRequest(name=name))
        img = resp.image
        return ImageRecord(name=img.name, target=_desc_from_pb(img.target), labels=dict(img.labels))

    async def put_image(self, record: ImageRecord) -> ImageRecord:
        """Create the image record, or update its target and labels when it exists (containerd's client does so)."""
        img = pb.images.Image(name=record.name, labels=dict(record.labels), target=_desc_to_pb(record.target))
        try:
            resp = await self._call(f"image create {record.name}", self._images.Create,
                                    pb.images.CreateImageRequest(image=img))
        except AlreadyExistsError:
            resp = await self._call(f"image update {record.name}", self._images.Update,
                                    pb.images.UpdateImageRequest(image=img))
        out = resp.image
        return ImageRecord(name=out.name, target=_desc_from_pb(out.target), labels=dict(out.labels))

    async def delete_image(self, name: str) -> None:
        await self._call(f"image delete {name}", self._images.Delete, pb.images.DeleteImageRequest(name=name, sync=True))

    # --- snapshots ------------------------------------------------------

    async def prepare(self, snapshotter: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
                      ) -> list[Mount]:
        req = pb.snapshots.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                                  labels=dict(labels or {}))
        resp = await self._call(f"snapshot prepare {key} ({snapshotter})", self._snapshots.Prepare, req)
        return [Mount.from_pb(m) for m in resp.mounts]

    async def view(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str] | None = None
                   ) -> list[Mount]:
        """A read-only snapshot of ``parent`` (e.g. to inspect an image's root filesystem)."""
        req = pb.snapshots.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                               labels=dict(labels or {}))
        resp = await self._call(f"snapshot view {key} ({snapshotter})", self._snapshots.View, req)
        return [Mount.from_pb(m) for m in resp.mounts]

    async def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.snapshots.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=dict(labels or {}))
        await self._call(f"snapshot commit {key} as {name} ({snapshotter})", self._snapshots.Commit, req)

    async def stat(self, snapshotter: str, key: str) -> SnapshotInfo:
        req = pb.snapshots.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        resp = await self._call(f"snapshot stat {key} ({snapshotter})", self._snapshots.Stat, req)
        i = resp.info
        return SnapshotInfo(name=i.name, parent=i.parent, kind=_KINDS.get(i.kind, "unknown"), labels=dict(i.labels))

    async def mounts(self, snapshotter: str, key: str) -> list[Mount]:
        req = pb.snapshots.MountsRequest(snapshotter=snapshotter, key=key)
        resp = await self._call(f"snapshot mounts {key} ({snapshotter})", self._snapshots.Mounts, req)
        return [Mount.from_pb(m) for m in resp.mounts]

    async def remove(self, snapshotter: str, key: str) -> None:
        req = pb.snapshots.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        await self._call(f"snapshot remove {key} ({snapshotter})", self._snapshots.Remove, req)

    async def list_snapshots(self, snapshotter: str, filters: list[str] | None = None) -> list[SnapshotInfo]:
        out: list[SnapshotInfo] = []
        try:
            call = self._snapshots.List(pb.snapshots.ListSnapshotsRequest(snapshotter=snapshotter,
                                                                         filters=filters or []),
                                        metadata=self._md(), timeout=self.timeout)
            async for resp in call:
                out.extend(SnapshotInfo(name=i.name, parent=i.parent, kind=_KINDS.get(i.kind, "unknown"),
                                        labels=dict(i.labels)) for i in resp.info)
        except grpc.RpcError as err:
            raise from_rpc(err, f"snapshot list ({snapshotter})") from None
        return out

    # --- diff -----------------------------------------------------------

    async def apply(self, layer: Descriptor, mounts: list[Mount], timeout: float = 600.0) -> Descriptor:
        """Apply a layer blob from the content store onto ``mounts``; returns the uncompressed (diffID) descriptor."""
        req = pb.diff.ApplyRequest(diff=_desc_to_pb(layer), mounts=[m.to_pb() for m in mounts])
        resp = await self._call(f"diff apply {layer.digest}", self._diff.Apply, req, timeout=timeout)
        return _desc_from_pb(resp.applied)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), WRITE_CHUNK):
        yield bytes(view[start:start + WRITE_CHUNK])
