"""Access records: which files a workload read first, per image layer.

The format is the reference's (stargz-snapshotter ``recorder.Entry``): JSON lines of
``{"path": "usr/bin/python3", "manifestDigest": "sha256:…", "layerIndex": 1}``, in first-access
order.  Paths are root-relative and cleaned (no leading ``/``, no ``.``/``..``), as the reference
writes them; ``manifestDigest`` and ``layerIndex`` may be absent (a plain priority list).  So a
record moves between ``ctr-remote image optimize --record-out`` and ``lazyctl`` either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lazyd.estargz.names import normalize_name

# Bounds on what a record may hold: a workload touching more than this is not a start-up profile.
MAX_RECORDS = 200_000
MAX_LINE = 8192
MAX_BYTES = 64 << 20
MAX_LAYERS = 1024
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


class RecordError(ValueError):
    """A record file or line that is not a valid access record (the message names what and where)."""


@dataclass(frozen=True)
class Record:
    """One first access: a cleaned root-relative path, in the layer that provides it."""

    path: str
    manifest_digest: str | None = None
    layer_index: int | None = None

    def to_json(self) -> dict[str, object]:
        """The reference's JSON form (absent fields left out, like Go's ``omitempty``)."""
        out: dict[str, object] = {"path": self.path}
        if self.manifest_digest:
            out["manifestDigest"] = self.manifest_digest
        if self.layer_index is not None:
            out["layerIndex"] = self.layer_index
        return out


def parse_line(line: str, where: str = "record") -> Record:
    """One JSON line as a Record; RecordError naming ``where`` and what was wrong."""
    if len(line) > MAX_LINE:
        raise RecordError(f"{where}: line is {len(line)} characters, more than {MAX_LINE}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: not JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    path = obj.get("path")
    if not isinstance(path, str) or not path:
        raise RecordError(f"{where}: 'path' must be a non-empty string")
    if "\x00" in path:
        raise RecordError(f"{where}: path {path!r} contains a NUL byte")
    clean = normalize_name(path, "record path")
    if not clean:
        raise RecordError(f"{where}: path {path!r} names the root directory")
    digest = obj.get("manifestDigest")
    if digest is not None and (not isinstance(digest, str) or (digest and not _DIGEST_RE.match(digest))):
        raise RecordError(f"{where}: manifestDigest {digest!r} is not a sha256 digest")
    index = obj.get("layerIndex")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                              or not 0 <= index < MAX_LAYERS):
        raise RecordError(f"{where}: layerIndex {index!r} must be an integer in [0, {MAX_LAYERS})")
    return Record(clean, digest or None, index)


def loads(text: str, source: str = "record") -> list[Record]:
    """Every record of a JSON-lines text (blank lines skipped), bounded by MAX_BYTES/MAX_RECORDS."""
    if len(text) > MAX_BYTES:
        raise RecordError(f"{source}: {len(text)} bytes, more than {MAX_BYTES}")
    out: list[Record] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(out) >= MAX_RECORDS:
            raise RecordError(f"{source}: more than {MAX_RECORDS} records")
        out.append(parse_line(line, f"{source} line {n}"))
    return out


def load(path: Path) -> list[Record]:
    """Records from a file (``--record-in``/``--prioritized-only``)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RecordError(f"cannot read record file {path}: {exc.strerror}") from None
    if size > MAX_BYTES:
        raise RecordError(f"record file {path}: {size} bytes, more than {MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"cannot read record file {path}: {exc}") from None
    return loads(text, str(path))


def dumps(records: Iterable[Record]) -> str:
    """JSON lines, one record per line, in order (what ``encoding/json.Encoder`` writes)."""
    return "".join(json.dumps(r.to_json(), separators=(",", ":")) + "\n" for r in records)


def by_layer(records: Iterable[Record], manifest_digest: str | None = None) -> dict[int, list[str]]:
    """Paths per layer index in first-access order, duplicates dropped.

    Records for another manifest are skipped when ``manifest_digest`` is given; records
    without a layer index are RecordError (the caller must place them first).
    """
    out: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for r in records:
        if manifest_digest and r.manifest_digest and r.manifest_digest != manifest_digest:
            continue
        if r.layer_index is None:
            raise RecordError(f"record for {r.path!r} has no layerIndex")
        key = (r.layer_index, r.path)
        if key not in seen:
            seen.add(key)
            out.setdefault(r.layer_index, []).append(r.path)
    return out
