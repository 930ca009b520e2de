"""A small real fetcher for the FUSE tests: serves the ``fetch`` op from local blobs.

It speaks the fetcher side of the worker contract over a Unix socket: for each
requested chunk it reads ``blob[blob_offset:blob_end]`` of a local eStargz blob,
verifies it with ``decode_chunk`` and stores it in the ``ChunkStore``.  Tests can
corrupt chunks (the bytes are flipped before verification, as a bad registry
would), count requests, and stop/restart the server to play a dying fetcher.
"""

from __future__ import annotations

import gzip
import os
import zlib
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lazyd.api import wire
from lazyd.api.messages import ApiError, FetchArgs
from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.estargz import FOOTER_SIZE, TOC, ChunkDigestMismatch, decode_chunk, decode_toc_member, parse_footer
from tests.support.procs import shutdown_quietly


@dataclass
class LocalLayer:
    """An eStargz blob on disk and its parsed TOC."""

    digest: str
    blob: bytes
    toc: TOC
    toc_json: bytes

    @classmethod
    def load(cls, path: Path, digest: str) -> "LocalLayer":
        blob = path.read_bytes()
        toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
        toc_json = decode_toc_member(blob[toc_offset : len(blob) - FOOTER_SIZE])
        return cls(digest, blob, TOC.parse(toc_json, toc_offset=toc_offset), toc_json)


@dataclass
class FetchStats:
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    requested: list[tuple[int, int]] = field(default_factory=list)


class LocalFetcher:
    """Unix-socket server answering ``fetch`` from local blobs into a ChunkStore."""

    def __init__(self, socket_path: Path, store: ChunkStore) -> None:
        self.socket_path = socket_path
        self.store = store
        self.layers: dict[str, LocalLayer] = {}
        self.corrupt: set[tuple[str, int]] = set()  # (layer digest, blob offset)
        self.delay = 0.0
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def add(self, layer: LocalLayer) -> None:
        self.layers[layer.digest] = layer

    def start(self) -> None:
        if self.socket_path.exists():
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        listener.listen(16)
        self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Close the listener and every connection, like a fetcher that died."""
        listener, self._listener = self._listener, None
        if listener is not None:
            shutdown_quietly(listener)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            shutdown_quietly(conn)
            conn.close()
        for t in self._threads:
            t.join(5)
        self._threads = []
        self.socket_path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        while True:
            try:
                request = wire.recv_frame(conn)
            except (EOFError, OSError, wire.ProtocolError):
                return
            threading.Thread(target=self._answer, args=(conn, send_lock, request), daemon=True).start()

    def _answer(self, conn: socket.socket, send_lock: threading.Lock, request: dict) -> None:
        request_id = request.get("id")
        try:
            reply = wire.ok_reply(request_id, self._fetch(request))
        except _Failure as exc:
            with self._lock:
                self.stats.errors += 1
            reply = wire.error_reply(request_id, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a test fetcher bug must show up as a reply
            reply = wire.error_reply(request_id, "internal", f"{type(exc).__name__}: {exc}")
        try:
            with send_lock:
                wire.send_frame(conn, reply)
        except OSError:
            pass

    def _fetch(self, request: dict) -> dict:
        if request.get("op") != "fetch":
            raise _Failure("unknown_op", f"unknown op {request.get('op')!r}")
        try:
            args = FetchArgs.from_args(request.get("args"))
        except ApiError as exc:
            raise _Failure(exc.code, exc.message) from None
        layer = self.layers.get(args.layer_digest)
        if layer is None:
            raise _Failure("not_found", f"layer {args.layer_digest!r} is not known")
        wanted = list(args.chunks)
        with self._lock:
            self.stats.requests += 1
            self.stats.chunks += len(wanted)
            self.stats.requested.extend(wanted)
        if self.delay:
            threading.Event().wait(self.delay)
        index = {(c.blob_offset, c.inner_offset): c for c in layer.toc.chunks}
        for key in wanted:
            chunk = index.get(key)
            if chunk is None:
                raise _Failure("invalid_request", f"no chunk at {key} in {layer.digest}")
            compressed = layer.blob[chunk.blob_offset : chunk.blob_end]
            if (layer.digest, chunk.blob_offset) in self.corrupt:
                compressed = _corrupted(compressed, chunk.inner_offset)
            try:
                data = decode_chunk(chunk, compressed)
            except (ChunkDigestMismatch, Exception) as exc:  # a corrupt gzip member may fail before the digest
                raise _Failure("digest_mismatch", f"chunk at {chunk.blob_offset} of {layer.digest}: {exc}") from exc
            self.store.put(ChunkKey(layer.digest, chunk.blob_offset, chunk.inner_offset), data)
        return {}


def _corrupted(member: bytes, inner_offset: int) -> bytes:
    """The same gzip member with one payload byte flipped (still valid gzip, wrong content)."""
    raw = bytearray(zlib.decompressobj(31).decompress(member))
    raw[inner_offset] ^= 0xFF
    return gzip.compress(bytes(raw)) + bytes(max(0, len(member) - 20))


class _Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
