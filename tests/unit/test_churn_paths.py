"""The per-connection shortcuts of the churn path keep the wire and the behaviour."""

from __future__ import annotations

import trio
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from ambient_dataplane.drain import ActiveConnections, serve_tracked
from ambient_dataplane.hbone.client import PlainLiteralEncoder
from ztunnel.authz import ConnectionAttributes, evaluate

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BLOCK = [
    (b":method", b"CONNECT"),
    (b":authority", b"10.0.0.2:8080"),
    NeverIndexedHeaderTuple(b"forwarded", b'for="10.0.0.1:40000"'),
    NeverIndexedHeaderTuple(b"traceparent", TRACEPARENT),
]


def test_plain_literal_encoder_writes_strings_verbatim_and_decodes() -> None:
    block = PlainLiteralEncoder().encode(BLOCK)
    assert TRACEPARENT in block  # Huffman coding would have rewritten it
    assert [tuple(header) for header in Decoder().decode(block, raw=True)] == [
        tuple(header) for header in BLOCK]
    assert len(block) > len(Encoder().encode(BLOCK))  # what Huffman saved, for comparison


def test_plain_literal_encoder_keeps_the_dynamic_table_in_step() -> None:
    encoder, decoder = PlainLiteralEncoder(), Decoder()
    for port in (40000, 40001):
        headers = [(b":authority", b"10.0.0.2:8080"), (b"baggage", b"k8s.namespace.name=a")]
        headers.append(NeverIndexedHeaderTuple(b"forwarded", f'for="x:{port}"'.encode()))
        assert decoder.decode(encoder.encode(headers), raw=True) == headers


def test_evaluate_without_policies_allows_without_parsing_addresses() -> None:
    decision = evaluate([], ConnectionAttributes("not-an-ip", None, "also-not", 80))
    assert decision.allowed
    assert decision.reason == "no ALLOW policy applies"


async def test_serve_tracked_closes_each_stream_and_survives_a_failing_handler() -> None:
    connections = ActiveConnections()
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(10)
        seen.append(data)
        if data == b"boom":
            raise RuntimeError("handler bug")
        await stream.send_all(b"ok")

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(lambda: serve_tracked(
            listeners, handle, connections=connections, handler_nursery=nursery, what="test"))
        for payload, answer in ((b"boom", b""), (b"hi", b"ok")):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(payload)
            received = b""
            while chunk := await client.receive_some(10):  # EOF: the proxy closed its side
                received += chunk
            assert received == answer
            await client.aclose()
        await connections.wait_idle()
        assert connections.count == 0
        nursery.cancel_scope.cancel()
    assert seen == [b"boom", b"hi"]
    assert listeners[0].socket.fileno() == -1  # listeners closed on the way out
