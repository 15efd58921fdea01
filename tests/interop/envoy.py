"""Envoy as a reference HBONE peer for the interop tests: the bootstrap builders and the
process runner live in ``bench.envoyconf`` (the benchmarks use them too); this module
re-exports them and adds test-only helpers."""

from __future__ import annotations

import re

import httpx
import trio

from bench.envoyconf import (
    Config,
    EnvoyProcess,
    bootstrap,
    envoy_binary,
    hbone_client_listener,
    hbone_server_listener,
    hbone_upstream_cluster,
    original_dst_cluster,
    run_envoy,
)

__all__ = [
    "Config", "EnvoyProcess", "bootstrap", "envoy_binary", "envoy_stat",
    "hbone_client_listener", "hbone_server_listener", "hbone_upstream_cluster",
    "original_dst_cluster", "receive_until_closed", "run_envoy",
]


async def envoy_stat(admin: tuple[str, int], name: str) -> int:
    """One counter from Envoy's admin /stats (0 while Envoy has not created it), so a test
    can tell which side of a connection gave up."""
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(
            f"http://{admin[0]}:{admin[1]}/stats", params={"filter": f"^{re.escape(name)}$"}
        )
    response.raise_for_status()
    for line in response.text.splitlines():
        stat, _, value = line.partition(": ")
        if stat == name:
            return int(value)
    return 0


async def receive_until_closed(stream: trio.abc.ReceiveStream, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (EOF or reset both count as closed)."""
    received = bytearray()
    with trio.fail_after(timeout):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(received)
