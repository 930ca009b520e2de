"""Basic (htpasswd) and token auth against real registries, credentials from config.json and helpers."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

import pytest

from lazyd.registry import Reference, RegistryClient, UnauthorizedError
from tests.support.procs import free_port
from tests.support.registry import start_registry

from .helpers import BB, Images, blob_file, config, docker_auth, push_layout, run, serve, write_docker_config
from .tokenserver import TokenServer

PASSWORD = "s3cret-Pa55word-xyz"
IDENTITY = "identity-refresh-token-abc123"


def helper_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, secret: str) -> Path:
    """Install a fake ``docker-credential-test`` that answers ``get`` for any server."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    calls = tmp_path / "helper-calls"
    script = bindir / "docker-credential-test"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 1
read server
echo "$server" >> {calls}
printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}' "$server"
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return calls


def assert_no_secrets(caplog: pytest.LogCaptureFixture, *secrets: str, errors: list[str] = ()) -> None:
    text = caplog.text + "\n".join(errors)
    assert caplog.records, "expected DEBUG log records from the client"
    for s in secrets:
        assert s and s not in text, "a secret leaked into the logs"


def test_htpasswd_basic_auth(tmp_path: Path, busybox_images: Images, monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "alice", PASSWORD], check=True, capture_output=True)
    reg = start_registry(tmp_path, auth={"htpasswd": {"realm": "lazyd-test", "path": str(htpasswd)}})
    errors: list[str] = []
    try:
        r = Reference.parse(f"{reg.host}/{BB}:v1")

        async def main() -> None:
            cfg_file = tmp_path / "docker-config.json"
            # 1. no credentials: a typed error naming registry and scope
            async with RegistryClient(config(tmp_path)) as c:
                with pytest.raises(UnauthorizedError, match=rf"{reg.host}.*repository:{BB}:pull") as ei:
                    await c.resolve(r)
                errors.append(str(ei.value))
            # 2. wrong password
            write_docker_config(cfg_file, {"auths": {reg.host: {"auth": docker_auth("alice", "wrong-pw")}}})
            async with RegistryClient(config(tmp_path)) as c:
                with pytest.raises(UnauthorizedError, match="rejected the configured credentials") as ei:
                    await c.resolve(r)
                errors.append(str(ei.value))
            # 3. auths entry with "auth": push and pull
            write_docker_config(cfg_file, {"auths": {f"https://{reg.host}": {"auth": docker_auth("alice", PASSWORD)}}})
            async with RegistryClient(config(tmp_path)) as c:
                await push_layout(c, busybox_images.layout, "v1", r)
                img = await c.resolve(r)
                data = blob_file(reg, img.layers[0].digest).read_bytes()
                assert await c.fetch_ranges(r, img.layers[0].digest, [(0, 100), (1000, 10)]) == [data[:100], data[1000:1010]]
            # 4. credsStore helper
            calls = helper_on_path(tmp_path, monkeypatch, "alice", PASSWORD)
            write_docker_config(cfg_file, {"credsStore": "test"})
            async with RegistryClient(config(tmp_path)) as c:
                img2 = await c.resolve(r)
                assert img2.manifest_digest == img.manifest_digest
            assert calls.read_text().split() == [reg.host]

        run(main())
    finally:
        reg.stop()
    assert_no_secrets(caplog, PASSWORD, docker_auth("alice", PASSWORD), errors=errors)


def test_token_auth_refresh_helpers_and_identity_tokens(tmp_path: Path, busybox_images: Images,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = TokenServer(tmp_path, users={"bob": PASSWORD}, identity_tokens={IDENTITY: "bob"})
    server.port = free_port()
    errors: list[str] = []

    async def main() -> None:
        async with serve(server.app(), port=server.port):
            reg = await asyncio.to_thread(start_registry, tmp_path, auth=server.registry_auth())
            try:
                await scenario(reg)
            finally:
                await asyncio.to_thread(reg.stop)

    async def scenario(reg) -> None:  # type: ignore[no-untyped-def]
        r = Reference.parse(f"{reg.host}/tok/bb:v1")
        cfg_file = tmp_path / "docker-config.json"
        # anonymous: the token server hands out a token without access -> typed 401 error
        async with RegistryClient(config(tmp_path)) as c:
            with pytest.raises(UnauthorizedError, match=rf"{reg.host}.*repository:tok/bb:pull") as ei:
                await c.resolve(r)
            errors.append(str(ei.value))
        # credential helper for this host only (credHelpers)
        calls = helper_on_path(tmp_path, monkeypatch, "bob", PASSWORD)
        write_docker_config(cfg_file, {"credHelpers": {reg.host: "test"}})
        async with RegistryClient(config(tmp_path)) as c:
            await push_layout(c, busybox_images.layout, "v1", r)
            img = await c.resolve(r)
            assert any("push" in s for _, scopes in server.requests for s in scopes)
        assert reg.host in calls.read_text()
        # identity token from config.json -> refresh_token grant (POST)
        write_docker_config(cfg_file, {"auths": {reg.host: {"identitytoken": IDENTITY}}})
        async with RegistryClient(config(tmp_path)) as c:
            assert (await c.resolve(r)).manifest_digest == img.manifest_digest
        assert server.requests[-1][0] == "POST"
        # short-lived tokens (2 s, while expires_in claims 300): a 401 mid-session refreshes once
        server.lifetime, server.claimed_expires_in = 2.0, 300
        write_docker_config(cfg_file, {"auths": {reg.host: {"auth": docker_auth("bob", PASSWORD)}}})
        async with RegistryClient(config(tmp_path)) as c:
            layer = img.layers[0].digest
            first = await c.fetch_ranges(r, layer, [(0, 64)])
            issued = len(server.issued)
            await asyncio.sleep(3)
            assert await c.fetch_ranges(r, layer, [(0, 64)]) == first
            assert len(server.issued) == issued + 1  # the expired token was replaced after the 401
            await asyncio.sleep(3)
            await c.fetch_blob(r, layer, tmp_path / "layer")
            assert len(server.issued) == issued + 2

    run(main())
    assert_no_secrets(caplog, PASSWORD, IDENTITY, *server.issued, errors=errors)
