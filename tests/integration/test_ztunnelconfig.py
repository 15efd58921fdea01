"""`ambientctl ztunnel-config` against a stand-in admin server on loopback."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from ambientctl import cli
from ambientctl.ztunnel_json import kind_json
from tests.conftest import LoopbackAllocator
from tests.unit.test_cli import canned_dump


def admin_stand_in(
    status: int, body: bytes, seen: list[bytes]
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        seen.append(request.split(b"\r\n", 1)[0])
        head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        await stream.send_all(head.encode() + body)
        await stream.aclose()

    return handler


async def run_cli(*argv: str) -> int:
    return await trio.to_thread.run_sync(cli.main, list(argv))


async def test_workloads_from_a_live_dump(
    nursery: trio.Nursery, loopback: LoopbackAllocator, capsys: pytest.CaptureFixture[str]
) -> None:
    address = loopback.new()
    seen: list[bytes] = []
    body = json.dumps(canned_dump()).encode()
    await nursery.start(
        partial(trio.serve_tcp, admin_stand_in(200, body, seen), 15000, host=address)
    )
    assert await run_cli("ztunnel-config", "workload", "--address", address) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAMESPACE", "POD", "NAME"]
    assert "productpage-v1" in out and "sleep" in out
    assert seen == [b"GET /config_dump HTTP/1.1"]

    assert await run_cli("ztunnel-config", "services", "--address", address, "-o", "json") == 0
    dump = canned_dump()
    assert json.loads(capsys.readouterr().out) == kind_json("services", dump["services"], dump)


async def test_admin_errors_are_reported(
    nursery: trio.Nursery, loopback: LoopbackAllocator, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = loopback.new()
    assert await run_cli("ztunnel-config", "workloads", "--address", refused) == 1
    assert f"cannot reach ztunnel admin at http://{refused}:15000/config_dump" in (
        capsys.readouterr().err
    )

    failing, garbled = loopback.new(), loopback.new()
    await nursery.start(
        partial(trio.serve_tcp, admin_stand_in(503, b"not ready", []), 15000, host=failing)
    )
    await nursery.start(
        partial(trio.serve_tcp, admin_stand_in(200, b"<html>", []), 15000, host=garbled)
    )
    assert await run_cli("ztunnel-config", "policies", "--address", failing) == 1
    assert "answered 503: not ready" in capsys.readouterr().err
    assert await run_cli("ztunnel-config", "policies", "--address", garbled) == 1
    assert "did not return JSON" in capsys.readouterr().err
