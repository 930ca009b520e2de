"""A local registry that is down when lazyd first reaches for it is probed again later.

The plain-HTTP fallback for a local endpoint is decided by a TLS handshake. A handshake that
cannot connect decides nothing: it must not pin ``https`` on a registry that turns out to
speak plain HTTP once it is up (found by tests/e2e/test_registry_down.py: after a restart of
lazyd while the registry was down, no read ever worked again).
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from lazyd.registry import Reference, RegistryClient, RegistryConfig, UnreachableError
from tests.support.procs import free_port


async def _v2(_request: web.Request) -> web.Response:
    return web.json_response({})


def test_unreachable_local_registry_is_probed_again_once_up() -> None:
    async def main() -> None:
        port = free_port()
        ref = Reference.parse(f"127.0.0.1:{port}/x:latest")
        async with RegistryClient(RegistryConfig(retries=0, connect_timeout=2.0)) as client:
            with pytest.raises(UnreachableError):
                await client.ping(ref)  # nothing listens yet
            app = web.Application()
            app.router.add_get("/v2/", _v2)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                await client.ping(ref)  # plain HTTP now: the failed probe was not remembered
            finally:
                await runner.cleanup()

    asyncio.run(main())
