"""A byte-counting TCP proxy (for measuring what is fetched from a registry), with optional latency.

``TCPProxy(upstream_port).start()`` listens on 127.0.0.1:``port`` and forwards each
connection to the upstream.  It counts bytes in both directions and records the
HTTP request heads sent upstream, so tests can count e.g. range GETs of one blob.
``delay`` (seconds) is slept before forwarding each chunk read from the upstream
(this caps throughput at one chunk per delay).  ``latency`` (seconds, one way) instead
runs a delay line in both directions: a reader timestamps each chunk and a separate
writer forwards it once ``now >= t_read + latency``, so the round trip grows by
``2 * latency`` while bandwidth is left to whatever limits the upstream link.
"""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
from dataclasses import dataclass

from .procs import shutdown_quietly


@dataclass(frozen=True)
class HTTPRequest:
    """One request head seen on its way upstream."""

    method: str
    path: str
    headers: dict[str, str]


class TCPProxy:
    """Threaded TCP forwarder with byte counters; use as a context manager or call start()/stop()."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", delay: float = 0.0,
                 chunk_size: int = 65536, latency: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.latency = latency
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self.bytes_down = 0  # upstream -> client
        self.bytes_up = 0    # client -> upstream
        self.connections = 0
        self._heads: list[bytes] = []  # raw client->upstream stream per connection
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TCPProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TCPProxy:
        self._listener.listen(128)
        t = threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            shutdown_quietly(s)
            s.close()
        for t in self._threads:
            t.join(5)

    def reset(self) -> None:
        """Zero the counters and forget recorded requests."""
        with self._lock:
            self.bytes_down = self.bytes_up = self.connections = 0
            self._heads = [b"" for _ in self._heads]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                index = len(self._heads)
                self._heads.append(b"")
                self._socks.update((client, upstream))
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                if self.latency > 0:
                    line: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
                    workers = [threading.Thread(target=self._read_line, args=(src, line, up, index), daemon=True),
                               threading.Thread(target=self._write_line, args=(line, dst), daemon=True)]
                else:
                    workers = [threading.Thread(target=self._pump, args=(src, dst, up, index), daemon=True)]
                for t in workers:
                    t.start()
                    self._threads.append(t)

    def _count(self, data: bytes, up: bool, index: int) -> None:
        with self._lock:
            if up:
                self.bytes_up += len(data)
                self._heads[index] += data
            else:
                self.bytes_down += len(data)

    def _read_line(self, src: socket.socket, line: queue.SimpleQueue[tuple[float, bytes] | None],
                   up: bool, index: int) -> None:
        """Delay-line input: timestamp each chunk as it arrives; ``None`` marks EOF."""
        try:
            while True:
                data = src.recv(self.chunk_size)
                if not data:
                    break
                self._count(data, up, index)
                line.put((time.monotonic() + self.latency, data))
        except OSError:
            pass
        finally:
            line.put(None)

    def _write_line(self, line: queue.SimpleQueue[tuple[float, bytes] | None], dst: socket.socket) -> None:
        """Delay-line output: forward each chunk once its due time has come."""
        try:
            while True:
                item = line.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shutdown_quietly(dst, socket.SHUT_WR)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, index: int) -> None:
        try:
            while True:
                data = src.recv(self.chunk_size)
                if not data:
                    break
                if not up and self.delay:
                    time.sleep(self.delay)
                self._count(data, up, index)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shutdown_quietly(dst, socket.SHUT_WR)

    def requests(self) -> list[HTTPRequest]:
        """HTTP request heads sent upstream (bodies of PUT/POST/PATCH are skipped by Content-Length)."""
        with self._lock:
            streams = list(self._heads)
        out = []
        for stream in streams:
            pos = 0
            while True:
                end = stream.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                lines = stream[pos:end].decode("latin-1").split("\r\n")
                m = re.match(r"^([A-Z]+) (\S+) HTTP/", lines[0])
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                pos = end + 4 + int(headers.get("content-length", "0") or 0)
                if m:
                    out.append(HTTPRequest(m.group(1), m.group(2), headers))
        return out

    def range_requests(self, digest: str | None = None) -> list[HTTPRequest]:
        """GETs with a Range header, optionally only those of one blob."""
        return [r for r in self.requests() if r.method == "GET" and "range" in r.headers
                and (digest is None or r.path.endswith(f"/blobs/{digest}"))]
