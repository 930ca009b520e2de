"""The ``pull`` and ``pull_progress`` ops: ``lazyctl rpull`` run inside lazyd.

lazyd already runs with its registry client (warm connections, credentials), its
layer table and, after the first pull, a gRPC channel to containerd; so the
``lazyctl rpull`` process only sends one request and prints the answer, and the
gRPC/protobuf and HTTP imports stay out of it.  The pull itself is
``RemotePuller``'s, exactly as rpull runs it in-process (same content, labels,
image record and fallback to a normal pull).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from lazyd.api.messages import (
    ALREADY_EXISTS,
    INVALID_REQUEST,
    NOT_FOUND,
    PULL_FAILED,
    UNAVAILABLE,
    ApiError,
    PulledLayer,
    PullArgs,
    PullProgressArgs,
    PullProgressResult,
    PullResult,
)
from lazyd.registry import InvalidReferenceError, Reference, RegistryClient, RegistryConfig, RegistryError
from lazyd.registry.types import Descriptor, Image

from .client import ContainerdClient, open_channel
from .errors import AlreadyExistsError, ContainerdError, ContainerdUnavailableError, NotFoundError
from .pull import LayerResult, PullError, RemotePuller
from .source import DaemonSource, ResolveError

log = logging.getLogger(__name__)

FallbackReason = Callable[[str], "str | None"]
"""layer digest -> the snapshotter's last reported reason for pulling it in full."""


@dataclass
class _Progress:
    """What ``pull_progress`` reports; fed by ``RemotePuller``'s observer callbacks."""

    description: str = "resolving"
    layers: int = 0
    layers_done: int = 0
    bytes: int = 0

    def resolved(self, image: Image) -> None:
        self.layers = len(image.layers)
        self.description = f"resolved {image.manifest_digest[:19]}"

    def layer_started(self, index: int, desc: Descriptor) -> None:
        self.description = f"layer {index + 1}/{self.layers} {desc.digest[7:19]}"

    def fetched(self, nbytes: int) -> None:
        self.bytes += nbytes

    def layer_done(self, result: LayerResult) -> None:
        if result.mode != "full":  # full layers counted their bytes while downloading
            self.bytes += result.size
        self.layers_done += 1
        self.description = f"layer {result.index + 1}/{self.layers} {result.mode}"


def _api_error(exc: Exception) -> ApiError:
    """The protocol error for a failed pull; the message names the call or object."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ResolveError):
        cause = exc.__cause__
        from lazyd.fetcher.layers import registry_error

        code = registry_error(cause).code if isinstance(cause, RegistryError) else PULL_FAILED
        return ApiError(code, str(exc))
    if isinstance(exc, RegistryError):
        from lazyd.fetcher.layers import registry_error

        return registry_error(exc)
    if isinstance(exc, ContainerdUnavailableError):
        return ApiError(UNAVAILABLE, str(exc))
    if isinstance(exc, NotFoundError):
        return ApiError(NOT_FOUND, str(exc))
    if isinstance(exc, AlreadyExistsError):
        return ApiError(ALREADY_EXISTS, str(exc))
    return ApiError(PULL_FAILED, str(exc))


class PullService:
    """Runs pulls for the daemon; keeps one gRPC channel per containerd socket."""

    def __init__(self, registry: RegistryClient, registry_config: RegistryConfig,
                 on_resolved: Callable[[Image], None], fallback_reason: FallbackReason,
                 on_manifest: Callable[[Reference, list[Descriptor]], None] | None = None) -> None:
        self.registry = registry
        self.registry_config = registry_config
        self.on_resolved = on_resolved
        self.on_manifest = on_manifest
        self.fallback_reason = fallback_reason
        self._channels: dict[str, object] = {}
        self._progress: dict[str, _Progress] = {}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)  # type: ignore[attr-defined]

    def progress(self, args: PullProgressArgs) -> PullProgressResult:
        p = self._progress.get(args.pull_id)
        if p is None:
            raise ApiError(NOT_FOUND, f"no pull {args.pull_id} is running")
        return PullProgressResult(p.description, p.layers, p.layers_done, p.bytes)

    async def pull(self, args: PullArgs) -> PullResult:
        """Pull ``args.ref`` into containerd; raises ``ApiError`` naming what failed."""
        try:
            ref = Reference.parse(args.ref)
        except (InvalidReferenceError, ValueError) as exc:
            raise ApiError(INVALID_REQUEST, f"ref: {exc}") from None
        if args.pull_id is not None and args.pull_id in self._progress:
            raise ApiError(ALREADY_EXISTS, f"a pull named {args.pull_id} is already running")
        progress = _Progress()
        if args.pull_id is not None:
            self._progress[args.pull_id] = progress
        started = time.monotonic()
        try:
            channel = self._channels.get(args.address)
            if channel is None:
                channel = self._channels[args.address] = open_channel(args.address)
            async with DaemonSource(self.registry, self.registry_config, self.on_resolved, args.plain_http,
                                    args.hosts_dir, self.on_manifest) as source, \
                    ContainerdClient(args.address, args.namespace, channel=channel) as containerd:  # type: ignore[arg-type]
                puller = RemotePuller(containerd, source, args.snapshotter, observer=progress,
                                      fallback_reasons=self._reason)
                result = await puller.pull(ref)
        except (PullError, ContainerdError, RegistryError, ResolveError) as exc:
            raise _api_error(exc) from None
        finally:
            if args.pull_id is not None:
                self._progress.pop(args.pull_id, None)
        log.info("pulled %s into %s (%s) in %.3fs: %s", result.image, args.address, args.namespace,
                 time.monotonic() - started, " ".join(layer.mode for layer in result.layers))
        return PullResult(
            image=result.image, target_digest=result.target_digest, manifest_digest=result.manifest_digest,
            config_digest=result.config_digest, snapshotter=result.snapshotter, chain_id=result.chain_id,
            layers=[PulledLayer(index=la.index, digest=la.digest, size=la.size, chain_id=la.chain_id, mode=la.mode,
                                reason=la.reason, seconds=la.seconds) for la in result.layers],
            bytes_fetched=result.bytes_fetched, seconds=result.seconds, resolved_by=source.resolved_by)

    async def _reason(self, layer_digest: str) -> str | None:
        return self.fallback_reason(layer_digest)
