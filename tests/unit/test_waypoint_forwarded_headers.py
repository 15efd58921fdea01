"""The forwarded identity headers (waypoint.forwarded_headers): one test per rule."""

from __future__ import annotations

from ambient_api.identity import SpiffeId
from waypoint.forwarded_headers import TunnelPeer, client_cert_entry, sanitize_request_headers

WAYPOINT = SpiffeId("cluster.local", "demo", "waypoint")
SLEEP = SpiffeId("cluster.local", "demo", "sleep")
PEER = TunnelPeer("10.0.0.1", SLEEP, certificate_sha256="ab12")
XFCC = f'By={WAYPOINT};Hash=ab12;Subject="";URI={SLEEP}'


def sanitized(*headers: tuple[str, str], peer: TunnelPeer = PEER) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for name, value in sanitize_request_headers(
        headers, peer, waypoint=WAYPOINT, new_request_id=lambda: "generated"
    ):
        result.setdefault(name, []).append(value)
    return result


def test_xfcc_describes_the_authenticated_peer_in_envoys_format() -> None:
    assert sanitized()["x-forwarded-client-cert"] == [XFCC]
    assert client_cert_entry(WAYPOINT, PEER) == XFCC


def test_a_forged_xfcc_is_dropped_not_kept_in_front() -> None:
    forged = f"By={WAYPOINT};URI=spiffe://cluster.local/ns/demo/sa/admin"
    headers = sanitized(("x-forwarded-client-cert", forged),
                        ("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y"))
    assert headers["x-forwarded-client-cert"] == [XFCC]


def test_xfcc_has_no_hash_when_the_digest_is_unknown() -> None:
    peer = TunnelPeer("10.0.0.1", SLEEP)
    assert sanitized(peer=peer)["x-forwarded-client-cert"] == [
        f'By={WAYPOINT};Subject="";URI={SLEEP}'
    ]


def test_a_peer_without_identity_gets_no_xfcc_and_loses_the_forged_one() -> None:
    headers = sanitized(("x-forwarded-client-cert", "URI=spiffe://forged"),
                        peer=TunnelPeer("10.0.0.1", None))
    assert "x-forwarded-client-cert" not in headers


def test_xff_is_the_peer_when_the_client_sent_none() -> None:
    assert sanitized()["x-forwarded-for"] == ["10.0.0.1"]


def test_xff_appends_the_peer_after_what_the_client_wrote() -> None:
    headers = sanitized(("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8, 9.9.9.9"))
    assert headers["x-forwarded-for"] == ["1.2.3.4,5.6.7.8, 9.9.9.9,10.0.0.1"]


def test_xff_is_left_alone_without_a_peer_address() -> None:
    assert "x-forwarded-for" not in sanitized(peer=TunnelPeer("", SLEEP))
    assert sanitized(("x-forwarded-for", "1.2.3.4"),
                     peer=TunnelPeer("", SLEEP))["x-forwarded-for"] == ["1.2.3.4"]


def test_every_envoy_internal_header_is_dropped() -> None:
    headers = sanitized(
        ("x-envoy-original-path", "/public"),
        ("x-envoy-decorator-operation", "admin"),
        ("x-envoy-peer-metadata", "Cg=="),
        ("x-envoy-peer-metadata-id", "sidecar~1.2.3.4~admin"),
        ("x-envoy-internal", "true"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-upstream-rq-timeout-ms", "1"),
        ("x-envoy-original-dst-host", "10.9.9.9:80"),
        ("x-envoyish", "kept: not the x-envoy- prefix"),
    )
    assert not [name for name in headers if name.startswith("x-envoy-")]
    assert headers["x-envoyish"] == ["kept: not the x-envoy- prefix"]


def test_a_client_request_id_is_kept() -> None:
    assert sanitized(("x-request-id", "abc"))["x-request-id"] == ["abc"]


def test_a_request_id_is_generated_when_absent() -> None:
    assert sanitized()["x-request-id"] == ["generated"]
    headers = sanitize_request_headers((), PEER, waypoint=WAYPOINT)
    request_id = dict(headers)["x-request-id"]
    assert len(request_id) == 36 and request_id.count("-") == 4  # a UUID


def test_forwarded_proto_is_kept_or_set_to_http() -> None:
    assert sanitized()["x-forwarded-proto"] == ["http"]
    assert sanitized(("x-forwarded-proto", "https"))["x-forwarded-proto"] == ["https"]


def test_other_headers_pass_in_order_and_the_added_ones_come_last() -> None:
    headers = sanitize_request_headers(
        (("accept", "*/*"), ("x-forwarded-client-cert", "forged"), ("cookie", "a=1"),
         ("accept", "text/html"), ("x-request-id", "r1")),
        PEER, waypoint=WAYPOINT,
    )
    assert headers == (
        ("accept", "*/*"), ("cookie", "a=1"), ("accept", "text/html"), ("x-request-id", "r1"),
        ("x-forwarded-for", "10.0.0.1"), ("x-forwarded-client-cert", XFCC),
        ("x-forwarded-proto", "http"),
    )
