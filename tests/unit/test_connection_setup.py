"""Per-connection work of the proxy entries kept cheap (bench ``churn``) without changing
what they produce: SOCKS5 replies packed with the C socket functions, metric series looked
up once per label set."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ambient_dataplane.labels import ConnectionLabels
from ztunnel import socks5
from ztunnel.metrics import ZtunnelMetrics


def test_reply_packs_ipv4_and_ipv6_bound_addresses() -> None:
    assert socks5.request_reply(socks5.SUCCEEDED, "10.1.2.3", 15080) == (
        b"\x05\x00\x00\x01" + bytes([10, 1, 2, 3]) + (15080).to_bytes(2, "big"))
    assert socks5.request_reply(socks5.SUCCEEDED, "fd00::1", 1) == (
        b"\x05\x00\x00\x04" + bytes.fromhex("fd00" + "00" * 13 + "01") + b"\x00\x01")


@pytest.mark.parametrize("bad", ["", "10.1.2", "10.1.2.300", "host.example", "fd00::g"])
def test_reply_refuses_a_bound_address_that_is_not_an_ip(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        socks5.request_reply(socks5.SUCCEEDED, bad, 1)


def test_ipv4_request_host_is_dotted_decimal() -> None:
    request = b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + (8080).to_bytes(2, "big")
    parsed = socks5.parse_request(request)
    assert parsed is not None
    consumed, connect = parsed
    assert (consumed, connect.host, connect.port) == (len(request), "127.0.0.1", 8080)


def _opened_and_closed(metrics: ZtunnelMetrics) -> dict[str, float]:
    """response_flags -> opened + 10 * closed (one number per series, to compare)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            weight = {"istio_tcp_connections_opened_total": 1,
                      "istio_tcp_connections_closed_total": 10}.get(sample.name)
            if weight is not None:
                flags = sample.labels["response_flags"]
                found[flags] = found.get(flags, 0) + weight * sample.value
    return found


def test_equal_labels_count_in_one_series_and_different_ones_apart() -> None:
    metrics = ZtunnelMetrics()
    first = ConnectionLabels(reporter="source", source_workload="sleep")
    equal = dataclasses.replace(first)  # another object, the same labels
    denied = dataclasses.replace(first, response_flags="UAEX")
    metrics.connection_opened(first)
    metrics.connection_opened(equal)
    metrics.connection_closed(equal, sent=1)
    metrics.connection_opened(denied)
    metrics.connection_closed(denied)
    assert _opened_and_closed(metrics) == {"-": 2 + 10, "UAEX": 1 + 10}
