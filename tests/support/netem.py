"""A slow registry link on loopback, for benchmarks and the demo.

This kernel has no netem, so bandwidth comes from an htb class on ``lo`` that matches
the registry's source port (the registry -> proxy leg, which carries the blob bytes),
and latency from a byte-counting TCP proxy that runs a delay line (half the RTT in each
direction; it does not cap bandwidth).  The qdisc is removed again on exit, also on errors.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from .tcpproxy import TCPProxy


def _tc(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {proc.stderr.strip()}")


@contextmanager
def htb_limit(sport: int, rate: str) -> Iterator[None]:
    """Limit traffic sent from TCP source port ``sport`` on ``lo`` to ``rate`` (e.g. ``200mbit``)."""
    _tc("qdisc", "del", "dev", "lo", "root", check=False)
    _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
    try:
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit")
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", rate, "ceil", rate)
        _tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "sport", str(sport), "0xffff", "flowid", "1:20")
        yield
    finally:
        _tc("qdisc", "del", "dev", "lo", "root", check=False)


@contextmanager
def throttled_proxy(registry_port: int, rate: str, rtt: float) -> Iterator[TCPProxy]:
    """Like ``throttled_link`` but yields the proxy itself, for its byte and request counters."""
    with htb_limit(registry_port, rate), TCPProxy(registry_port, latency=rtt / 2) as proxy:
        yield proxy


@contextmanager
def throttled_link(registry_port: int, rate: str, rtt: float) -> Iterator[str]:
    """Serve the registry at ``rate`` with ``rtt`` seconds of added round trip; yields ``host:port``."""
    with throttled_proxy(registry_port, rate, rtt) as proxy:
        yield proxy.host
