"""Shared helpers of the registry and convert tests: images, registries and small aiohttp fronts."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.support.images import build_busybox, push
from tests.support.registry import Registry, start_registry

BB = "bb"


@dataclass
class Images:
    """Local busybox OCI layouts: tag v1 (one layer) and v2 (two layers, whiteouts, 9 MiB file)."""

    layout: Path

    def src(self, tag: str) -> str:
        return f"oci:{self.layout}:{tag}"


@pytest.fixture(scope="session")
def busybox_images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("busybox")
    layout = root / "layout"
    build_busybox(layout, "v1")
    build_busybox(layout, "v2", with_deletions=True)
    return Images(layout)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, busybox_images: Images) -> Registry:
    """An anonymous registry holding bb:v1, bb:v2 (OCI) and bb:docker (Docker schema 2)."""
    work = tmp_path_factory.mktemp("registry")
    reg = start_registry(work)
    try:
        push(busybox_images.src("v1"), reg.host, f"{BB}:v1")
        push(busybox_images.src("v2"), reg.host, f"{BB}:v2")
        push(busybox_images.src("v1"), reg.host, f"{BB}:docker", fmt="v2s2")
        yield reg
    finally:
        reg.stop()


def blob_file(reg: Registry, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob."""
    return reg.blob_path(digest)


def config(tmp_path: Path, **kw: object) -> RegistryConfig:
    """A client config with its own (empty unless written) hosts dir and docker config."""
    kw.setdefault("hosts_dir", str(tmp_path / "certs.d"))
    kw.setdefault("docker_config", str(tmp_path / "docker-config.json"))
    kw.setdefault("backoff", 0.05)
    return RegistryConfig(**kw)  # type: ignore[arg-type]


def write_hosts(tmp_path: Path, host: str, text: str) -> Path:
    d = tmp_path / "certs.d" / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@asynccontextmanager
async def serve(app: web.Application, port: int = 0, ssl_context: object = None) -> AsyncIterator[int]:
    """Run an aiohttp app on 127.0.0.1 (a free port by default) in the current loop; yields the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)  # type: ignore[arg-type]
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port
    finally:
        await runner.cleanup()


@dataclass
class FrontLog:
    """What a front server saw: (method, path, headers) per request."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if m == method and contains in p)


SESSION = web.AppKey("session", ClientSession)
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def ticker(stalls: list[float], interval: float) -> None:
    """Sleep ``interval`` seconds again and again (until cancelled), appending to ``stalls`` how long
    each sleep really took: a long one is the event loop stalled by something else."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(interval)
        now = time.perf_counter()
        stalls.append(now - last)
        last = now


def proxy_app(upstream: str, log: FrontLog,
              hook: Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse | None]] | None = None,
              edit_body: Callable[[web.Request, bytes], bytes] | None = None) -> web.Application:
    """A reverse proxy to ``upstream``; ``hook`` may answer a request itself or edit forwarded headers."""

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        log.requests.append((request.method, request.path_qs, dict(request.headers)))
        if hook is not None:
            answer = await hook(request, headers)
            if answer is not None:
                return answer
        session: ClientSession = request.app[SESSION]
        body = await request.read()
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body or None,
                                   allow_redirects=False) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if "Location" in out_headers and out_headers["Location"].startswith(upstream):
                out_headers["Location"] = out_headers["Location"][len(upstream):]
            if edit_body is not None:
                data = edit_body(request, data)
            return web.Response(status=up.status, headers=out_headers, body=data)

    async def on_startup(app: web.Application) -> None:
        app[SESSION] = ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[SESSION].close()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handler)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def make_ca(common_name: str = "lazyd test CA") -> tuple[bytes, bytes, object, object]:
    """A self-signed CA: (cert PEM, key PEM, cert object, key object)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem, cert, key


def make_server_cert(ca_cert: object, ca_key: object, ip: str = "127.0.0.1", client: bool = False) -> tuple[bytes, bytes]:
    """A server (or, with ``client``, a client) certificate for ``ip`` signed by the CA: (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def docker_auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_docker_config(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


async def push_layout(client: RegistryClient, layout: Path, tag: str, dst: Reference) -> str:
    """Push an OCI layout image (``layout:tag``) with our client; returns the manifest digest."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

    def blob(digest: str) -> Path:
        algo, hexd = digest.split(":")
        return layout / "blobs" / algo / hexd

    manifest = blob(desc["digest"]).read_bytes()
    doc = json.loads(manifest)
    for d in [doc["config"], *doc["layers"]]:
        await client.push_blob(dst, d["digest"], blob(d["digest"]))
    return await client.put_manifest(dst, manifest, desc["mediaType"])
