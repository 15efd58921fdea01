"""Shared pieces for the HBONE / pool tests: a test mesh's TLS contexts and small servers."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import partial

import trio

from ambient_api.identity import SpiffeId
from ambient_dataplane.drain import Drain
from ambient_dataplane.hbone import (
    ConnectHandler,
    ConnectRequest,
    HboneResponder,
    serve_hbone_tls,
    splice,
)
from ambient_dataplane.tls import CertifiedKey, client_context, server_context
from tests.pki import IssuedCert, TestPki

HBONE_PORT = 15008


def certified(issued: IssuedCert) -> CertifiedKey:
    return CertifiedKey.from_pem(issued.chain_pem, issued.key_pem)


@dataclass
class TestMesh:
    """One CA, a server identity and a client identity with their contexts."""

    __test__ = False

    pki: TestPki
    server_id: SpiffeId
    client_id: SpiffeId
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext

    @classmethod
    def create(cls) -> TestMesh:
        pki = TestPki()
        server = certified(pki.issue("server-ns", "server"))
        client = certified(pki.issue("client-ns", "client"))
        return cls(
            pki=pki,
            server_id=server.identity,
            client_id=client.identity,
            server_ctx=server_context(server, pki.trust_bundle),
            client_ctx=client_context(client, pki.trust_bundle),
        )


async def start_hbone_server(
    nursery: trio.Nursery,
    host: str,
    ssl_context: ssl.SSLContext,
    handler: ConnectHandler,
    *,
    accepted_trust_domains: frozenset[str] | None = frozenset({"cluster.local"}),
    port: int = HBONE_PORT,
    drain: Drain | None = None,
) -> None:
    await nursery.start(
        partial(
            trio.serve_tcp,
            partial(
                serve_hbone_tls,
                ssl_context=ssl_context,
                handler=handler,
                accepted_trust_domains=accepted_trust_domains,
                drain=drain,
            ),
            port,
            host=host,
        )
    )


async def echo_handler(request: ConnectRequest, responder: HboneResponder) -> None:
    """Accept and echo until the client half-closes, then half-close back."""
    tunnel = await responder.accept()
    while data := await tunnel.receive_some():
        await tunnel.send_all(data)
    await tunnel.send_eof()


async def start_tcp_echo(nursery: trio.Nursery, host: str, port: int) -> None:
    """A plain TCP echo app that answers EOF with EOF (so half-close is observable)."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()

    await nursery.start(partial(trio.serve_tcp, echo, port, host=host))


def splice_to_tcp_handler(app_host: str) -> ConnectHandler:
    """An inbound-like handler: connect upstream to the CONNECT target's port, then splice."""

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        try:
            upstream = await trio.open_tcp_stream(app_host, request.port)
        except OSError as exc:
            await responder.reject(503, f"upstream connect failed: {exc.strerror}")
            return
        async with upstream:
            tunnel = await responder.accept()
            await splice(tunnel, upstream)

    return handler


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)
