"""Errors of the containerd client, mapped from gRPC status codes."""

from __future__ import annotations

import grpc


class ContainerdError(Exception):
    """A containerd API call failed; the message names the call and the object."""


class NotFoundError(ContainerdError):
    """containerd answered NOT_FOUND."""


class AlreadyExistsError(ContainerdError):
    """containerd answered ALREADY_EXISTS."""


class ContainerdUnavailableError(ContainerdError):
    """containerd's socket could not be reached (UNAVAILABLE)."""


class FailedPreconditionError(ContainerdError):
    """containerd answered FAILED_PRECONDITION (e.g. a content ingest is locked)."""


_BY_CODE: dict[grpc.StatusCode, type[ContainerdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAVAILABLE: ContainerdUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def from_rpc(err: grpc.RpcError, what: str) -> ContainerdError:
    """Turn a gRPC error into the matching ContainerdError, naming ``what`` was asked."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, ContainerdError) if code is not None else ContainerdError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"containerd {what}: {name}: {details}")
