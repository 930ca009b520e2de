"""What an upstream registry saw, from the request heads a ``TCPProxy`` in front of it recorded."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from tests.support.tcpproxy import HTTPRequest, TCPProxy

_BLOB = re.compile(r"^/v2/.+/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_MANIFEST = re.compile(r"^/v2/.+/manifests/[^/]+$")


@dataclass(frozen=True)
class Traffic:
    """Requests and bytes one counting proxy saw between two ``reset()``s."""

    requests: tuple[HTTPRequest, ...]
    bytes_down: int
    connections: int

    @classmethod
    def of(cls, proxy: TCPProxy) -> Traffic:
        return cls(tuple(proxy.requests()), proxy.bytes_down, proxy.connections)

    def blob_gets(self, digest: str | None = None) -> list[HTTPRequest]:
        """GETs of blobs (of one blob with ``digest``), with or without a Range header."""
        return [r for r in self.requests if r.method == "GET" and (m := _BLOB.match(r.path.split("?", 1)[0]))
                and (digest is None or m.group("digest") == digest)]

    def whole_blob_gets(self, digest: str) -> list[HTTPRequest]:
        return [r for r in self.blob_gets(digest) if "range" not in r.headers]

    def range_gets(self, digest: str) -> list[HTTPRequest]:
        return [r for r in self.blob_gets(digest) if "range" in r.headers]

    def manifest_requests(self) -> list[HTTPRequest]:
        return [r for r in self.requests if _MANIFEST.match(r.path.split("?", 1)[0])]

    def summary(self) -> str:
        """``METHOD kind`` counts and the bytes, for failure messages and the measured report."""
        kinds: Counter[str] = Counter()
        for r in self.requests:
            path = r.path.split("?", 1)[0]
            kind = ("blob" + (" range" if "range" in r.headers else "") if _BLOB.match(path)
                    else "manifest" if _MANIFEST.match(path) else path)
            kinds[f"{r.method} {kind}"] += 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"{len(self.requests)} requests ({parts or 'none'}), {self.bytes_down} bytes down"
