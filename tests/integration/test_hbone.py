"""HBONE end to end on loopback with real mutual TLS: tunnels, answers, faults, identities."""

from __future__ import annotations

import os
from datetime import timedelta

import h2.config
import h2.connection
import h2.events
import pytest
import structlog
import trio

from ambient_dataplane.hbone import (
    MAX_FRAME_SIZE,
    ConnectRequest,
    HboneConnectError,
    HboneResponder,
    connect_headers,
    connect_tls,
    open_hbone_client,
)
from ambient_dataplane.tls import PeerIdentityError, client_context, server_context
from tests.integration.hbone_helpers import (
    HBONE_PORT,
    TestMesh,
    certified,
    echo_handler,
    receive_all,
    splice_to_tcp_handler,
    start_hbone_server,
    start_tcp_echo,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def mesh() -> TestMesh:
    return TestMesh.create()


async def test_echo_carries_request_metadata(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    seen: list[ConnectRequest] = []
    peers = []

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        seen.append(request)
        peers.append(responder.connection.peer_identity)
        await echo_handler(request, responder)

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    headers = connect_headers(
        "127.0.0.1:8080", forwarded_for="127.0.0.9:40000", service_host="echo.ns.svc",
        baggage={"k8s.namespace.name": "client-ns"},
    )
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:8080", headers)
        await tunnel.send_all(b"hello")
        assert await tunnel.receive_some() == b"hello"
        await tunnel.send_eof()
        assert await tunnel.receive_some() == b""
        await tunnel.aclose()
        assert client.active_streams == 0
    request = seen[0]
    assert (str(request.host), request.port) == ("127.0.0.1", 8080)
    assert request.forwarded_for == "127.0.0.9:40000"
    assert request.forwarded_host == "echo.ns.svc"
    assert request.baggage == {"k8s.namespace.name": "client-ns"}
    assert request.traceparent == dict(headers)["traceparent"]
    assert peers == [mesh.client_id]


async def test_bulk_transfer_both_ways_respects_flow_control(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """12 MiB through a 4 MiB stream window only completes if WINDOW_UPDATEs flow."""
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    payload = os.urandom(12 * 1024 * 1024)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        received = bytearray()

        async def reader() -> None:
            while data := await tunnel.receive_some():
                assert len(data) <= MAX_FRAME_SIZE
                received.extend(data)

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            await tunnel.send_all(payload)
            await tunnel.send_eof()
        assert bytes(received) == payload
        await tunnel.aclose()


async def test_half_close_end_to_end(mesh: TestMesh, loopback, nursery: trio.Nursery) -> None:
    """Client EOF reaches the handler as b"" while the handler can still send afterwards."""
    host = loopback.new()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        tunnel = await responder.accept()
        got = await receive_all(tunnel)
        await tunnel.send_all(b"got %d bytes" % len(got))
        await trio.sleep(0.01)
        await tunnel.send_all(b"; still sending after your EOF")
        await tunnel.send_eof()

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await tunnel.send_all(b"x" * 1000)
        await tunnel.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await tunnel.send_all(b"more")
        assert await receive_all(tunnel) == b"got 1000 bytes; still sending after your EOF"


async def test_half_close_through_splice_to_tcp_app(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """HBONE END_STREAM becomes TCP shutdown(SHUT_WR) upstream, and the app's EOF comes back."""
    host, app = loopback.new(), loopback.new()
    await start_tcp_echo(nursery, app, 8080)
    await start_hbone_server(nursery, host, mesh.server_ctx, splice_to_tcp_handler(app))
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream(f"{app}:8080")
        await tunnel.send_all(b"ping")
        assert await tunnel.receive_some() == b"ping"
        await tunnel.send_eof()
        assert await receive_all(tunnel) == b""
        with pytest.raises(HboneConnectError) as refused:
            await client.open_stream(f"{app}:8081")  # nothing listens there
        assert refused.value.status == 503
        assert "upstream connect failed" in refused.value.reason


@pytest.mark.parametrize("status", [401, 503])
async def test_handler_rejection_reaches_client(
    status: int, mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        await responder.reject(status, "denied by policy" if status == 401 else "no upstream")

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        for _ in range(2):  # the connection stays usable after a rejection
            with pytest.raises(HboneConnectError) as error:
                await client.open_stream("127.0.0.1:80")
            assert error.value.status == status
            assert error.value.reason in ("denied by policy", "no upstream")
        assert client.active_streams == 0
        assert not client.is_closed


async def test_handler_failures_answer_503_without_hurting_other_streams(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        if request.port == 1:
            raise RuntimeError("handler bug")
        if request.port == 2:
            return  # never answers
        await echo_handler(request, responder)

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        good = await client.open_stream("127.0.0.1:80")
        await good.send_all(b"before")
        with structlog.testing.capture_logs() as logs:
            for port in (1, 2):
                with pytest.raises(HboneConnectError) as error:
                    await client.open_stream(f"127.0.0.1:{port}")
                assert error.value.status == 503
        assert any(entry["event"] == "hbone.handler_failed" for entry in logs)
        await good.send_all(b" after")
        await good.send_eof()
        assert await receive_all(good) == b"before after"


class RawH2Client:
    """An h2 client that can send what HboneClient never would."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        self.conn.initiate_connection()

    async def request(self, headers: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
        """Send a header block and wait for the answer: (":status" or "reset", headers)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers)
        await self.stream.send_all(self.conn.data_to_send())
        while True:
            data = await self.stream.receive_some(65536)
            assert data, "server closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    answer = {bytes(k).decode(): bytes(v).decode() for k, v in event.headers}
                    await self.stream.send_all(self.conn.data_to_send())
                    return answer[":status"], answer
                if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    return "reset", {}
            await self.stream.send_all(self.conn.data_to_send())


@pytest.mark.parametrize(
    ("headers", "reason_part"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"),
          (":authority", "127.0.0.1:80")], "not CONNECT"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:80"), (":path", "/")],
         "must not carry"),
        ([(":method", "CONNECT"), (":authority", "echo.svc:80")], "not an IP"),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:70000")], "invalid port"),
        ([(":method", "CONNECT")], "missing :authority"),
    ],
)
async def test_malformed_requests_get_400_and_connection_survives(
    headers: list[tuple[str, str]], reason_part: str, mesh: TestMesh, loopback,
    nursery: trio.Nursery,
) -> None:
    host = loopback.new()
    handled: list[ConnectRequest] = []

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        handled.append(request)
        await responder.reject(503, "test handler")

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    tls = await connect_tls(host, HBONE_PORT, mesh.client_ctx, mesh.server_id)
    async with tls:
        raw = RawH2Client(tls)
        status, answer = await raw.request(headers)
        assert status == "400"
        assert reason_part in answer["x-hbone-reason"]
        assert handled == []
        status, _ = await raw.request([(":method", "CONNECT"), (":authority", "127.0.0.1:80")])
        assert status == "503"  # same connection, next stream reaches the handler
    assert len(handled) == 1


async def test_garbage_closes_connection_and_server_keeps_serving(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    # Garbage inside TLS: not an HTTP/2 preface.
    tls = await connect_tls(host, HBONE_PORT, mesh.client_ctx, mesh.server_id)
    async with tls:
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
        with trio.fail_after(2):
            try:
                while await tls.receive_some(65536):
                    pass  # a GOAWAY may arrive first; then the connection must end
            except trio.BrokenResourceError:
                pass
    # Garbage instead of TLS.
    tcp = await trio.open_tcp_stream(host, HBONE_PORT)
    async with tcp:
        await tcp.send_all(os.urandom(300))
        with trio.fail_after(2):
            try:
                while await tcp.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await tunnel.send_all(b"still here")
        assert await tunnel.receive_some() == b"still here"


async def _refused_client(host: str, ctx, mesh: TestMesh) -> str:
    """Try a CONNECT with ``ctx``; returns the server's logged refusal reason."""
    with structlog.testing.capture_logs() as logs:
        with pytest.raises((PeerIdentityError, HboneConnectError)):
            async with open_hbone_client(host, HBONE_PORT, ctx, mesh.server_id) as client:
                # TLS 1.3: the server judges the client certificate after the client finished.
                await client.open_stream("127.0.0.1:80")
        with trio.fail_after(2):
            while not any(e["event"] == "hbone.handshake_refused" for e in logs):
                await trio.sleep(0.01)
    return next(e["reason"] for e in logs if e["event"] == "hbone.handshake_refused")


async def test_untrusted_client_certificates_are_refused(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    foreign = mesh.pki.foreign_pki()
    foreign_ctx = client_context(certified(foreign.issue("client-ns", "client")),
                                 mesh.pki.trust_bundle)
    reason = await _refused_client(host, foreign_ctx, mesh)
    assert "certificate verification failed" in reason or "unknown ca" in reason.lower()

    expired_ctx = client_context(certified(mesh.pki.issue_expired("client-ns", "client")),
                                 mesh.pki.trust_bundle)
    reason = await _refused_client(host, expired_ctx, mesh)
    assert "expired" in reason

    other_td = mesh.pki.issue_with_uri("spiffe://other.example/ns/a/sa/b")
    other_ctx = client_context(certified(other_td), mesh.pki.trust_bundle)
    reason = await _refused_client(host, other_ctx, mesh)
    assert "trust domain 'other.example' is not accepted" in reason

    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await tunnel.send_all(b"ok")
        assert await tunnel.receive_some() == b"ok"


async def test_client_refuses_wrong_or_expired_server(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host, stale_host = loopback.new(), loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    wrong = mesh.pki.identity("server-ns", "impostor")
    with pytest.raises(PeerIdentityError, match="expected spiffe://cluster.local/ns/server-ns/sa/impostor"):
        await connect_tls(host, HBONE_PORT, mesh.client_ctx, wrong)

    stale = certified(mesh.pki.issue_expired("server-ns", "server", expired_ago=timedelta(1)))
    await start_hbone_server(
        nursery, stale_host, server_context(stale, mesh.pki.trust_bundle), echo_handler
    )
    with pytest.raises(PeerIdentityError, match="expired"):
        await connect_tls(stale_host, HBONE_PORT, mesh.client_ctx, mesh.server_id)


async def test_stream_reset_by_client_is_seen_by_handler(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    outcome: list[str] = []
    done = trio.Event()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        tunnel = await responder.accept()
        try:
            await tunnel.receive_some()
            await tunnel.receive_some()
        except trio.BrokenResourceError as exc:
            outcome.append(str(exc))
        finally:
            done.set()

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await tunnel.send_all(b"x")
        await tunnel.aclose()  # neither side finished: RST_STREAM(CANCEL)
        with trio.fail_after(2):
            await done.wait()
        assert outcome and "CANCEL" in outcome[0]
        assert client.active_streams == 0


async def test_idle_connection_keeps_no_h2_stream_state(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """h2 forgets closed streams only when it next counts open ones: the session makes it
    do so when its last stream ends, so an idle pooled connection holds no stream objects."""
    host = loopback.new()
    sessions = []

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        sessions.append(responder._session)
        await echo_handler(request, responder)

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        for _ in range(5):
            tunnel = await client.open_stream("127.0.0.1:80")
            await tunnel.send_all(b"x")
            await tunnel.send_eof()
            assert await receive_all(tunnel) == b"x"
            await tunnel.aclose()
        with trio.fail_after(2):
            while sessions[-1].streams:
                await trio.sleep(0.01)
        assert client._session.conn.streams == {}
        assert sessions[-1].conn.streams == {}
