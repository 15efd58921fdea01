"""CONNECT headers unique to one tunnel stay out of the HPACK dynamic table."""

from __future__ import annotations

import hpack

from ambient_dataplane.hbone.client import _encoded_header
from ambient_dataplane.hbone.protocol import connect_headers


def test_per_connection_headers_are_not_indexed_and_the_rest_are() -> None:
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    for port in (40001, 40002):
        block = [_encoded_header(name, value) for name, value in connect_headers(
            "10.0.0.1:8080", forwarded_for=f"10.0.0.2:{port}", baggage={"k8s.pod.name": "a"})]
        decoded = decoder.decode(encoder.encode(block), raw=True)
        assert decoded == [(bytes(name), bytes(value)) for name, value in block]
    indexed = {name for name, _ in encoder.header_table.dynamic_entries}
    assert b"traceparent" not in indexed and b"forwarded" not in indexed
    assert {b":authority", b"baggage"} <= indexed
    assert {name for name, _ in decoder.header_table.dynamic_entries} == indexed
