"""SOCKS5 (RFC 1928) server side, sans-IO: the explicit outbound entry on port 15080.

Only what a mesh entry needs: method NO AUTHENTICATION REQUIRED and command CONNECT, with
IPv4, IPv6 and domain-name destinations. A domain name is handed to the caller as is:
whether it names a mesh service (and so may be resolved) is the proxy's decision, not this
module's.

Two layers: pure parsers/builders (``parse_greeting``, ``parse_request``, ``greeting_reply``,
``request_reply``) and ``Socks5ServerProtocol``, an h11-style state machine over them that
buffers input (never more than ``max_buffered`` bytes), answers the greeting itself and
queues error replies. The Trio driver's loop::

    proto = Socks5ServerProtocol()
    while True:
        try:
            event = proto.next_event()
        except Socks5Error:
            await stream.send_all(proto.data_to_send())  # the failure reply, if any
            return
        await stream.send_all(proto.data_to_send())
        if isinstance(event, NeedData):
            proto.receive_data(await stream.receive_some())  # b"" = peer closed
        elif isinstance(event, Greeting) and not event.accepted:
            return
        elif isinstance(event, ConnectRequest):
            break
    ...connect..., then proto.send_reply(code, bound_ip, bound_port) and send data_to_send(),
    then forward proto.trailing_data() before relaying.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn

VERSION = 5

METHOD_NO_AUTH = 0x00
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

# Reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
CONNECTION_NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# The longest messages a client may send before it has a reply.
MAX_GREETING_LENGTH = 2 + 255
MAX_REQUEST_LENGTH = 4 + 1 + 255 + 2

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Socks5Error(Exception):
    """Malformed or unsupported input; ``reply_code`` is what to answer the request with."""

    def __init__(self, reply_code: int, reason: str) -> None:
        super().__init__(reason)
        self.reply_code = reply_code
        self.reason = reason


@dataclass(frozen=True)
class NeedData:
    """More bytes are needed before the next event."""


@dataclass(frozen=True)
class Greeting:
    """The client's method offer and the method chosen (``METHOD_NO_ACCEPTABLE`` if the
    client did not offer NO AUTH: the reply says so and the connection must be closed)."""

    methods: tuple[int, ...]
    method: int

    @property
    def accepted(self) -> bool:
        return self.method != METHOD_NO_ACCEPTABLE


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT to ``host:port``; ``host`` is an IP address or, for DOMAINNAME, a name."""

    host: str
    port: int
    address_type: AddressType


Event = NeedData | Greeting | ConnectRequest


def parse_greeting(buf: bytes | bytearray) -> tuple[int, tuple[int, ...]] | None:
    """``(consumed, methods)`` of a complete greeting, None if more bytes are needed."""
    if not buf:
        return None
    _check_version(buf[0], "greeting")
    if len(buf) < 2:
        return None
    count = buf[1]
    if count == 0:
        raise Socks5Error(GENERAL_FAILURE, "greeting offers zero authentication methods")
    if len(buf) < 2 + count:
        return None
    return 2 + count, tuple(buf[2 : 2 + count])


def parse_request(buf: bytes | bytearray) -> tuple[int, ConnectRequest] | None:
    """``(consumed, request)`` of a complete CONNECT request, None if more bytes are
    needed; raises Socks5Error as soon as the bytes seen are wrong."""
    if not buf:
        return None
    _check_version(buf[0], "request")
    if len(buf) < 2:
        return None
    command = buf[1]
    if command != CMD_CONNECT:
        names = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}
        name = names.get(command, f"unknown command {command:#04x}")
        raise Socks5Error(COMMAND_NOT_SUPPORTED, f"{name} is not supported, only CONNECT")
    if len(buf) < 4:
        return None  # buf[2] is RSV: ignored, as clients disagree on it
    atyp = buf[3]
    if atyp == AddressType.IPV4:
        end = 4 + 4
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(buf[4:end]))  # C, not ipaddress
    elif atyp == AddressType.IPV6:
        end = 4 + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[4:end])))
    elif atyp == AddressType.DOMAINNAME:
        if len(buf) < 5:
            return None
        end = 5 + buf[4]
        if len(buf) < end + 2:
            return None
        host = _decode_hostname(bytes(buf[5:end]))
    else:
        raise Socks5Error(ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp:#04x} is not "
                          "supported (IPv4 1, domain name 3, IPv6 4)")
    port = int.from_bytes(buf[end : end + 2], "big")
    if port == 0:
        raise Socks5Error(GENERAL_FAILURE, f"destination port 0 for {host}")
    return end + 2, ConnectRequest(host, port, AddressType(atyp))


def greeting_reply(method: int) -> bytes:
    return bytes([VERSION, method])


def request_reply(code: int, bound_ip: str = "0.0.0.0", bound_port: int = 0) -> bytes:
    """The reply to a request; ``bound_*`` is the proxy's local end of the upstream
    connection (zeros when there is none, as after a failure). Raises ValueError for a
    ``bound_ip`` that is not an IP address."""
    atyp, packed = _pack_ip(bound_ip)
    return bytes([VERSION, code, 0x00, atyp]) + packed + bound_port.to_bytes(2, "big")


def _pack_ip(ip: str) -> tuple[AddressType, bytes]:
    """An address's SOCKS5 type and bytes, with the C socket functions: every connection's
    reply goes through here (``ipaddress`` costs a visible share of a short connection)."""
    for family, atyp in ((socket.AF_INET, AddressType.IPV4), (socket.AF_INET6, AddressType.IPV6)):
        try:
            return atyp, socket.inet_pton(family, ip)
        except OSError:
            continue
    raise ValueError(f"{ip!r} is not an IP address")


def _check_version(version: int, what: str) -> None:
    if version == VERSION:
        return
    if version == 4:
        raise Socks5Error(GENERAL_FAILURE, f"{what} is SOCKS4, only SOCKS5 is supported")
    raise Socks5Error(GENERAL_FAILURE, f"{what} starts with {version:#04x}, not a SOCKS5 "
                      "version byte (0x05)")


def _decode_hostname(raw: bytes) -> str:
    if not raw:
        raise Socks5Error(GENERAL_FAILURE, "empty domain name")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Socks5Error(GENERAL_FAILURE, f"domain name {raw!r} is not ASCII") from None
    if not _HOSTNAME.match(name):
        raise Socks5Error(GENERAL_FAILURE, f"domain name {name!r} is not a valid host name")
    return name


class Socks5ServerProtocol:
    """One client's handshake: greeting, then one CONNECT request, then our reply."""

    def __init__(self, *, max_buffered: int = 64 * 1024) -> None:
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._state = "greeting"  # -> "request" -> "reply" -> "done"; or "closed"
        self._max_buffered = max_buffered
        self._peer_closed = False

    @property
    def state(self) -> str:
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._peer_closed = True
            return
        self._buffer += data
        if self._state in ("greeting", "request") and len(self._buffer) > self._max_buffered:
            self._fail(GENERAL_FAILURE, f"more than {self._max_buffered} bytes before a "
                       "complete request")

    def next_event(self) -> Event:
        """The next handshake event; raises Socks5Error (with any failure reply queued in
        ``data_to_send``) when the client's bytes are wrong."""
        if self._state not in ("greeting", "request"):
            raise RuntimeError(f"next_event() called in state {self._state!r}")
        try:
            if self._state == "greeting":
                return self._next_greeting()
            return self._next_request()
        except Socks5Error as exc:
            self._fail(exc.reply_code, exc.reason)

    def _next_greeting(self) -> Greeting | NeedData:
        parsed = parse_greeting(self._buffer)
        if parsed is None:
            return self._need_data()
        consumed, methods = parsed
        del self._buffer[:consumed]
        method = METHOD_NO_AUTH if METHOD_NO_AUTH in methods else METHOD_NO_ACCEPTABLE
        self._outgoing += greeting_reply(method)
        self._state = "request" if method == METHOD_NO_AUTH else "closed"
        return Greeting(methods, method)

    def _next_request(self) -> ConnectRequest | NeedData:
        parsed = parse_request(self._buffer)
        if parsed is None:
            return self._need_data()
        consumed, request = parsed
        del self._buffer[:consumed]
        self._state = "reply"
        return request

    def send_reply(self, code: int, bound_ip: str = "0.0.0.0", bound_port: int = 0) -> None:
        """Queue the answer to the ConnectRequest (SUCCEEDED or a failure code)."""
        if self._state != "reply":
            raise RuntimeError(f"send_reply() called in state {self._state!r}")
        self._outgoing += request_reply(code, bound_ip, bound_port)
        self._state = "done" if code == SUCCEEDED else "closed"

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request: the start of the relayed stream."""
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    def _need_data(self) -> NeedData:
        if self._peer_closed:
            what = "greeting" if self._state == "greeting" else "request"
            raise Socks5Error(GENERAL_FAILURE, f"client closed the connection before a "
                              f"complete {what} ({len(self._buffer)} bytes received)")
        return NeedData()

    def _fail(self, code: int, reason: str) -> NoReturn:
        """Queue the right failure reply for the phase, close and raise."""
        if self._state == "request":
            self._outgoing += request_reply(code)
        self._state = "closed"
        self._buffer.clear()
        raise Socks5Error(code, reason)

