"""Local prefetch profiles: ``<lazyd root>/profiles/<sha256 hex>.jsonl``, keyed by manifest digest.

Each file holds the access records (lazyd.profile.records, the reference's JSON-lines format)
recorded for one image manifest.  Only ``lazyd serve`` writes here (``lazyctl`` goes through the
``profile_*`` ops).  Writes are atomic (a temporary file, fsync, rename) so a reader sees the old
profile or the new one, never a part; every profile is validated before it is stored.

Bounds: a profile is at most ``MAX_PROFILE_BYTES`` (it travels in one API message, whose
binary fields are limited to 4 MiB: lazyd.api.wire.MAX_BIN_LEN) and ``records.MAX_RECORDS``
records; at most ``MAX_PROFILES`` profiles are kept (storing one more removes the least
recently written).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lazyd.atomicfile import atomic_write
from lazyd.profile import records as rec
from lazyd.profile.records import Record, RecordError

log = logging.getLogger(__name__)

MAX_PROFILE_BYTES = 4 * 1024 * 1024
"""Largest profile (JSON lines): about 40,000 records of 100 bytes, far more than a start-up reads."""
MAX_PROFILES = 1024
"""Profiles kept in one lazyd root; storing one more removes the least recently written."""
SUFFIX = ".jsonl"
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")


class ProfileStoreError(Exception):
    """A profile that cannot be stored or read (the message names the profile and why)."""


@dataclass(frozen=True)
class ProfileInfo:
    """One stored profile."""

    manifest_digest: str
    size: int
    records: int
    layers: int
    mtime: float


def check_digest(digest: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` manifest digest; ProfileStoreError otherwise."""
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise ProfileStoreError(f"manifest digest {digest[:80]!r} is not sha256:<64 lowercase hex>")
    return m.group(1)


def validate(manifest_digest: str, data: bytes, source: str) -> list[Record]:
    """The records of profile ``data`` for ``manifest_digest``; ProfileStoreError naming
    ``source`` when it is too big, not UTF-8, not valid records, empty, or names another manifest
    in every record."""
    check_digest(manifest_digest)
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileStoreError(f"{source}: {len(data)} bytes, more than the {MAX_PROFILE_BYTES} a profile may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileStoreError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        records = rec.loads(text, source)
    except RecordError as exc:
        raise ProfileStoreError(str(exc)) from None
    if not records:
        raise ProfileStoreError(f"{source}: holds no records")
    mine = [r for r in records if r.manifest_digest in (None, manifest_digest)]
    if not mine:
        raise ProfileStoreError(f"{source}: every record names another manifest than {manifest_digest} "
                                f"(first: {records[0].manifest_digest})")
    missing = next((r for r in mine if r.layer_index is None), None)
    if missing is not None:
        raise ProfileStoreError(f"{source}: record for {missing.path!r} has no layerIndex")
    return records


class ProfileStore:
    """The profiles under one directory (``<root>/profiles``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, manifest_digest: str) -> Path:
        return self.directory / f"{check_digest(manifest_digest)}{SUFFIX}"

    def put(self, manifest_digest: str, data: bytes) -> list[Record]:
        """Validate and store ``data`` as the profile of ``manifest_digest`` (atomically,
        replacing any older one); returns its records.  Blocking (disk): run it in a thread."""
        records = validate(manifest_digest, data, f"profile for {manifest_digest}")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(manifest_digest)
        if not target.exists():
            self._make_room()
        try:
            atomic_write(target, data)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise ProfileStoreError(f"cannot store the profile for {manifest_digest} in {self.directory}: "
                                    f"{exc.strerror or exc}") from None
        return records

    def get(self, manifest_digest: str) -> bytes | None:
        """The stored profile of ``manifest_digest`` (bytes), or None; ProfileStoreError when it
        cannot be read or is over the size bound."""
        target = self.path(manifest_digest)
        try:
            with open(target, "rb") as f:
                data = f.read(MAX_PROFILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ProfileStoreError(f"cannot read profile {target}: {exc.strerror or exc}") from None
        if len(data) > MAX_PROFILE_BYTES:
            raise ProfileStoreError(f"profile {target}: more than {MAX_PROFILE_BYTES} bytes")
        return data

    def load(self, manifest_digest: str) -> list[Record] | None:
        """The validated records of the stored profile, or None when there is none."""
        data = self.get(manifest_digest)
        if data is None:
            return None
        return validate(manifest_digest, data, f"profile {self.path(manifest_digest)}")

    def delete(self, manifest_digest: str) -> bool:
        """Remove the profile; False when there was none."""
        try:
            self.path(manifest_digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def has_any(self) -> bool:
        """Whether any profile is stored (cheap: mounts skip the lookup when not)."""
        try:
            with os.scandir(self.directory) as it:
                return any(e.name.endswith(SUFFIX) and not e.name.startswith(".") for e in it)
        except FileNotFoundError:
            return False

    def _names(self) -> list[tuple[float, Path]]:
        out = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for e in entries:
            if e.name.startswith(".") or not e.name.endswith(SUFFIX):
                continue
            try:
                out.append((e.stat().st_mtime, Path(e.path)))
            except FileNotFoundError:
                continue
        return sorted(out)

    def _make_room(self) -> None:
        names = self._names()
        for _, path in names[: max(0, len(names) - MAX_PROFILES + 1)]:
            log.info("profiles: removing %s, the least recently stored of %d (at most %d are kept)", path.name,
                     len(names), MAX_PROFILES)
            path.unlink(missing_ok=True)

    def summaries(self) -> list[ProfileInfo]:
        """Every readable stored profile, newest first (damaged ones are logged and left out)."""
        out = []
        for mtime, path in reversed(self._names()):
            digest = "sha256:" + path.name[: -len(SUFFIX)]
            try:
                data = self.get(digest)
                if data is None:
                    continue
                records = validate(digest, data, f"profile {path}")
            except ProfileStoreError as exc:
                log.warning("%s", exc)
                continue
            layers = {r.layer_index for r in records if r.manifest_digest in (None, digest)}
            out.append(ProfileInfo(digest, len(data), len(records), len(layers), mtime))
        return out
