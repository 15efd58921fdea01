"""Bad input against the assembled mesh: every refusal is the right one, says why, and the
ztunnel keeps serving the next normal request (sleep -> httpbin VIP, GET 200, over HBONE).

Each test starts its own two-node mesh (istiod_lite + two ztunnels + apps, ~0.5 s) from
``examples/demo``: node-1 hosts sleep/notsleep/legacy, node-2 hosts httpbin-v1/v2, and the
only ALLOW policy on httpbin admits ``sa/sleep``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ambient_api.discovery import CertificateResponse
from ambient_api.identity import SpiffeId
from ambient_dataplane.controlplane import CaClient, CaRefused, ControlPlaneConnection
from ambient_dataplane.hbone import HboneConnectError, connect_tls, open_hbone_client
from ambient_dataplane.tls import CertifiedKey, PeerIdentityError, client_context
from ambientctl.apps import Socks5ConnectError, http_get, socks5_connect
from istiod_lite.ca import CertificateAuthority, utc_now
from istiod_lite.csr import check_csr
from tests.integration.mesh_harness import (
    ECHO_PORT,
    ECHO_VIP,
    HTTP_PORT,
    HTTPBIN_V1,
    HTTPBIN_V2,
    HTTPBIN_VIP,
    LEGACY,
    NODE_1,
    SLEEP,
    Mesh,
    start_mesh,
)
from tests.pki import foreign_pki, new_key_and_csr
from ztunnel import socks5
from ztunnel.proxyproto import build_v1_header

pytestmark = pytest.mark.slow

HBONE_PORT, PLAINTEXT_PORT, SOCKS5_PORT = 15008, 15006, 15080
HTTPBIN_ID = SpiffeId("cluster.local", "demo", "httpbin")
_ANSWER_TIMEOUT = 5.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# -- helpers -----------------------------------------------------------------------------


async def assert_still_serving(mesh: Mesh) -> None:
    """The normal request every test ends with: sleep -> httpbin VIP through the mesh."""
    with trio.fail_after(_ANSWER_TIMEOUT):
        stream = await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
        async with stream:
            status, _headers, body = await http_get(stream, "httpbin", "/get")
    assert status == 200
    assert json.loads(body)["pod"] in ("httpbin-v1", "httpbin-v2")


def mesh_ca(mesh: Mesh) -> CertificateAuthority:
    """The running mesh's CA, loaded from istiod's plug-in directory."""
    return CertificateAuthority.from_plugin_dir(mesh.root / "istiod" / "ca")


def mesh_bundle(mesh: Mesh) -> list[str]:
    return [(mesh.root / "istiod" / "root-cert.pem").read_text()]


def issue(
    ca: CertificateAuthority,
    service_account: str,
    *,
    not_before: datetime | None = None,
    ttl: timedelta = timedelta(hours=1),
) -> CertifiedKey:
    """A certificate for ``demo/<service_account>`` from ``ca``: through a real CSR, or
    with a chosen ``not_before`` (to make an expired one, which the CA would never sign)."""
    uri = f"spiffe://cluster.local/ns/demo/sa/{service_account}"
    key, csr_pem = new_key_and_csr(uri)
    if not_before is None:
        chain = ca.sign_csr(check_csr(csr_pem), ttl)
    else:
        chain = ca.issue_leaf(key.public_key(), [x509.UniformResourceIdentifier(uri)], ttl=ttl,
                              not_before=not_before)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return CertifiedKey.from_pem(chain, key_pem)


def client_ctx(mesh: Mesh, service_account: str = "sleep") -> ssl.SSLContext:
    return client_context(issue(mesh_ca(mesh), service_account), mesh_bundle(mesh))


class _PlainHpackEncoder(hpack.Encoder):
    """HPACK without Huffman coding: hpack's pure-Python Huffman coder needs seconds for
    the 200 KB header the oversized-header test sends."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=huffman)


class RawH2:
    """An HTTP/2 client over an mTLS stream that sends what HboneClient never would."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                      normalize_outbound_headers=False)
        )
        self.conn.encoder = _PlainHpackEncoder()
        self.conn.initiate_connection()

    async def request(self, headers: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
        """Send one header block; (":status" value, headers), ("reset", {}) or
        ("goaway", {}) / ("closed", {}) when the server ended the connection instead."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers)
        with trio.fail_after(_ANSWER_TIMEOUT):
            try:
                await self.stream.send_all(self.conn.data_to_send())
                while True:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        return "closed", {}
                    for event in self.conn.receive_data(data):
                        if (isinstance(event, h2.events.ResponseReceived)
                                and event.stream_id == stream_id):
                            answer = {bytes(k).decode(): bytes(v).decode()
                                      for k, v in event.headers}
                            await self.stream.send_all(self.conn.data_to_send())
                            return answer[":status"], answer
                        if (isinstance(event, h2.events.StreamReset)
                                and event.stream_id == stream_id):
                            return "reset", {}
                        if isinstance(event, h2.events.ConnectionTerminated):
                            return "goaway", {"error": str(event.error_code)}
                    await self.stream.send_all(self.conn.data_to_send())
            except trio.BrokenResourceError:
                return "closed", {}


async def echo_roundtrip(stream: trio.SocketStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    received = b""
    with trio.fail_after(_ANSWER_TIMEOUT):
        while len(received) < len(payload):
            chunk = await stream.receive_some(65536)
            assert chunk, "the tunnel closed"
            received += chunk
    return received


def connect_block(authority: str) -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority)]


async def raw_h2_to(mesh: Mesh, demo_pod: str, ctx: ssl.SSLContext) -> RawH2:
    tls = await connect_tls(mesh.addr(demo_pod), HBONE_PORT, ctx, HTTPBIN_ID)
    return RawH2(tls)


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = bytearray()
    with trio.fail_after(_ANSWER_TIMEOUT):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(received)


async def socks5_exchange(mesh: Mesh, *messages: bytes, source: str = SLEEP) -> bytes:
    """Send raw SOCKS5 ``messages`` to node-1's 15080 and return all the answer bytes."""
    stream = await trio.open_tcp_stream(mesh.addr(NODE_1), SOCKS5_PORT,
                                        local_address=mesh.addr(source))
    async with stream:
        await stream.send_all(b"".join(messages))
        return await read_until_closed(stream)


def refusal_reasons(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reasons of the access log's and the HBONE server's refusals."""
    return [str(entry.get("reason")) for entry in logs
            if entry["event"] in ("connection refused", "hbone.request_rejected",
                                  "hbone.handshake_refused", "socks5 request refused")]


# -- 1, 2: HBONE requests that are not a valid CONNECT to this listener ------------------


async def test_hbone_bad_requests_get_400_and_the_connection_survives(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    v1, v2, sleep = mesh.addr(HTTPBIN_V1), mesh.addr(HTTPBIN_V2), mesh.addr(SLEEP)
    raw = await raw_h2_to(mesh, HTTPBIN_V1, client_ctx(mesh))
    cases: list[tuple[list[tuple[str, str]], str]] = [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/get"),
          (":authority", f"{v1}:{HTTP_PORT}")], "method 'GET' is not CONNECT"),
        (connect_block(f"{v1}"), "expected ip:port"),
        (connect_block(f"{v1}:0"), "invalid port"),
        (connect_block(f"{v1}:99999"), "invalid port"),
        (connect_block(f"httpbin.demo.svc.cluster.local:{HTTP_PORT}"), "is not an IP and port"),
        # An address that is no workload of node-2 (sleep lives on node-1).
        (connect_block(f"{sleep}:{HTTP_PORT}"), f"{sleep} is not a workload on node node-2"),
        # node-2's other workload, but asked at httpbin-v1's listener.
        (connect_block(f"{v2}:{HTTP_PORT}"), f"{v2} is not the workload served at {v1}"),
        # The loop guard: the listener's own workload, but on the HBONE port itself.
        (connect_block(f"{v1}:{HBONE_PORT}"), f"port {HBONE_PORT} is a proxy port"),
    ]
    async with raw.stream:
        with structlog.testing.capture_logs() as logs:
            for headers, reason in cases:
                status, answer = await raw.request(headers)
                assert (status, reason in answer.get("x-hbone-reason", "")) == ("400", True), (
                    headers, answer)
        # The refusals are in the logs with their reasons (access log for the policy-level
        # ones, the HBONE server's log for the malformed ones).
        reasons = refusal_reasons(logs)
        assert any("is not a workload on node node-2" in r for r in reasons), reasons
        assert any("is not CONNECT" in r for r in reasons), reasons
        assert any(entry["event"] == "connection refused"
                   and entry["reason"] == f"port {HBONE_PORT} is a proxy port and cannot be "
                   "a target" for entry in logs), logs
        # The same connection still carries a valid CONNECT to the app.
        status, _ = await raw.request(connect_block(f"{v1}:{HTTP_PORT}"))
        assert status == "200"
    await assert_still_serving(mesh)


# -- 3, 4: certificates and identities -----------------------------------------------------


async def assert_tls_refused(address: str, ctx: ssl.SSLContext) -> None:
    """The server refuses the client certificate. With TLS 1.3 the client may finish its
    half of the handshake before the server's verdict arrives, so a handshake that
    "succeeds" must then see the connection fail instead of an HTTP/2 SETTINGS frame."""
    try:
        tls = await connect_tls(address, HBONE_PORT, ctx, HTTPBIN_ID)
    except PeerIdentityError:
        return
    async with tls:
        with trio.fail_after(_ANSWER_TIMEOUT):
            try:
                await tls.send_all(H2_PREFACE)
                assert await tls.receive_some(65536) == b""
            except trio.BrokenResourceError:
                pass


async def test_client_certificates_from_another_ca_or_expired_are_refused(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    target = mesh.addr(HTTPBIN_V1)
    foreign = foreign_pki().issue("demo", "sleep")  # same SPIFFE id, unrelated root
    foreign_ctx = client_context(CertifiedKey.from_pem(foreign.chain_pem, foreign.key_pem),
                                 mesh_bundle(mesh))
    expired = issue(mesh_ca(mesh), "sleep", not_before=utc_now() - timedelta(hours=2),
                    ttl=timedelta(hours=1))
    assert expired.not_after < utc_now()
    expired_ctx = client_context(expired, mesh_bundle(mesh))
    with structlog.testing.capture_logs() as logs:
        await assert_tls_refused(target, foreign_ctx)
        await assert_tls_refused(target, expired_ctx)
    refused = [e for e in logs if e["event"] == "hbone.handshake_refused"]
    assert len(refused) == 2, logs
    assert "certificate verification failed" in refused[0]["reason"], refused
    assert refused[1]["reason"].endswith("certificate has expired"), refused
    # A mesh-issued, valid certificate for the same identity is accepted on the same port.
    async with open_hbone_client(target, HBONE_PORT, client_ctx(mesh), HTTPBIN_ID) as client:
        stream = await client.open_stream(f"{target}:{HTTP_PORT}")
        await stream.aclose()
    await assert_still_serving(mesh)


async def test_client_expecting_another_identity_refuses_the_server(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    expected = SpiffeId("cluster.local", "demo", "not-httpbin")
    with pytest.raises(PeerIdentityError) as error:
        await connect_tls(mesh.addr(HTTPBIN_V1), HBONE_PORT, client_ctx(mesh), expected)
    assert str(HTTPBIN_ID) in error.value.reason
    assert str(expected) in error.value.reason
    await assert_still_serving(mesh)


async def test_identity_the_allow_policy_does_not_admit_gets_401(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    target = mesh.addr(HTTPBIN_V1)
    with structlog.testing.capture_logs() as logs:
        async with open_hbone_client(target, HBONE_PORT, client_ctx(mesh, "notsleep"),
                                     HTTPBIN_ID) as client:
            with pytest.raises(HboneConnectError) as error:
                await client.open_stream(f"{target}:{HTTP_PORT}")
    assert error.value.status == 401
    denied = [e for e in logs if e["event"] == "connection refused"]
    assert [(e["reason"], e["response_flags"], e["src.identity"]) for e in denied] == [
        ("no ALLOW policy matched", "UAEX", "spiffe://cluster.local/ns/demo/sa/notsleep")
    ]
    # The policy-admitted identity, same listener, is let through.
    async with open_hbone_client(target, HBONE_PORT, client_ctx(mesh, "sleep"),
                                 HTTPBIN_ID) as client:
        stream = await client.open_stream(f"{target}:{HTTP_PORT}")
        await stream.aclose()
    await assert_still_serving(mesh)


# -- 5: garbage and malformed SOCKS5 ---------------------------------------------------------

GARBAGE = bytes(range(256)) * 64


async def test_garbage_on_hbone_and_socks5_ports_is_dropped(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    with structlog.testing.capture_logs() as logs:
        # Not TLS at all on 15008.
        stream = await trio.open_tcp_stream(mesh.addr(HTTPBIN_V1), HBONE_PORT)
        async with stream:
            await stream.send_all(GARBAGE)
            await read_until_closed(stream)
        # Valid mTLS, then not HTTP/2.
        tls = await connect_tls(mesh.addr(HTTPBIN_V1), HBONE_PORT, client_ctx(mesh), HTTPBIN_ID)
        async with tls:
            await tls.send_all(GARBAGE)
            await read_until_closed(tls)
        # Not SOCKS5 on 15080: the greeting is refused without a reply.
        assert await socks5_exchange(mesh, GARBAGE) == b""
    events = {entry["event"] for entry in logs}
    assert "hbone.handshake_refused" in events, logs
    assert "hbone.protocol_error" in events, logs
    assert any(entry.get("reason", "").startswith("greeting starts with 0x00, not a SOCKS5")
               for entry in logs if entry["event"] == "socks5 request refused"), logs
    await assert_still_serving(mesh)


GREETING = b"\x05\x01\x00"
GREETING_OK = b"\x05\x00"


def socks5_reply(code: int) -> bytes:
    return socks5.request_reply(code)


async def test_malformed_socks5_gets_the_right_reply(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    v1 = bytes(int(part) for part in mesh.addr(HTTPBIN_V1).split("."))
    port = HTTP_PORT.to_bytes(2, "big")
    # Bad version byte, SOCKS4 and zero methods: no greeting reply, the connection is closed.
    assert await socks5_exchange(mesh, b"\x06\x01\x00") == b""
    assert await socks5_exchange(mesh, b"\x04\x01" + port + v1 + b"\x00") == b""
    assert await socks5_exchange(mesh, b"\x05\x00") == b""
    # A client offering only username/password is told "no acceptable method".
    assert await socks5_exchange(mesh, b"\x05\x01\x02") == b"\x05\xff"
    # BIND and UDP ASSOCIATE: command not supported (7).
    for command in (socks5.CMD_BIND, socks5.CMD_UDP_ASSOCIATE):
        answer = await socks5_exchange(mesh, GREETING, bytes([5, command, 0, 1]) + v1 + port)
        assert answer == GREETING_OK + socks5_reply(socks5.COMMAND_NOT_SUPPORTED)
    # Address type 5 does not exist: address type not supported (8).
    answer = await socks5_exchange(mesh, GREETING, b"\x05\x01\x00\x05" + v1 + port)
    assert answer == GREETING_OK + socks5_reply(socks5.ADDRESS_TYPE_NOT_SUPPORTED)
    # A valid request after all that still works.
    await assert_still_serving(mesh)


async def socks5_refusal(mesh: Mesh, host: str, port: int, *, source_ip: str) -> int:
    with pytest.raises(Socks5ConnectError) as refused:
        await socks5_connect(mesh.addr(NODE_1), SOCKS5_PORT, host, port,
                             source_address=source_ip)
    return refused.value.reply_code


async def test_socks5_refuses_strangers_proxy_ports_and_unknown_names(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    sleep, v1 = mesh.addr(SLEEP), mesh.addr(HTTPBIN_V1)
    stranger = loopback.new()  # type: ignore[attr-defined]
    with structlog.testing.capture_logs() as logs:
        # Not a mesh workload: the caller's identity cannot be known.
        assert await socks5_refusal(mesh, v1, HTTP_PORT, source_ip=stranger) == \
            socks5.CONNECTION_NOT_ALLOWED
        # A pod on node-1 outside the mesh (tunnel protocol NONE) is no mesh caller either.
        assert await socks5_refusal(mesh, v1, HTTP_PORT, source_ip=mesh.addr(LEGACY)) == \
            socks5.CONNECTION_NOT_ALLOWED
        # A proxy port as destination would loop.
        assert await socks5_refusal(mesh, v1, HBONE_PORT, source_ip=sleep) == \
            socks5.CONNECTION_NOT_ALLOWED
        # A name the mesh does not know: host unreachable (the proxy is no DNS server).
        assert await socks5_refusal(mesh, "nothere.demo.svc.cluster.local", HTTP_PORT,
                                    source_ip=sleep) == socks5.HOST_UNREACHABLE
        assert await socks5_refusal(mesh, "example.com", 80, source_ip=sleep) == \
            socks5.HOST_UNREACHABLE
    reasons = refusal_reasons(logs)
    assert f"{stranger} is not a mesh workload on node node-1" in reasons, reasons
    assert f"port {HBONE_PORT} is a proxy port and cannot be a target" in reasons, reasons
    assert "nothere.demo.svc.cluster.local is not a mesh service" in reasons, reasons
    # A mesh service by name works, in every form a client may write it.
    for host in ("httpbin.demo.svc.cluster.local", "httpbin.demo.svc", "httpbin.demo"):
        with trio.fail_after(_ANSWER_TIMEOUT):
            stream = await socks5_connect(mesh.addr(NODE_1), SOCKS5_PORT, host, HTTP_PORT,
                                          source_address=sleep)
            async with stream:
                status, _headers, _body = await http_get(stream, "httpbin", "/get")
        assert status == 200, host
    await assert_still_serving(mesh)


# -- 6: an oversized CONNECT header block -----------------------------------------------------


async def test_oversized_connect_headers_are_refused_without_harm(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    v1 = mesh.addr(HTTPBIN_V1)
    flowing = await mesh.connect(SLEEP, ECHO_VIP, ECHO_PORT)
    async with flowing:
        assert await echo_roundtrip(flowing, b"before") == b"before"
        raw = await raw_h2_to(mesh, HTTPBIN_V1, client_ctx(mesh))
        async with raw.stream:
            with structlog.testing.capture_logs() as logs:
                status, answer = await raw.request(
                    connect_block(f"{v1}:{HTTP_PORT}") + [("x-padding", "a" * 200_000)]
                )
        # hpack refuses a header list over 64 KiB: the connection ends with GOAWAY
        # ENHANCE_YOUR_CALM and the reason in the log, before any CONNECT handling.
        calm = str(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        assert (status, answer) == ("goaway", {"error": calm})
        assert [e["error"] for e in logs if e["event"] == "hbone.protocol_error"] == [
            "Oversized header block: A header list larger than 65536 has been received"
        ], logs
        assert not [e for e in logs if e["event"] == "connection refused"], logs
        # A tunnel already flowing on another connection is untouched, and new ones work.
        assert await echo_roundtrip(flowing, b"after") == b"after"
    await assert_still_serving(mesh)


# -- 7: a node asking the CA for an identity it does not host ----------------------------------


async def test_node_cannot_get_a_certificate_for_an_identity_it_does_not_host(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    _key, csr = new_key_and_csr(str(HTTPBIN_ID))  # httpbin runs on node-2 only
    context = ssl.create_default_context(cafile=str(mesh.root / "istiod" / "root-cert.pem"))
    base_url = f"https://{mesh.istiod_address}:15012"

    async with ControlPlaneConnection(base_url, mesh.tokens["node-1"], context) as node_1:
        with pytest.raises(CaRefused) as refused:
            await CaClient(node_1).sign(csr)
        # The raw answer too: 403 with the reason in the JSON error body.
        response = await node_1.client.post(
            "/v1/certificate", json={"csr": csr},
        )
    assert refused.value.status == 403
    assert "no instances of demo/httpbin on node node-1" in refused.value.reason
    assert response.status_code == 403
    assert "no instances of" in response.json()["error"]
    # The node that hosts httpbin gets the very same CSR signed.
    async with ControlPlaneConnection(base_url, mesh.tokens["node-2"], context) as node_2:
        answer: CertificateResponse = await CaClient(node_2).sign(csr)
    leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(HTTPBIN_ID)]
    await assert_still_serving(mesh)


# -- 8: the plaintext inbound port without a believable original destination -------------------


async def test_plaintext_inbound_without_a_valid_proxy_header_is_closed(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    v1, v2, legacy = mesh.addr(HTTPBIN_V1), mesh.addr(HTTPBIN_V2), mesh.addr(LEGACY)
    request = b"GET /get HTTP/1.1\r\nhost: httpbin\r\n\r\n"
    with structlog.testing.capture_logs() as logs:
        # No PROXY header at all: plain HTTP straight to 15006.
        stream = await trio.open_tcp_stream(v1, PLAINTEXT_PORT, local_address=legacy)
        async with stream:
            await stream.send_all(request)
            assert await read_until_closed(stream) == b""
        # A PROXY header naming another pod (httpbin-v2) than this listener's.
        stream = await trio.open_tcp_stream(v1, PLAINTEXT_PORT, local_address=legacy)
        async with stream:
            await stream.send_all(build_v1_header((legacy, 40000), (v2, HTTP_PORT)) + request)
            assert await read_until_closed(stream) == b""
    reasons = [e["reason"] for e in logs if e["event"] == "connection refused"]
    assert len(reasons) == 2, logs
    assert reasons[0].startswith("no original destination: connection starts with b'GET /get'")
    assert reasons[1] == (f"no original destination: the PROXY header names {v2}, "
                          f"not this workload ({v1})")
    await assert_still_serving(mesh)
