"""The worker's connection to the fetcher, for ``fetch`` requests.

One Unix-socket connection carries many pipelined requests (replies are matched
by ``id``).  A background thread connects, reconnects with backoff when the
fetcher goes away, and dispatches replies.  ``fetch`` blocks at most ``timeout``
seconds in total: while the fetcher is away it waits for the reconnection, and a
request lost with a dropped connection is sent again on the next one.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lazyd.api import wire
from lazyd.api.messages import ApiError, FetchArgs

log = logging.getLogger(__name__)


class FetchError(Exception):
    """A ``fetch`` failed; ``code`` is the protocol error code (or ``timeout``/``unavailable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class _Pending:
    """One request waiting for its reply."""

    event: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    lost: bool = False


class FetcherConnection:
    """A reconnecting, pipelining client of the fetcher's ``fetch`` op."""

    def __init__(self, socket_path: str, timeout: float, max_backoff: float = 1.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fetcher-conn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sock, self._sock = self._sock, None
            for pending in self._pending.values():
                pending.lost = True
                pending.event.set()
            self._cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread.is_alive():
            self._thread.join(5)

    # -- connection thread -------------------------------------------------

    def _run(self) -> None:
        backoff = 0.02
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.02
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                self._sock = sock
                self._cond.notify_all()
            log.info("connected to fetcher at %s", self.socket_path)
            self._receive(sock)
            with self._cond:
                if self._sock is sock:
                    self._sock = None
                for pending in self._pending.values():
                    pending.lost = True
                    pending.event.set()
                self._cond.notify_all()
            sock.close()
            if not self._closed:
                log.warning("lost the connection to the fetcher at %s; reconnecting", self.socket_path)

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                reply = wire.recv_frame(sock)
            except (EOFError, OSError, wire.ProtocolError) as exc:
                if not self._closed:
                    log.debug("fetcher connection ended: %s", exc)
                return
            request_id = reply.get("id")
            with self._cond:
                pending = self._pending.get(request_id) if isinstance(request_id, int) else None
            if pending is None:
                log.warning("reply for unknown request id %r from the fetcher", request_id)
                continue
            pending.reply = reply
            pending.event.set()

    # -- requests ----------------------------------------------------------

    def fetch(self, layer_digest: str, chunks: list[tuple[int, int]], timeout: float | None = None) -> None:
        """Ask the fetcher to store ``chunks`` ((blob_offset, inner_offset) pairs) of a layer.

        Returns once the fetcher answered success; raises ``FetchError`` otherwise,
        at the latest after ``timeout`` (default: the connection's timeout).
        """
        try:
            args = FetchArgs(layer_digest=layer_digest, chunks=[(int(b), int(i)) for b, i in chunks],
                             priority="demand").to_dict()
        except ApiError as exc:
            raise FetchError(exc.code, exc.message) from None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            sock = self._wait_connected(deadline)
            request_id = next(self._ids)
            pending = _Pending()
            with self._cond:
                self._pending[request_id] = pending
                if self._sock is not sock:  # dropped since _wait_connected: retry on the next one
                    pending.lost = True
                    pending.event.set()
            try:
                try:
                    if not pending.lost:
                        with self._send_lock:
                            wire.send_frame(sock, {"id": request_id, "op": "fetch", "args": args})
                except OSError:
                    pending.lost = True  # the receive thread notices and reconnects
                    self._drop(sock)
                else:
                    pending.event.wait(max(0.0, deadline - time.monotonic()))
                if pending.lost and pending.reply is None:
                    self._wait_gone(sock, deadline)
            finally:
                with self._cond:
                    self._pending.pop(request_id, None)
            if pending.reply is not None:
                return self._result(pending.reply, layer_digest)
            if not pending.lost or time.monotonic() >= deadline:
                raise FetchError("timeout", f"no answer from the fetcher for layer {layer_digest} in time")
            # Connection lost before the answer: send again on the next connection.

    def _drop(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wait_gone(self, sock: socket.socket, deadline: float) -> None:
        """Wait until the receive thread has retired ``sock`` (so a retry uses a new one)."""
        with self._cond:
            while self._sock is sock and not self._closed and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))

    def _wait_connected(self, deadline: float) -> socket.socket:
        with self._cond:
            while self._sock is None:
                if self._closed:
                    raise FetchError("unavailable", "the worker is shutting down")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FetchError("unavailable", f"the fetcher at {self.socket_path} is not reachable")
                self._cond.wait(remaining)
            return self._sock

    @staticmethod
    def _result(reply: dict[str, Any], layer_digest: str) -> None:
        failed = wire.reply_error(reply)  # never str()s the reply (a deep one would recurse)
        if failed is None:
            return None
        raise FetchError(*failed)
