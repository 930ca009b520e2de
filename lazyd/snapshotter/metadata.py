"""Snapshot metadata in SQLite (``<root>/metadata.db``), like containerd's snapshots/storage.

Each snapshot has a numeric id (its directory ``snapshots/<id>``), a key (the name
containerd uses, already namespaced like ``default/3/extract-...``), a kind, an
optional parent key, labels and times.  Committing keeps the id and renames the
key, exactly as containerd's metastore does.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT,
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots.v1.Kind."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class MetadataError(Exception):
    """Base of metadata errors; ``str()`` names the snapshot."""


class NotFoundError(MetadataError):
    """No snapshot has that key."""


class AlreadyExistsError(MetadataError):
    """A snapshot with that key already exists."""


class InvalidArgumentError(MetadataError):
    """The request is malformed (empty key, wrong kind, bad field path...)."""


class FailedPreconditionError(MetadataError):
    """The snapshot's state forbids the request: it has children, is not active (Commit), or is
    committed (Mounts); containerd's storage answers these with ErrFailedPrecondition too."""


@dataclass(frozen=True)
class Info:
    """What containerd sees of a snapshot (``snapshots.v1.Info``) plus our id."""

    id: int
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot with its parent ids, nearest parent first."""

    id: int
    kind: Kind
    parent_ids: list[int]


def _now_ns() -> int:
    return time.time_ns()


class MetaStore:
    """Thread-safe SQLite store; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers (caller holds the lock) ------------------------------------------------

    def _row(self, key: str) -> Info | None:
        row = self._db.execute(
            "SELECT id, key, parent, kind, created_ns, updated_ns, labels, size, inodes FROM snapshots WHERE key=?",
            (key,),
        ).fetchone()
        return _info(row) if row else None

    def _require(self, key: str) -> Info:
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        info = self._row(key)
        if info is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return info

    def _parent_ids(self, parent: str) -> list[int]:
        ids = []
        while parent:
            info = self._require(parent)
            ids.append(info.id)
            parent = info.parent
        return ids

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    # -- public API ---------------------------------------------------------------------

    def reserve_id(self) -> int:
        """A fresh id no snapshot has or will be given, for a later ``create(..., sid=)``."""
        with self._lock, self._tx():
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='snapshots'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', 1)")
                return 1
            self._db.execute("UPDATE sqlite_sequence SET seq=seq+1 WHERE name='snapshots'")
            return int(row[0]) + 1

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str], sid: int | None = None) -> Snapshot:
        """Add an active or view snapshot; the parent must exist and be committed.

        ``sid`` is an id from ``reserve_id`` (default: the next one).
        """
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgumentError(f"snapshot {key!r}: can only create active or view snapshots, not {kind.name}")
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        with self._lock, self._tx():
            if self._row(key) is not None:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            parent_ids: list[int] = []
            if parent:
                p = self._row(parent)
                if p is None:
                    raise NotFoundError(f"parent snapshot {parent!r} of {key!r} does not exist")
                if p.kind != Kind.COMMITTED:
                    raise InvalidArgumentError(f"parent {parent!r} of {key!r} is not committed")
                parent_ids = self._parent_ids(parent)
            now = _now_ns()
            cur = self._db.execute(
                "INSERT INTO snapshots (id, key, parent, kind, created_ns, updated_ns, labels) VALUES (?,?,?,?,?,?,?)",
                (sid, key, parent or None, int(kind), now, now, json.dumps(labels or {})),
            )
            return Snapshot(id=int(cur.lastrowid or 0), kind=kind, parent_ids=parent_ids)

    def get_snapshot(self, key: str) -> Snapshot:
        """The id, kind and parent ids of an active or view snapshot."""
        with self._lock:
            info = self._require(key)
            if info.kind == Kind.COMMITTED:
                raise FailedPreconditionError(f"snapshot {key!r} is committed; only active and view snapshots have mounts")
            return Snapshot(id=info.id, kind=info.kind, parent_ids=self._parent_ids(info.parent))

    def parents(self, key: str) -> list[Info]:
        """``key``'s parent chain, nearest first."""
        with self._lock:
            out = []
            parent = self._require(key).parent
            while parent:
                info = self._require(parent)
                out.append(info)
                parent = info.parent
            return out

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._row(key) is not None

    def stat(self, key: str) -> Info:
        with self._lock:
            return self._require(key)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int = 0, inodes: int = 0) -> Info:
        """Turn active snapshot ``key`` into committed ``name`` (same id).

        As in containerd's ``storage.CommitActive``, the committed snapshot is a new one:
        its created and updated times are both the commit time.
        """
        if not name:
            raise InvalidArgumentError(f"commit of {key!r}: name must not be empty")
        with self._lock, self._tx():
            info = self._require(key)
            if info.kind != Kind.ACTIVE:
                raise FailedPreconditionError(f"snapshot {key!r} is {info.kind.name.lower()}, only active ones can be committed")
            if self._row(name) is not None:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            now = _now_ns()
            self._db.execute(
                "UPDATE snapshots SET key=?, kind=?, created_ns=?, updated_ns=?, labels=?, size=?, inodes=? WHERE id=?",
                (name, int(Kind.COMMITTED), now, now, json.dumps(labels or {}), size, inodes, info.id),
            )
            return self._require(name)

    def remove(self, key: str) -> Info:
        """Delete ``key``; refused while another snapshot has it as parent."""
        with self._lock, self._tx():
            info = self._require(key)
            child = self._db.execute("SELECT key FROM snapshots WHERE parent=? LIMIT 1", (key,)).fetchone()
            if child:
                raise FailedPreconditionError(f"cannot remove snapshot {key!r}: snapshot {child[0]!r} is its child")
            self._db.execute("DELETE FROM snapshots WHERE id=?", (info.id,))
            return info

    def update(self, key: str, labels: dict[str, str], fieldpaths: list[str]) -> Info:
        """Update labels: ``labels`` replaces all, ``labels.K`` sets (or, when empty, deletes) one."""
        with self._lock, self._tx():
            info = self._require(key)
            new = dict(info.labels)
            if not fieldpaths:
                new = dict(labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    if labels.get(k):
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise InvalidArgumentError(f"cannot update field {path!r} of snapshot {key!r}: only labels are mutable")
            self._db.execute("UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?",
                             (json.dumps(new), _now_ns(), info.id))
            return self._require(key)

    def walk(self) -> list[Info]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, parent, kind, created_ns, updated_ns, labels, size, inodes FROM snapshots ORDER BY id"
            ).fetchall()
        return [_info(r) for r in rows]

    def ids(self) -> set[int]:
        with self._lock:
            return {int(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _info(row: tuple) -> Info:  # type: ignore[type-arg]
    return Info(id=int(row[0]), name=row[1], parent=row[2] or "", kind=Kind(row[3]), created_ns=int(row[4]),
                updated_ns=int(row[5]), labels=json.loads(row[6]), size=int(row[7]), inodes=int(row[8]))
