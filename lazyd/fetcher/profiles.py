"""Finding the prefetch profile of a layer being mounted (docs/profiles.md).

A mount names an image reference and a layer.  ``ProfileFinder.find`` works out the image's
manifest digest (from the images the fetcher resolved for pulls, else by resolving the
reference) and the layer's index in that manifest, then looks for a profile: in the local
store (``<root>/profiles``), then -- with ``profiles = "registry"`` -- in the registry, with
``profile_timeout``; a profile pulled so is stored locally.  All layers of one image share one
lookup.  Whatever goes wrong (no image, a damaged profile, a registry error) is one log line and
no profile: the mount proceeds as a normal lazy pull.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from lazyd.fetcher.layers import Layer, LayerTable
from lazyd.profile import artifact
from lazyd.profile.records import Record
from lazyd.profile.store import ProfileStore, ProfileStoreError
from lazyd.registry import Image, Reference, RegistryClient, RegistryError

log = logging.getLogger(__name__)

LOOKUP_TTL = 30.0
"""Seconds a lookup's outcome (found or not) is reused by the other layers of the image."""
MAX_LOOKUPS = 256


@dataclass(frozen=True)
class ProfileUse:
    """The profile found for one mounted layer."""

    manifest_digest: str
    source: str  # "local" or "registry"
    layer_index: int
    paths: list[str]  # the layer's profiled paths, in first-access order
    foreign: int  # records naming another manifest, skipped


@dataclass(frozen=True)
class _Found:
    records: list[Record]
    source: str


class ProfileFinder:
    """Looks profiles up for mounts; see the module docstring."""

    def __init__(self, mode: str, store: ProfileStore, client: RegistryClient, layers: LayerTable,
                 timeout: float) -> None:
        self.mode = mode
        self.store = store
        self.client = client
        self.layers = layers
        self.timeout = timeout
        self._lookups: OrderedDict[str, tuple[float, asyncio.Future[_Found | None]]] = OrderedDict()

    def forget(self, manifest_digest: str) -> None:
        """Drop a cached lookup (the stored profile changed)."""
        self._lookups.pop(manifest_digest, None)

    async def find(self, ref: Reference, layer: Layer) -> ProfileUse | None:
        """The profile for ``layer`` mounted from ``ref``, or None (see the module docstring)."""
        if self.mode == "off":
            return None
        image = self.layers.image_of(ref, layer.digest)
        if image is None:
            if self.mode == "local" and not await asyncio.to_thread(self.store.has_any):
                return None
            image = await self._resolve(ref)
            if image is None:
                return None
        index = next((i for i, d in enumerate(image.layers) if d.digest == layer.digest), None)
        if index is None:
            return None
        found = await self._lookup(ref, image.manifest_digest)
        if found is None:
            return None
        paths: list[str] = []
        foreign = 0
        for r in found.records:
            if r.manifest_digest and r.manifest_digest != image.manifest_digest:
                foreign += 1
            elif r.layer_index == index:
                paths.append(r.path)
        return ProfileUse(image.manifest_digest, found.source, index, list(dict.fromkeys(paths)), foreign)

    async def _resolve(self, ref: Reference) -> Image | None:
        try:
            image = await asyncio.wait_for(self.client.resolve(ref), self.timeout)
        except (RegistryError, asyncio.TimeoutError) as exc:
            log.warning("profile lookup: cannot resolve %s to find its manifest digest (%s); no profile",
                        ref, exc or "timed out")
            return None
        self.layers.remember(image)
        return image

    def warm(self, image: Image) -> None:
        """Start looking for ``image``'s profile now (in the local store, then with
        ``profiles = "registry"`` in the registry): called when a pull resolves the image, so
        the lookup runs while the layers' TOCs are fetched instead of holding up the first
        mount's prefetch (a thread hop for the local store took up to 20 ms then)."""
        if self.mode != "off":
            self._start(image.ref, image.manifest_digest)

    def _start(self, ref: Reference, digest: str) -> asyncio.Future[_Found | None]:
        """The lookup of ``digest``: a running or recent one, else a new one."""
        now = time.monotonic()
        cached = self._lookups.get(digest)
        if cached is not None and (not cached[1].done() or now - cached[0] < LOOKUP_TTL):
            return cached[1]
        fut = asyncio.ensure_future(self._find(ref, digest))
        fut.add_done_callback(_retrieved)  # a lookup nobody awaits (``warm``) must not warn at exit
        self._lookups[digest] = (now, fut)
        self._lookups.move_to_end(digest)
        while len(self._lookups) > MAX_LOOKUPS:
            self._lookups.popitem(last=False)
        return fut

    async def _lookup(self, ref: Reference, digest: str) -> _Found | None:
        return await asyncio.shield(self._start(ref, digest))

    async def _find(self, ref: Reference, digest: str) -> _Found | None:
        try:
            records = await asyncio.to_thread(self.store.load, digest)
        except ProfileStoreError as exc:
            log.warning("ignoring the local profile for %s: %s; the mount is a normal lazy pull", digest, exc,
                        extra={"event": "profile_error", "manifest": digest, "source": "local"})
            records = None
        if records is not None:
            return _Found(records, "local")
        if self.mode != "registry":
            return None
        try:
            pulled = await asyncio.wait_for(artifact.pull(self.client, ref, digest), self.timeout)
        except artifact.ProfileNotFoundError as exc:
            log.info("%s", exc, extra={"event": "profile_none", "manifest": digest})
            return None
        except asyncio.TimeoutError:
            log.warning("looking for a profile for %s in %s took longer than %ss; the mount is a normal lazy pull",
                        digest, ref.name, self.timeout,
                        extra={"event": "profile_error", "manifest": digest, "source": "registry"})
            return None
        except (artifact.ArtifactError, RegistryError) as exc:
            log.warning("ignoring the registry profile for %s: %s; the mount is a normal lazy pull", digest, exc,
                        extra={"event": "profile_error", "manifest": digest, "source": "registry"})
            return None
        try:
            records = await asyncio.to_thread(self.store.put, digest, pulled.data)
        except ProfileStoreError as exc:
            log.warning("ignoring the registry profile %s for %s: %s", pulled.artifact_digest, digest, exc,
                        extra={"event": "profile_error", "manifest": digest, "source": "registry"})
            return None
        log.info("pulled profile %s for %s from %s (%s, %d records)", pulled.artifact_digest, digest, ref.name,
                 pulled.method, pulled.records,
                 extra={"event": "profile_pull", "manifest": digest, "artifact": pulled.artifact_digest})
        return _Found(records, "registry")


def _retrieved(fut: asyncio.Future[_Found | None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("profile lookup failed: %s", fut.exception())
