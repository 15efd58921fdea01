"""Property tests for every parser and decoder a peer or a user can feed (issue 11, fuzzing).

Each property is the parser's contract under arbitrary input: it answers with a result or
with its own error type (which the caller turns into a clear refusal), never with another
exception, and never reads past what it says it consumed. Where a builder exists, what it
builds parses back to the same values. Bounded (a few hundred examples each, derandomized so
`make test` is reproducible); `make fuzz` runs the coverage-guided targets in fuzz/ for longer.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient_api import codec
from ambient_api.discovery import DeltaUpdate
from ambient_dataplane.discovery import parse_stream_line
from ambient_dataplane.hbone import HboneRejection, format_authority
from ambient_dataplane.hbone.protocol import parse_authority, parse_connect
from ambient_dataplane.state import ProxyState
from fuzz import targets
from istiod_lite.sources.objects import ClusterObjects, InvalidObject
from istiod_lite.sources.validation import UnknownKind, parse_documents, validate_object
from istiod_lite.translate import translate
from waypoint.http.client_h1 import ResponseError, ResponseParser
from ztunnel import socks5
from ztunnel.proxyproto import (
    build_v1_header,
    build_v2_header,
    parse_proxy_header,
)

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_every_target_answers_any_bytes(name: str, data: bytes) -> None:
    """fuzz/targets.py: the same checks `make fuzz` runs coverage-guided."""
    targets.TARGETS[name](data)


# -- SOCKS5 (ztunnel's 15080) ---------------------------------------------------------------


def drive_socks5(pieces: list[bytes], *, close: bool) -> list[object]:
    protocol = socks5.Socks5ServerProtocol(max_buffered=1024)
    events: list[object] = []
    for piece in [*pieces, b""] if close else pieces:
        try:
            protocol.receive_data(piece)
            while protocol.state in ("greeting", "request"):
                event = protocol.next_event()
                events.append(event)
                if isinstance(event, socks5.NeedData):
                    break
        except socks5.Socks5Error as exc:
            assert 0 < exc.reply_code <= 0xFF and exc.reason
            assert protocol.state == "closed"
            events.append(exc)
            break
        if protocol.state not in ("greeting", "request"):
            break
    return events


@FUZZ
@given(
    st.one_of(ipv4, ipv6, st.from_regex(
        r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}",
        fullmatch=True)),
    st.integers(1, 65535), st.lists(st.integers(0, 400), max_size=4), st.binary(max_size=64),
)
def test_socks5_connect_requests_parse_whole_in_any_chunking(
    host: str, port: int, cuts: list[int], trailing: bytes
) -> None:
    if ":" in host:
        request = b"\x05\x01\x00\x04" + ipaddress.IPv6Address(host).packed
    elif host.replace(".", "").isdigit():
        request = b"\x05\x01\x00\x01" + ipaddress.IPv4Address(host).packed
    else:
        request = b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode()
    wire = b"\x05\x01\x00" + request + port.to_bytes(2, "big") + trailing
    events = drive_socks5(chunked(wire, cuts), close=False)
    requests = [e for e in events if isinstance(e, socks5.ConnectRequest)]
    assert len(requests) == 1
    assert (requests[0].host, requests[0].port) == (host, port)


# -- PROXY protocol (ztunnel's 15006 in the embedded mode) ----------------------------------


@FUZZ
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports,
       st.sampled_from([build_v1_header, build_v2_header]), st.binary(max_size=32))
def test_proxy_headers_we_build_parse_back(
    addresses: tuple[str, str], source_port: int, destination_port: int,
    build: Any, payload: bytes,
) -> None:
    header = build((addresses[0], source_port), (addresses[1], destination_port))
    parsed = parse_proxy_header(header + payload)
    assert parsed is not None
    consumed, result = parsed
    assert consumed == len(header)
    assert result.source == (addresses[0], source_port)
    assert result.destination == (addresses[1], destination_port)


# -- HBONE CONNECT (15008) -------------------------------------------------------------------


@FUZZ
@given(st.one_of(ipv4, ipv6), st.integers(1, 65535))
def test_connect_authorities_we_format_parse_back(ip: str, port: int) -> None:
    parsed_ip, parsed_port = parse_authority(format_authority(ip, port))
    assert (str(parsed_ip), parsed_port) == (str(ipaddress.ip_address(ip)), port)


header_names = st.sampled_from([
    b":method", b":authority", b":scheme", b":path", b":protocol", b"forwarded", b"baggage",
    b"traceparent", b"x-other", b"", b"Forwarded",
])


@FUZZ
@given(st.lists(st.tuples(header_names, st.binary(max_size=60)), max_size=8))
def test_connect_head_parser_accepts_or_rejects_with_a_status(
    headers: list[tuple[bytes, bytes]],
) -> None:
    try:
        request = parse_connect(headers)
    except HboneRejection as exc:
        assert 400 <= exc.status < 600 and exc.reason
        return
    assert 0 < request.port <= 65535


# -- the waypoint's upstream HTTP/1.1 response parser ----------------------------------------


def parse_response(pieces: list[bytes], method: str = "GET") -> object:
    parser = ResponseParser(method, max_head_bytes=4096, max_body_bytes=16384)
    for piece in [*pieces, b""]:
        parser.feed(piece)
        try:
            response = parser.response()
        except ResponseError as exc:
            assert exc.reason
            return exc
        if response is not None:
            return response
    raise AssertionError("the parser neither answered nor failed at the end of the stream")


@FUZZ
@given(st.integers(200, 599).filter(lambda s: s not in (204, 304)), st.binary(max_size=3000),
       st.booleans(), st.lists(st.integers(0, 4000), max_size=6))
def test_valid_responses_parse_the_same_in_any_chunking(
    status: int, body: bytes, chunked_encoding: bool, cuts: list[int]
) -> None:
    if chunked_encoding:
        framing = b"transfer-encoding: chunked\r\n"
        encoded = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700])
            for i in range(0, len(body), 700)
        ) + b"0\r\n\r\n"
    else:
        framing, encoded = b"content-length: %d\r\n" % len(body), body
    wire = b"HTTP/1.1 %d X\r\nx-a: 1\r\n%s\r\n%s" % (status, framing, encoded)
    response = parse_response(chunked(wire, cuts))
    assert not isinstance(response, ResponseError), response
    assert response.status == status  # type: ignore[attr-defined]
    assert response.body == body  # type: ignore[attr-defined]


# -- JWT (RequestAuthentication at the waypoint) ---------------------------------------------

b64 = st.binary(max_size=90).map(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"="))
json_part = st.one_of(
    json_values,
    st.fixed_dictionaries({"alg": st.sampled_from(["ES256", "RS256", "none", "HS256"]),
                           "kid": st.sampled_from(["fuzz", "other"])}),
    st.fixed_dictionaries({"iss": st.just(targets.JWT_ISSUER), "sub": json_values,
                           "exp": json_values, "nbf": json_values, "aud": json_values}),
).map(lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"="))
jwt_like = st.one_of(
    st.binary(max_size=120),
    st.tuples(b64, b64, b64).map(b".".join),
    st.tuples(json_part, json_part, b64).map(b".".join),
)


@FUZZ
@given(jwt_like)
def test_jwt_validation_answers_any_token_with_a_result_or_its_error(token: bytes) -> None:
    targets.jwt_token(token)


# -- the discovery stream and the proxies' state ----------------------------------------------


@FUZZ
@given(json_values.map(json.dumps))
def test_json_discovery_lines_decode_or_say_why(line: str) -> None:
    targets.discovery_line(line.encode())


@FUZZ
@given(json_values.map(json.dumps))
def test_workload_decoding_raises_only_decode_errors(data: str) -> None:
    targets.workload_json(data.encode())


@FUZZ
@given(st.lists(st.fixed_dictionaries({
    "kind": st.sampled_from(["workload", "service", "authorization", "node", "httproute",
                             "trafficpolicy", "bogus"]),
    "name": st.text(max_size=20),
    "version": st.text(max_size=8),
    "resource": json_values,
}), max_size=4))
def test_proxy_state_applies_or_refuses_whole_updates(resources: list[dict[str, Any]]) -> None:
    update = {"system_version": "1", "nonce": "n", "resources": resources,
              "removed_resources": []}
    parsed = parse_stream_line(json.dumps(update))
    assert parsed is not None
    if parsed.update is None:
        return
    state = ProxyState()
    before = state.dump()
    try:
        state.apply(parsed.update)
    except codec.DecodeError:
        assert state.dump() == before  # all or nothing
    assert isinstance(parsed.update, DeltaUpdate)


# -- Kubernetes YAML into the model (istiod_lite) ---------------------------------------------


def _demo_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objects.extend(parse_documents(path.read_text(), str(path)).objects)
    return objects


DEMO_OBJECTS = _demo_objects()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], tuple(rest), new)}
    copy = list(value)
    copy[head] = _replaced(value[head], tuple(rest), new)
    return copy


@st.composite
def mutated_objects(draw: st.DrawFn) -> list[dict[str, Any]]:
    objects = list(DEMO_OBJECTS)
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(objects) - 1))
        path = draw(st.sampled_from(_paths(objects[index])[1:]))
        objects[index] = _replaced(objects[index], path, draw(json_values))
    return objects


@FUZZ
@given(mutated_objects())
def test_translation_of_malformed_objects_never_raises(objects: list[dict[str, Any]]) -> None:
    valid = []
    for obj in objects:
        try:
            valid.append(validate_object(obj))
        except (UnknownKind, ValueError):
            continue
    translate(ClusterObjects.from_objects(valid))


@FUZZ
@given(st.text(max_size=300))
def test_yaml_text_parses_or_names_the_problem(text: str) -> None:
    targets.yaml_file(text.encode())


def test_the_demo_objects_are_there_to_mutate() -> None:
    assert len(DEMO_OBJECTS) > 10
    with pytest.raises(InvalidObject, match="fuzz.yaml"):
        parse_documents("kind: [", "fuzz.yaml")


@pytest.mark.parametrize(("document", "field"), [
    ({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
      "metadata": {"name": "p", "namespace": "demo"}, "spec": {"action": ["DENY"]}},
     "spec.action"),
    ({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
      "metadata": {"name": "p", "namespace": "demo"}, "spec": {"mtls": {"mode": {}}}},
     "spec.mtls.mode"),
    ({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
      "metadata": {"name": "p", "namespace": "demo"},
      "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": ["In"]}]}}},
     "spec.selector.matchExpressions[0].operator"),
])
def test_unhashable_enum_values_are_a_clear_error(document: dict[str, Any], field: str) -> None:
    """Found by the fuzzer: a list where a keyword belongs raised TypeError (unhashable)."""
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_object(document)
