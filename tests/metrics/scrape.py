"""Scraping lazyd's ``/metrics`` (TCP or Unix socket) and looking samples up in the parsed text."""

from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Scrape:
    """One answer of ``GET /metrics``: its text, its samples, its families' types and how long it took."""

    text: str
    samples: list[Sample]
    types: dict[str, str]
    seconds: float
    content_type: str

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples called ``name`` whose labels include ``labels``."""
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` with ``labels`` (AssertionError naming it when there is not exactly one)."""
        found = self.find(name, **labels)
        assert len(found) == 1, f"{len(found)} samples {name}{labels}:\n" + "\n".join(
            line for line in self.text.splitlines() if line.startswith(name))
        return found[0].value

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        """The sample's value, or ``default`` when there is none (a series not made yet)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{len(found)} samples {name}{labels}"
        return found[0].value if found else default


def scrape(address: str, timeout: float = 10.0) -> Scrape:
    """``GET /metrics`` from ``address`` (``IP:PORT`` or a Unix socket path); the text is parsed with
    prometheus-client's parser, so a malformed exposition fails here."""
    started = time.monotonic()
    if address.startswith("/"):
        conn: http.client.HTTPConnection = _UnixHTTPConnection(address, timeout)
    else:
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, f"GET /metrics: HTTP {resp.status}\n{body[:2000]}"
        content_type = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    seconds = time.monotonic() - started
    samples, types = [], {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        samples += [Sample(s.name, dict(s.labels), s.value) for s in family.samples]
    return Scrape(body, samples, types, seconds, content_type)
