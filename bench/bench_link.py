#!/usr/bin/env python3
"""Check the emulated slow link of ``tests/support/netem.py`` against its settings.

Pushes a random 20 MB blob to a real registry, then through ``throttled_proxy(rate, rtt)``
measures a full blob GET (should run at about ``rate``) and the median of 21 tiny range GETs
(should take about ``rtt`` longer than through an unthrottled proxy).

Run as root:  python3 bench/bench_link.py
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import load, signals_as_exit, table  # noqa: E402
from tests.support.netem import throttled_proxy  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

SAMPLES = 21
BLOB_SIZE = 20 * 1000 * 1000
LINKS = (("200mbit", 200e6, 0.010), ("50mbit", 50e6, 0.040))


def upload(host: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"http://{host}/v2/bench/blobs/uploads/", method="POST")
    location = urllib.request.urlopen(start).headers["Location"]
    sep = "&" if "?" in location else "?"
    urllib.request.urlopen(urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                                  headers={"Content-Type": "application/octet-stream"}))
    return digest


def timed_get(host: str, path: str, headers: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    urllib.request.urlopen(urllib.request.Request(f"http://{host}{path}", headers=headers or {})).read()
    return time.monotonic() - t0


def main() -> int:
    rows = []
    with signals_as_exit(), tempfile.TemporaryDirectory() as work:
        reg = start_registry(Path(work))
        try:
            path = f"/v2/bench/blobs/{upload(reg.host, os.urandom(BLOB_SIZE))}"
            tiny = {"Range": "bytes=0-99"}
            for rate, bits, rtt in LINKS:
                with TCPProxy(reg.port) as plain:
                    direct = statistics.median(timed_get(plain.host, path, tiny) for _ in range(SAMPLES))
                with throttled_proxy(reg.port, rate, rtt) as proxy:
                    small = statistics.median(timed_get(proxy.host, path, tiny) for _ in range(SAMPLES))
                    full = timed_get(proxy.host, path)
                rows.append([rate, f"{rtt * 1000:.0f}", f"{BLOB_SIZE * 8 / full / 1e6:.1f}",
                             f"{BLOB_SIZE * 8 / full / bits:.2f}", f"{direct * 1000:.1f}", f"{small * 1000:.1f}",
                             f"{(small - direct) * 1000:.1f}", load()])
        finally:
            reg.stop()
    print(table(rows, ["rate", "rtt ms", "20 MB GET Mbit/s", "x rate", "tiny GET unthrottled proxy ms",
                       "tiny GET via link ms", "added ms", "load avg"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
