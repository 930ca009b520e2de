"""Where the metrics endpoint listens: only the configured address (TCP or a Unix socket, mode 0600);
a bad ``metrics_address`` or ``log_format`` is a start-up error naming the key, an address in use too."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port

from .conftest import MetricsFactory
from .scrape import scrape

TCP_LISTEN = "0A"


def listening_tcp(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != TCP_LISTEN or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:  # four host-order 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((addr, int(port_hex, 16)))
    return found


def test_tcp_endpoint_binds_only_the_configured_address(metrics_daemon: MetricsFactory) -> None:
    md = metrics_daemon()
    assert md.daemon.proc is not None
    host, port = md.address.rsplit(":", 1)
    assert listening_tcp(md.daemon.proc.pid) == [(host, int(port))]
    s = scrape(md.address)
    assert s.value("lazyd_workers", state="ready") == 1
    assert any(f"metrics on http://{md.address}/metrics" in line for line in md.log_lines())
    # Nothing else is served there.
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(64).split(b"\r\n")[0].endswith(b" 404 Not Found")


def test_unix_socket_endpoint(metrics_daemon: MetricsFactory) -> None:
    md = metrics_daemon(unix=True)
    path = Path(md.address)
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert md.daemon.proc is not None and listening_tcp(md.daemon.proc.pid) == []
    s = scrape(md.address)
    assert s.value("lazyd_workers", state="ready") == 1
    md.daemon.shutdown()
    assert not path.exists(), "the socket is removed when the daemon stops"


def serve(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    """``lazyd serve`` with ``config`` (expected to fail at start-up)."""
    (tmp_path / "config.toml").write_text(config + f'\n[registry]\nhosts_dir = "{tmp_path / "certs.d"}"\n')
    return subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(tmp_path / "config.toml"),
                           "--root", str(tmp_path / "root"), "--socket", str(tmp_path / "run" / "lazyd.sock")],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("line", "error"), [
    ('metrics_address = "localhost:9101"', "config key metrics_address: 'localhost:9101' host 'localhost' is not an "
                                           "IP address"),
    ('metrics_address = "127.0.0.1"', "config key metrics_address: '127.0.0.1' must be HOST:PORT"),
    ('metrics_address = "127.0.0.1:0"', "config key metrics_address: '127.0.0.1:0' port '0' is not between 1 and"),
    ('metrics_address = "::1:9101"', "config key metrics_address: '::1:9101' an IPv6 address must be in brackets"),
    ('metrics_address = "run/metrics.sock"', "config key metrics_address: 'run/metrics.sock' must be HOST:PORT"),
    ('metrics_address = 9101', "metrics_address: expected str or NoneType, got 9101"),
    ('log_format = "xml"', "config key log_format: 'xml' must be one of text, json"),
])
def test_bad_config_is_a_startup_error(tmp_path: Path, line: str, error: str) -> None:
    r = serve(tmp_path, line)
    assert r.returncode == 2, r.stderr
    assert error in r.stderr, r.stderr
    assert not (tmp_path / "root").exists(), "nothing is written before the config is checked"


def test_address_in_use_is_a_startup_error(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = serve(tmp_path, f'metrics_address = "127.0.0.1:{port}"\nworkers = 1')
    assert r.returncode == 1, r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not list((tmp_path / "root").glob("workers/*/worker.json")), "no worker was started"
    assert not (tmp_path / "run" / "lazyd.sock").exists()
