"""Where ``lazyctl rpull`` gets an image from.

``LazydSource`` asks lazyd to resolve the image (the ``resolve`` op): lazyd is the
process that talks to registries, with their configuration, credentials and warm
connections, so rpull needs no HTTP client of its own for a lazy pull.  Layers that
must be pulled in full are downloaded with a registry client opened on first use.
When lazyd cannot resolve (it is not running, or predates the op), the source
resolves with that registry client instead and says so in ``resolved_by``.

``DaemonSource`` is the source of the ``pull`` op, which runs the whole pull inside lazyd.
"""

from __future__ import annotations

import dataclasses
import os
from types import TracebackType
from typing import TYPE_CHECKING

from lazyd.api.client import AsyncClient
from lazyd.api.messages import UNAVAILABLE, UNKNOWN_OP, ApiError, ResolveArgs, ResolveResult
from lazyd.registry.config import RegistryConfig
from lazyd.registry.reference import Reference
from lazyd.registry.types import Image

if TYPE_CHECKING:
    from collections.abc import Callable

    from lazyd.registry import Descriptor, RegistryClient
    from lazyd.registry.client import ProgressFn


class ResolveError(Exception):
    """lazyd answered, but could not resolve the image (the message is lazyd's)."""


class LazydSource:
    """Images resolved by lazyd; whole blobs from a registry client opened lazily."""

    def __init__(self, socket_path: str, registry_config: RegistryConfig, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.registry_config = registry_config
        self.timeout = timeout
        self.resolved_by = ""
        self._registry: RegistryClient | None = None

    async def __aenter__(self) -> LazydSource:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._registry is not None:
            await self._registry.close()
            self._registry = None

    def _client(self) -> RegistryClient:
        if self._registry is None:
            from lazyd.registry import RegistryClient  # aiohttp: only when a blob or fallback needs it

            self._registry = RegistryClient(self.registry_config)
        return self._registry

    async def resolve(self, ref: Reference) -> Image:
        """The image, through lazyd when it runs; else straight from the registry."""
        result = await self._ask_lazyd(ref)
        if result is None:
            self.resolved_by = "registry"
            return await self._client().resolve(ref)
        self.resolved_by = "lazyd"
        index = (result.index, result.index_media_type or "", result.index_digest) if result.index_digest else None
        return Image.from_raw(ref, result.manifest, result.manifest_media_type, result.manifest_digest,
                              result.config, index)

    async def _ask_lazyd(self, ref: Reference) -> ResolveResult | None:
        if not os.path.exists(self.socket_path):
            return None
        api = AsyncClient(self.socket_path, timeout=self.timeout, connect_timeout=2.0)
        try:
            result: ResolveResult = await api.request("resolve", ResolveArgs(ref=str(ref)))
        except ApiError as exc:
            if exc.code in (UNAVAILABLE, UNKNOWN_OP):
                return None  # not running, or an older lazyd
            raise ResolveError(f"lazyd could not resolve {ref}: {exc.message} ({exc.code})") from None
        finally:
            await api.close()
        return result

    async def fetch_blob(self, ref: Reference, digest: str, path: str | os.PathLike[str],
                         progress: ProgressFn | None = None, size: int | None = None) -> int:
        """Download a whole blob (a layer pulled in full) with the registry client; at most ``size`` bytes."""
        return await self._client().fetch_blob(ref, digest, path, progress=progress, size=size)


class DaemonSource:
    """Images resolved by lazyd's own registry client, for the ``pull`` op run inside lazyd.

    ``on_manifest`` sees the layers as soon as the manifest is in (lazyd starts opening its
    eStargz layers then, before the config is fetched and before the snapshotter asks for
    them); ``on_resolved`` sees every resolved image (lazyd remembers it).  Whole blobs (layers pulled in
    full) come from the same client, or, when the pull asked for plain HTTP or a hosts
    directory the daemon's configuration lacks, from a client with those added.
    """

    def __init__(self, registry: RegistryClient, registry_config: RegistryConfig,
                 on_resolved: Callable[[Image], None], plain_http: bool = False, hosts_dir: str | None = None,
                 on_manifest: Callable[[Reference, list[Descriptor]], None] | None = None) -> None:
        self.registry = registry
        self.registry_config = registry_config
        self.on_resolved = on_resolved
        self.on_manifest = on_manifest
        self.plain_http = plain_http
        self.hosts_dir = hosts_dir
        self.resolved_by = "lazyd"
        self._own: RegistryClient | None = None

    async def __aenter__(self) -> DaemonSource:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None

    async def resolve(self, ref: Reference) -> Image:
        """The image from the daemon's registry client; ``ResolveError`` names what failed."""
        from lazyd.registry.errors import RegistryError

        try:
            image = await self.registry.resolve(ref, on_manifest=self.on_manifest)
        except RegistryError as exc:
            raise ResolveError(f"lazyd could not resolve {ref}: {exc}") from exc
        self.on_resolved(image)
        return image

    def _blob_client(self, ref: Reference) -> RegistryClient:
        cfg = self.registry_config
        if self.plain_http and ref.registry not in cfg.plain_http:
            cfg = dataclasses.replace(cfg, plain_http=[*cfg.plain_http, ref.registry])
        if self.hosts_dir and self.hosts_dir != cfg.hosts_dir:
            cfg = dataclasses.replace(cfg, hosts_dir=self.hosts_dir)
        if cfg is self.registry_config:
            return self.registry
        if self._own is None:
            from lazyd.registry import RegistryClient

            self._own = RegistryClient(cfg)
        return self._own

    async def fetch_blob(self, ref: Reference, digest: str, path: str | os.PathLike[str],
                         progress: ProgressFn | None = None, size: int | None = None) -> int:
        """Download a whole blob (a layer pulled in full); at most ``size`` bytes."""
        return await self._blob_client(ref).fetch_blob(ref, digest, path, progress=progress, size=size)
