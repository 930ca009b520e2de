"""gRPC ``containerd.services.snapshots.v1.Snapshots`` on a Unix socket, backed by ``Snapshotter``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from lazyd import unixsocket
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from lazyd.proto.containerd.types import mount_pb2
from lazyd.snapshotter.filters import FilterError
from lazyd.snapshotter.metadata import (
    AlreadyExistsError,
    FailedPreconditionError,
    Info,
    InvalidArgumentError,
    MetadataError,
    NotFoundError,
)
from lazyd.snapshotter.overlay import Mount
from lazyd.snapshotter.remote import RemoteUnavailableError
from lazyd.snapshotter.snapshotter import Snapshotter

log = logging.getLogger("lazyd.snapshotter")

T = TypeVar("T")

_CODES: dict[type[Exception], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    FilterError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    RemoteUnavailableError: grpc.StatusCode.UNAVAILABLE,
}


class SocketError(RuntimeError):
    """The gRPC socket could not be created."""


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), created_at=_ts(info.created_ns),
                   updated_at=_ts(info.updated_ns), labels=info.labels)


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    """Maps each RPC to ``Snapshotter`` and its exceptions to gRPC status codes."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except tuple(_CODES) as exc:
            code = next(c for t, c in _CODES.items() if isinstance(exc, t))
            if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
                log.info("%s: %s", rpc, exc)
            context.abort(code, str(exc))
        except MetadataError as exc:  # pragma: no cover - every subclass is mapped above
            context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        except OSError as exc:
            log.error("%s failed: %s", rpc, exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: {exc}")
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "Prepare",
                            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "View", lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "Mounts", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "Commit", lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "Remove", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._call(context, "Stat", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._call(context, "Update",
                          lambda: self.sn.update(request.info.name, dict(request.info.labels), paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = self._call(context, "List", lambda: list(self.sn.walk(list(request.filters))))
        for start in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start:start + 100]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self._call(context, "Usage", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "Cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def serve(snapshotter: Snapshotter, address: Path, workers: int = 8, group: str | None = None) -> grpc.Server:
    """Start the gRPC server on Unix socket ``address``; the caller stops it.

    The socket gets mode 0600, or 0660 and group ``group``.  gRPC binds and listens in one step
    (``add_insecure_port``), so it does that in a private 0700 directory; the socket is renamed to
    ``address`` once it has its mode and the server accepts (see lazyd.unixsocket), so a client
    never sees a socket that refuses connections or is too open.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"),
                         options=[("grpc.max_receive_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)

    def bind(path: str) -> None:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise SocketError(f"gRPC cannot listen on {path} (for {address})")

    try:
        gid = unixsocket.group_id(group) if group is not None else None
        unixsocket.publish(address, gid, bind=bind, listen=server.start)
    except unixsocket.SocketSetupError as exc:
        server.stop(None)
        raise SocketError(str(exc)) from exc
    except BaseException:
        server.stop(None)
        raise
    return server
