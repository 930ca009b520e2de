"""TLS is verified by default: the real daemon refuses a registry whose certificate it cannot verify.

A Debian ``docker-registry`` on 127.0.0.1 serves HTTPS with a certificate from a CA of this test.
``lazyd serve`` refuses it without a configured CA and with the wrong one (the error names the host
and the verification failure, and nothing falls back to plain HTTP), and mounts from it once
``hosts.toml`` names the CA.  The client-level counterpart is
tests/registry/test_hosts_tls.py::test_tls_registry_needs_its_ca.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.registry.helpers import make_ca, make_server_cert
from tests.support.lazyd import start_lazyd
from tests.support.registry import running_registry

from .conftest import Stored, write_config


def test_self_signed_registry_needs_its_ca(tmp_path: Path, stored: Stored) -> None:
    ca_pem, _, ca_cert, ca_key = make_ca("lazyd security test CA")
    other_ca_pem, *_ = make_ca("some other CA")
    cert_pem, key_pem = make_server_cert(ca_cert, ca_key)
    (tmp_path / "server.pem").write_bytes(cert_pem)
    (tmp_path / "server.key").write_bytes(key_pem)
    tls = {"certificate": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key")}
    layer = stored.image.layers[0]
    hosts_dir = tmp_path / "certs.d"
    config = write_config(tmp_path / "config.toml", hosts_dir)
    root, sock = tmp_path / "root", tmp_path / "run" / "lazyd.sock"
    with running_registry(tmp_path, name="tls", storage_root=stored.storage, tls=tls) as reg:
        ref = f"{reg.host}/{stored.name}"

        def mount(ca: bytes | None, name: str) -> subprocess.CompletedProcess[str]:
            """``lazyctl mount`` against a fresh daemon whose hosts.toml names ``ca`` (None: no hosts.toml)."""
            if ca is not None:
                host_dir = hosts_dir / reg.host
                host_dir.mkdir(parents=True, exist_ok=True)
                (host_dir / "ca.pem").write_bytes(ca)
                (host_dir / "hosts.toml").write_text('ca = "ca.pem"\n')
            mp = tmp_path / "mnt" / name
            mp.mkdir(parents=True)
            daemon = start_lazyd(root, sock, tmp_path / f"lazyd-{name}.log", config=config, workers=1)
            try:
                r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyctl", "--socket", str(sock), "mount", ref,
                                    layer.digest, str(mp)], capture_output=True, text=True, timeout=120)
                if r.returncode == 0:
                    assert (mp / "etc" / "hello.txt").read_text() == "hello from lazyd\n"
            finally:
                daemon.close(unmount=tmp_path / "mnt")
            return r

        for ca, name in ((None, "no-ca"), (other_ca_pem, "other-ca")):
            r = mount(ca, name)
            assert r.returncode == 1, r.stdout
            assert f"TLS certificate of {reg.host}" in r.stderr and "is not trusted" in r.stderr, r.stderr
            assert "certificate verify failed" in r.stderr, r.stderr
        log = reg.proc.log_text()
        assert "/v2/" not in log, "a request went through although the certificate was not trusted"
        assert "TLS handshake error" in log  # lazyd did try TLS, and hung up when verification failed
        r = mount(ca_pem, "right-ca")
        assert r.returncode == 0, r.stderr
        assert f"/v2/{stored.name.split(':')[0]}/blobs/{layer.digest}" in reg.proc.log_text()
