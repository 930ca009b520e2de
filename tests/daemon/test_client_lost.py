"""AsyncClient: a connection lost while a request is being written is one error, and no other."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from lazyd.api import wire
from lazyd.api.client import AsyncClient
from lazyd.api.messages import ApiError


def test_connection_lost_while_writing_leaves_no_unretrieved_future(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver fails every pending request when the connection drops; a request still being
    written raises the write's error, and its future's error must not be left for asyncio to report
    as "Future exception was never retrieved" (a stray line in the daemon's log, seen after a worker
    was killed)."""
    path = tmp_path / "api.sock"

    async def run() -> list[str]:
        reported: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(str(ctx.get("message"))))
        server = await asyncio.start_unix_server(lambda _r, _w: None, path=str(path))
        client = AsyncClient(str(path), timeout=5)

        async def write_as_the_peer_goes(*_args: object) -> None:
            client._fail_all()  # noqa: SLF001 - what the receiver does when the connection drops
            raise ConnectionResetError("peer gone")

        monkeypatch.setattr(wire, "write_frame", write_as_the_peer_goes)
        with pytest.raises(ApiError, match="lost: peer gone"):
            await client.call("status")
        await client.close()
        server.close()
        await server.wait_closed()
        gc.collect()
        await asyncio.sleep(0)
        return reported

    assert asyncio.run(run()) == []
