"""hosts.toml mirrors (a dead one, a pull-through docker-registry) and a TLS registry with its own CA."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lazyd.registry import Reference, RegistryClient, RegistryError, UnreachableError
from tests.support.images import push
from tests.support.procs import free_port
from tests.support.registry import Registry, running_registry, start_registry

from .helpers import BB, Images, blob_file, config, make_ca, make_server_cert, run, write_hosts


def test_dead_mirror_then_pull_through_mirror_then_upstream(tmp_path: Path, registry: Registry) -> None:
    mirror = start_registry(tmp_path, name="mirror", proxy_remote=registry.url)
    dead = free_port()
    try:
        write_hosts(tmp_path, registry.host, f'''
server = "http://{registry.host}"
[host."http://127.0.0.1:{dead}"]
  capabilities = ["pull", "resolve"]
[host."http://{mirror.host}"]
  capabilities = ["pull", "resolve"]
''')

        async def main() -> None:
            async with RegistryClient(config(tmp_path, retries=2)) as c:
                r = Reference.parse(f"{registry.host}/{BB}:v2")
                t0 = time.monotonic()
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                assert await c.fetch_ranges(r, layer.digest, [(0, 10), (3000, 10)]) == [data[:10], data[3000:3010]]
                await c.fetch_blob(r, layer.digest, tmp_path / "blob")
                assert (tmp_path / "blob").read_bytes() == data
                assert time.monotonic() - t0 < 5  # the dead mirror is skipped, not retried with backoff
            mirror_log = mirror.proc.log_text()
            assert f"/v2/{BB}/manifests/v2" in mirror_log and f"/v2/{BB}/blobs/{layer.digest}" in mirror_log
            # With the mirror stopped as well, the upstream serves.
            mirror.stop()
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                img2 = await c.resolve(Reference.parse(f"{registry.host}/{BB}:v2"))
                assert img2.manifest_digest == img.manifest_digest
        run(main())
    finally:
        mirror.stop()


@contextmanager
def _tls_registry(tmp_path: Path, client_certs: bool = False) -> Iterator[tuple[Registry, bytes, object, object]]:
    """An HTTPS registry with a certificate from a new CA (with ``client_certs``, it asks for client
    certificates from that CA); yields (registry, CA cert PEM, CA cert, CA key)."""
    ca_pem, _, ca_cert, ca_key = make_ca()
    cert_pem, key_pem = make_server_cert(ca_cert, ca_key)
    for name, data in (("ca.pem", ca_pem), ("server.pem", cert_pem), ("server.key", key_pem)):
        (tmp_path / name).write_bytes(data)
    tls: dict[str, object] = {"certificate": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key")}
    if client_certs:
        tls["clientcas"] = [str(tmp_path / "ca.pem")]
    with running_registry(tmp_path, tls=tls) as reg:
        yield reg, ca_pem, ca_cert, ca_key


def test_tls_registry_needs_its_ca(tmp_path: Path, busybox_images: Images) -> None:
    with _tls_registry(tmp_path) as (reg, ca_pem, _, _):
        push(busybox_images.src("v1"), reg.host, f"{BB}:v1")
        r = Reference.parse(f"{reg.host}/{BB}:v1")

        async def main() -> None:
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                with pytest.raises(UnreachableError, match="certificate.*not trusted|CERTIFICATE_VERIFY_FAILED"):
                    await c.resolve(r)
            d = write_hosts(tmp_path, reg.host, 'ca = "ca.pem"\n')
            (d / "ca.pem").write_bytes(ca_pem)
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                img = await c.resolve(r)
                data = blob_file(reg, img.layers[0].digest).read_bytes()
                assert await c.fetch_ranges(r, img.layers[0].digest, [(5, 5)]) == [data[5:10]]
            # plain HTTP is not an escape hatch: the same host over http:// in hosts.toml fails
            (d / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                with pytest.raises(RegistryError, match="HTTP 400"):
                    await c.resolve(r)
        run(main())


def test_tls_registry_requiring_a_client_certificate(tmp_path: Path, busybox_images: Images) -> None:
    with _tls_registry(tmp_path, client_certs=True) as (reg, ca_pem, ca_cert, ca_key):
        client_pem, client_key = make_server_cert(ca_cert, ca_key, client=True)
        push_args = ["--dest-cert-dir", str(tmp_path / "skopeo-certs")]
        (tmp_path / "skopeo-certs").mkdir()
        (tmp_path / "skopeo-certs/client.cert").write_bytes(client_pem)
        (tmp_path / "skopeo-certs/client.key").write_bytes(client_key)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *push_args, busybox_images.src("v1"),
                        f"docker://{reg.host}/{BB}:v1"], check=True, capture_output=True)
        d = write_hosts(tmp_path, reg.host, 'ca = "ca.pem"\n')
        (d / "ca.pem").write_bytes(ca_pem)
        r = Reference.parse(f"{reg.host}/{BB}:v1")

        async def main() -> None:
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                with pytest.raises(UnreachableError):
                    await c.resolve(r)  # no client certificate: the handshake is refused
            (d / "client.pem").write_bytes(client_pem)
            (d / "client.key").write_bytes(client_key)
            (d / "hosts.toml").write_text('ca = "ca.pem"\nclient = [["client.pem", "client.key"]]\n')
            async with RegistryClient(config(tmp_path, retries=0)) as c:
                img = await c.resolve(r)
                assert len(img.layers) == 1
        run(main())
