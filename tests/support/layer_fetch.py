"""A built layer's TOC, and many concurrent ``fetch`` requests to ``lazyd serve`` (its dedupe tests)."""

from __future__ import annotations

import threading
from pathlib import Path

from lazyd.api.client import Client
from lazyd.estargz import TOC, decode_toc_member, read_footer


def toc_of(blob: Path) -> TOC:
    """The parsed TOC of the eStargz blob at ``blob``."""
    data = blob.read_bytes()
    footer = read_footer(data[-64:], len(data))
    return TOC.parse(decode_toc_member(data[footer.toc_offset : len(data) - footer.size]), None, footer.toc_offset)


def fetch_concurrently(socket: str, digest: str, chunks: list[tuple[int, int]], clients: int = 32,
                       timeout: float = 60) -> list[Exception]:
    """``clients`` threads, each on its own connection to ``socket``, send ``fetch(digest, chunks)``
    (``(blob_offset, inner_offset)`` pairs) at the same moment (a barrier); returns the errors they got
    (each thread is joined within ``timeout``)."""
    barrier = threading.Barrier(clients)
    errors: list[Exception] = []

    def fetch() -> None:
        with Client(socket, timeout=timeout) as client:
            barrier.wait()
            try:
                client.fetch(digest, chunks)
            except Exception as exc:  # noqa: BLE001 - returned to the caller
                errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
