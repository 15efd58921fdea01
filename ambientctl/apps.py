"""Sample applications for the embedded mesh and the demo, and the clients that call them.

- ``serve_http_echo``: HTTP/1.1 (h11, keep-alive) answering every request with a JSON
  description of what it received, so a demo can show which pod answered and which headers
  survived the mesh.
- ``serve_tcp_echo``: echoes bytes and honours half-close, the property HBONE must carry.
- ``socks5_connect``: dials through ztunnel's SOCKS5 port (15080) from a given source address,
  which is how ztunnel knows which local pod is calling in the embedded mode.
- ``http_get`` / ``http_request``: a small h11 client over any Trio stream.

``python -m ambientctl.apps http|tcp --address A --port P --name N`` runs one app as its own
process, as ``ambientctl up`` does for every pod port.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import signal
import struct
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import h11
import structlog
import trio

from ambient_common.logging import LOG_FORMATS, LogFormat, configure_logging

log = structlog.get_logger()

MAX_RECEIVE = 64 * 1024
# A request head larger than this is refused with 431 by h11; apps do not need more.
MAX_REQUEST_HEAD = 16 * 1024
SERVER_HEADER = b"ambient-lite-echo"


# ---------------------------------------------------------------------------------------------
# HTTP echo server


def echo_response_body(
    pod: str, request: h11.Request, body_length: int, peer: str
) -> dict[str, Any]:
    """What the echo app answers: who it is and what it saw (sans-IO, unit-testable)."""
    method = request.method.decode("ascii", "replace")
    answer: dict[str, Any] = {
        "pod": pod,
        "method": method,
        "path": request.target.decode("ascii", "replace"),
        "headers": _header_dict(request.headers),
        "peer": peer,
    }
    if method == "POST":
        answer["body_length"] = body_length
    return answer


def _header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names lower-cased; repeated headers joined with ", " as HTTP allows."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


class EchoBehaviour:
    """What the echo answers besides 200: httpbin's ``/status/<code>`` and
    ``/delay/<seconds>`` (a slow backend, for timeouts and circuit breaking), and, to play a
    flaky backend in the demo, a 503 on every ``fail_every``-th request (deterministic, so a
    retry policy's effect can be shown exactly)."""

    MAX_DELAY = 10.0  # httpbin's cap too: a sample app must not hold a connection for long

    def __init__(self, fail_every: int = 0) -> None:
        self.fail_every = fail_every
        self.requests = 0

    @classmethod
    def delay_for(cls, path: str) -> float:
        """Seconds to wait before answering: ``/delay/<seconds>`` (fractions allowed,
        capped at ``MAX_DELAY``); 0 for other paths and for a bad number (answered 400)."""
        seconds = _delay_argument(path)
        return 0.0 if seconds is None else min(seconds, cls.MAX_DELAY)

    def status_for(self, path: str) -> int:
        self.requests += 1
        if path.startswith("/status/"):
            code = path.removeprefix("/status/").split("?")[0].split("/")[0]
            if code.isdigit() and 200 <= int(code) <= 599:
                return int(code)
        if path.startswith("/delay/") and _delay_argument(path) is None:
            return 400
        if self.fail_every and self.requests % self.fail_every == 0:
            return 503
        return 200


def _delay_argument(path: str) -> float | None:
    """The ``<seconds>`` of ``/delay/<seconds>[/...][?...]``: a finite number >= 0, else
    None (also for paths that are not ``/delay/``)."""
    if not path.startswith("/delay/"):
        return None
    text = path.removeprefix("/delay/").split("?")[0].split("/")[0]
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def serve_http_echo(
    address: str,
    port: int,
    name: str,
    *,
    fail_every: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started(bound_port)`` once listening."""
    listeners = await trio.open_tcp_listeners(port, host=address)
    bound_port = listeners[0].socket.getsockname()[1]
    log.info("http echo listening", app=name, address=address, port=bound_port,
             fail_every=fail_every)
    behaviour = EchoBehaviour(fail_every)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_http_connection(stream, name, behaviour)
        except Exception:
            # A bug must cost one connection, not the whole server.
            log.exception("http echo connection failed", app=name)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound_port)


async def _serve_http_connection(
    stream: trio.SocketStream, pod: str, behaviour: EchoBehaviour | None = None
) -> None:
    """One keep-alive connection. Any failure ends this connection only, never the server."""
    peer = _peer_text(stream)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    async with stream:
        try:
            while True:
                request = await _next_request(stream, conn)
                if request is None:
                    return
                body_length = await _drain_body(stream, conn)
                answer = echo_response_body(pod, request, body_length, peer)
                behaviour = behaviour or EchoBehaviour()
                await trio.sleep(behaviour.delay_for(answer["path"]))
                status = behaviour.status_for(answer["path"])
                await _send_json(stream, conn, status, answer)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            log.info("bad http request", app=pod, peer=peer, error=str(exc))
            await _send_protocol_error(stream, conn, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("http connection dropped", app=pod, peer=peer, error=str(exc))


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RECEIVE))
            continue
        if isinstance(event, h11.Request):
            return event
        # ConnectionClosed at the start of a cycle is a client ending keep-alive: normal.
        return None


async def _drain_body(stream: trio.SocketStream, conn: h11.Connection) -> int:
    length = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RECEIVE))
        elif isinstance(event, h11.Data):
            length += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return length
        else:
            raise h11.RemoteProtocolError(f"connection ended inside the request body ({event})")


async def _send_json(
    stream: trio.SocketStream, conn: h11.Connection, status: int, payload: Any
) -> None:
    body = json.dumps(payload).encode() + b"\n"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"server", SERVER_HEADER),
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data or b"")


async def _send_protocol_error(
    stream: trio.SocketStream, conn: h11.Connection, exc: h11.RemoteProtocolError
) -> None:
    """Answer a malformed request with h11's suggested status (400/431) if still possible."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = json.dumps({"error": str(exc)}).encode() + b"\n"
    response = h11.Response(
        status_code=exc.error_status_hint,
        headers=[
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    try:
        await stream.send_all((conn.send(response) or b"") + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# TCP echo server


async def serve_tcp_echo(
    address: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Echo every byte back; on the client's EOF, finish sending, then send EOF and close."""
    listeners = await trio.open_tcp_listeners(port, host=address)
    bound_port = listeners[0].socket.getsockname()[1]
    log.info("tcp echo listening", address=address, port=bound_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _echo_connection, listeners)
        task_status.started(bound_port)


async def _echo_connection(stream: trio.SocketStream) -> None:
    try:
        await _echo(stream)
    except Exception:
        log.exception("tcp echo connection failed")


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(MAX_RECEIVE):
                await stream.send_all(data)
            await stream.send_eof()
            # Let the peer read our EOF and close first, so it sees a clean end, not a reset.
            with trio.move_on_after(5):
                while await stream.receive_some(MAX_RECEIVE):
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("tcp echo connection dropped", error=str(exc))


# ---------------------------------------------------------------------------------------------
# SOCKS5 client (RFC 1928, CONNECT, no authentication)

SOCKS5_REPLY_MESSAGES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


class Socks5ConnectError(ConnectionError):
    """The SOCKS5 server answered the CONNECT with a non-zero reply code."""

    def __init__(self, reply_code: int, message: str) -> None:
        super().__init__(f"SOCKS5 CONNECT failed: {message} (reply code {reply_code})")
        self.reply_code = reply_code
        self.message = message


class Socks5ProtocolError(ConnectionError):
    """The peer on the SOCKS5 port did not speak SOCKS5 as expected."""


SOCKS5_GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication


def socks5_connect_request(dest_host: str, dest_port: int) -> bytes:
    """The CONNECT request for an IP literal or a host name."""
    if not 0 < dest_port < 65536:
        raise ValueError(f"destination port {dest_port} is out of range")
    try:
        ip = ipaddress.ip_address(dest_host)
    except ValueError:
        encoded = dest_host.encode("idna")
        if not 0 < len(encoded) < 256:
            raise ValueError(f"destination host {dest_host!r} is not a valid name") from None
        address = b"\x03" + bytes([len(encoded)]) + encoded
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + address + struct.pack("!H", dest_port)


def check_method_selection(reply: bytes) -> None:
    if len(reply) != 2 or reply[0] != 5:
        raise Socks5ProtocolError(f"not a SOCKS5 method selection reply: {reply!r}")
    if reply[1] != 0:
        raise Socks5ProtocolError(
            f"SOCKS5 server refused 'no authentication' (selected method {reply[1]:#x})"
        )


def socks5_reply_remaining(head: bytes) -> int:
    """Given the first 5 reply bytes, how many more belong to the reply; raises on failure."""
    version, code, _reserved, atyp, first = head
    if version != 5:
        raise Socks5ProtocolError(f"SOCKS5 reply has version {version}, expected 5")
    if code != 0:
        raise Socks5ConnectError(code, SOCKS5_REPLY_MESSAGES.get(code, "unknown reply code"))
    if atyp == 0x01:
        return 4 - 1 + 2
    if atyp == 0x04:
        return 16 - 1 + 2
    if atyp == 0x03:
        return first + 2
    raise Socks5ProtocolError(f"SOCKS5 reply has unknown address type {atyp:#x}")


async def _receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    """Read exactly ``count`` bytes and not one more: what follows belongs to the caller."""
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise Socks5ProtocolError(
                f"connection closed during the SOCKS5 handshake after {len(data)} bytes"
            )
        data += chunk
    return bytes(data)


async def socks5_connect(
    proxy_addr: str,
    proxy_port: int,
    dest_host: str,
    dest_port: int,
    *,
    source_address: str,
) -> trio.SocketStream:
    """A stream to ``dest_host:dest_port`` through the SOCKS5 proxy, sent from
    ``source_address`` (the calling pod's IP: ztunnel identifies the caller by it)."""
    stream = await trio.open_tcp_stream(proxy_addr, proxy_port, local_address=source_address)
    try:
        await stream.send_all(SOCKS5_GREETING)
        check_method_selection(await _receive_exactly(stream, 2))
        await stream.send_all(socks5_connect_request(dest_host, dest_port))
        head = await _receive_exactly(stream, 5)
        await _receive_exactly(stream, socks5_reply_remaining(head))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


# ---------------------------------------------------------------------------------------------
# HTTP client


class HttpClientError(ConnectionError):
    """The server closed the connection or answered something that is not HTTP/1.1."""


async def http_request(
    stream: trio.abc.Stream,
    method: str,
    host: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request/response on ``stream`` (which stays open for the caller)."""
    conn = h11.Connection(h11.CLIENT)
    request_headers = [("host", host), *headers]
    if body or method.upper() in ("POST", "PUT", "PATCH"):
        request_headers.append(("content-length", str(len(body))))
    out = conn.send(h11.Request(method=method.upper(), target=path, headers=request_headers))
    if body:
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
    out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(out)

    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    peer_closed = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(MAX_RECEIVE))
                peer_closed = not data
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = _header_dict(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, response_headers, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpClientError(
                    f"connection closed before the response to {method} {path} ended"
                )
    except h11.RemoteProtocolError as exc:
        if peer_closed:
            raise HttpClientError(
                f"connection closed before the response to {method} {path} ended"
            ) from None
        raise HttpClientError(f"bad HTTP response to {method} {path}: {exc}") from None


async def http_get(
    stream: trio.abc.Stream, host: str, path: str
) -> tuple[int, dict[str, str], bytes]:
    return await http_request(stream, "GET", host, path)


# ---------------------------------------------------------------------------------------------
# Process entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ambientctl.apps", description="Run one sample application."
    )
    parser.add_argument("kind", choices=["http", "tcp"], help="http echo or tcp echo")
    parser.add_argument("--address", required=True, help="the pod IP to listen on")
    parser.add_argument("--port", required=True, type=int, help="the container port")
    parser.add_argument("--name", default="app", help="the pod name the http echo reports")
    parser.add_argument("--fail-every", type=int, default=0, metavar="N",
                        help="http echo: answer 503 to every N-th request (a flaky backend)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    return parser


async def _run_app(kind: str, address: str, port: int, name: str, fail_every: int = 0) -> None:
    """Serve until SIGTERM/SIGINT, then return so the process exits 0 (a clean stop)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if kind == "http":
                await nursery.start(
                    partial(serve_http_echo, fail_every=fail_every), address, port, name
                )
            else:
                await nursery.start(serve_tcp_echo, address, port)
            async for signum in signals:
                log.info("stopping", app=name, signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt: LogFormat = args.log_format
    configure_logging(fmt)
    try:
        trio.run(_run_app, args.kind, args.address, args.port, args.name, args.fail_every)
    except* OSError as group:
        error = group.exceptions[0]
        log.error("cannot listen", address=args.address, port=args.port, error=str(error))
        exit_code = 1
    else:
        exit_code = 0
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
