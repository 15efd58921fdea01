"""One check per parser: feed it bytes; anything but a result or its own error is a bug.

Each target takes the raw input and raises only when the parser broke its contract: an
exception of another type escaped, or a result contradicts the input (consumed more than it
was given, a port out of range). The parsers' own errors are how they refuse bad input, so
they are caught here; the caller turns them into a clear refusal for one connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ambient_api import codec
from ambient_api.l7 import JwtPolicy, JwtProvider
from ambient_api.model import Workload
from ambient_dataplane.discovery import parse_stream_line
from ambient_dataplane.hbone import HboneRejection
from ambient_dataplane.hbone.protocol import parse_authority, parse_connect
from istiod_lite.sources.objects import InvalidObject
from istiod_lite.sources.validation import parse_documents
from waypoint.http.client_h1 import ResponseError, ResponseParser
from waypoint.jwt import JwtError, JwtValidator
from ztunnel import socks5
from ztunnel.proxyproto import ProxyProtocolError, parse_proxy_header

JWT_ISSUER = "https://issuer.fuzz"
_JWKS = json.dumps({"keys": [{
    **ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True),
    "kid": "fuzz",
}]})
# A provider for JWT_ISSUER, so tokens naming it go all the way to the signature check.
_JWT = JwtValidator(
    [JwtPolicy(name="fuzz", namespace="fuzz", targets=("fuzz/svc",),
               providers=(JwtProvider(issuer=JWT_ISSUER, jwks=_JWKS),))],
    clock=lambda: 1_700_000_000.0,
)


def socks5_handshake(data: bytes) -> None:
    """The first byte says how to cut the rest into reads; then the client closes."""
    step = data[0] % 64 + 1 if data else 1
    protocol = socks5.Socks5ServerProtocol(max_buffered=1024)
    pieces = [data[1 + i:1 + i + step] for i in range(0, max(len(data) - 1, 0), step)]
    try:
        for piece in [*pieces, b""]:
            protocol.receive_data(piece)
            while protocol.state in ("greeting", "request"):
                if isinstance(protocol.next_event(), socks5.NeedData):
                    break
            if protocol.state not in ("greeting", "request"):
                return
    except socks5.Socks5Error as exc:
        if not (0 < exc.reply_code <= 0xFF and exc.reason and protocol.state == "closed"):
            raise AssertionError(f"a SOCKS5 refusal without a code or reason: {exc!r}") from exc


def proxy_header(data: bytes) -> None:
    try:
        parsed = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if parsed is not None and not 0 < parsed[0] <= len(data):
        raise AssertionError(f"consumed {parsed[0]} of {len(data)} bytes")


def connect_authority(data: bytes) -> None:
    try:
        _ip, port = parse_authority(data.decode("utf-8", "replace"))
    except HboneRejection as exc:
        if exc.status != 400:
            raise AssertionError(f"a bad authority answered {exc.status}, not 400") from exc
        return
    if not 0 < port <= 65535:
        raise AssertionError(f"port {port} accepted")


def connect_head(data: bytes) -> None:
    """Lines are headers, the first ``:`` after the first byte splits name from value."""
    headers = []
    for line in data.split(b"\n")[:32]:
        name, _, value = line.partition(b":" if not line.startswith(b":") else b"=")
        headers.append((name, value))
    try:
        request = parse_connect(headers)
    except HboneRejection as exc:
        if not 400 <= exc.status < 600:
            raise AssertionError(f"a refusal with status {exc.status}") from exc
        return
    if not 0 < request.port <= 65535:
        raise AssertionError(f"port {request.port} accepted")


def http1_response(data: bytes) -> None:
    """The first byte picks the request method and the read size."""
    method = ("GET", "HEAD", "POST")[data[0] % 3] if data else "GET"
    step = (data[0] // 3) % 97 + 1 if data else 1
    parser = ResponseParser(method, max_head_bytes=4096, max_body_bytes=16384)
    body = data[1:]
    for piece in [*(body[i:i + step] for i in range(0, len(body), step)), b""]:
        parser.feed(piece)
        try:
            if parser.response() is not None:
                return
        except ResponseError:
            return
    raise AssertionError("neither a response nor an error at the end of the stream")


def jwt_token(data: bytes) -> None:
    try:
        _JWT.validate([("authorization", "Bearer " + data.decode("utf-8", "replace"))])
    except JwtError:
        return


def discovery_line(data: bytes) -> None:
    parsed = parse_stream_line(data.decode("utf-8", "replace"))
    if parsed is not None and (parsed.update is None) != bool(parsed.error):
        raise AssertionError(f"a line that is neither an update nor an error: {parsed!r}")


def workload_json(data: bytes) -> None:
    try:
        value = json.loads(data)
    except ValueError:
        return
    try:
        codec.from_jsonable(Workload, value)
    except codec.DecodeError:
        return


def yaml_file(data: bytes) -> None:
    try:
        parse_documents(data.decode("utf-8", "replace"), "fuzz.yaml")
    except InvalidObject as exc:
        if "fuzz.yaml" not in str(exc):
            raise AssertionError(f"a YAML error that does not name its file: {exc}") from exc


TARGETS: dict[str, Callable[[bytes], None]] = {
    "socks5": socks5_handshake,
    "proxy-header": proxy_header,
    "connect-authority": connect_authority,
    "connect-head": connect_head,
    "http1-response": http1_response,
    "jwt": jwt_token,
    "discovery-line": discovery_line,
    "workload-json": workload_json,
    "yaml": yaml_file,
}
