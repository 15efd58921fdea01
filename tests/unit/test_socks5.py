"""ztunnel.socks5: RFC 1928 server handshake, sans-IO."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel import socks5
from ztunnel.socks5 import (
    AddressType,
    ConnectRequest,
    Greeting,
    NeedData,
    Socks5Error,
    Socks5ServerProtocol,
    greeting_reply,
    parse_greeting,
    parse_request,
    request_reply,
)

GREETING = b"\x05\x01\x00"


def connect(atyp: int, address: bytes, port: int, command: int = 1) -> bytes:
    return bytes([5, command, 0, atyp]) + address + port.to_bytes(2, "big")


IPV4_REQUEST = connect(1, bytes([10, 96, 0, 10]), 80)
IPV6_REQUEST = connect(4, ipaddress.IPv6Address("fd00::1").packed, 443)


def name_request(name: bytes, port: int = 8080) -> bytes:
    return connect(3, bytes([len(name)]) + name, port)


def handshake(data: bytes, chunk: int | None = None) -> tuple[Socks5ServerProtocol, list[object]]:
    """Feed ``data`` (in ``chunk``-sized pieces) and collect events until a request."""
    proto = Socks5ServerProtocol()
    events: list[object] = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        proto.receive_data(piece)
        while proto.state in ("greeting", "request"):
            event = proto.next_event()
            if isinstance(event, NeedData):
                break
            events.append(event)
    return proto, events


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7])
@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (IPV4_REQUEST, ConnectRequest("10.96.0.10", 80, AddressType.IPV4)),
        (IPV6_REQUEST, ConnectRequest("fd00::1", 443, AddressType.IPV6)),
        (name_request(b"web.demo.svc.cluster.local"),
         ConnectRequest("web.demo.svc.cluster.local", 8080, AddressType.DOMAINNAME)),
    ],
)
def test_handshake_in_any_fragmentation(
    request_bytes: bytes, expected: ConnectRequest, chunk: int | None
) -> None:
    proto, events = handshake(GREETING + request_bytes + b"hello", chunk)
    assert events == [Greeting((0,), 0), expected]
    assert proto.state == "reply"
    assert proto.data_to_send() == b"\x05\x00"
    assert proto.data_to_send() == b""
    proto.send_reply(socks5.SUCCEEDED, "127.0.0.1", 41000)
    assert proto.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01" + (41000).to_bytes(2, "big")
    assert proto.state == "done"
    assert proto.trailing_data() == b"hello"


def test_byte_by_byte_returns_need_data_until_complete() -> None:
    proto = Socks5ServerProtocol()
    assert isinstance(proto.next_event(), NeedData)
    for byte in GREETING[:-1]:
        proto.receive_data(bytes([byte]))
        assert isinstance(proto.next_event(), NeedData)
    proto.receive_data(GREETING[-1:])
    assert proto.next_event() == Greeting((0,), 0)
    for byte in IPV4_REQUEST[:-1]:
        proto.receive_data(bytes([byte]))
        assert isinstance(proto.next_event(), NeedData)
    proto.receive_data(IPV4_REQUEST[-1:])
    assert isinstance(proto.next_event(), ConnectRequest)
    assert proto.trailing_data() == b""


def test_no_auth_chosen_among_several_methods() -> None:
    proto, events = handshake(b"\x05\x03\x02\x01\x00")
    assert events == [Greeting((2, 1, 0), 0)]
    assert proto.data_to_send() == b"\x05\x00"


def test_no_acceptable_method() -> None:
    proto, events = handshake(b"\x05\x01\x02" + IPV4_REQUEST)
    assert events == [Greeting((2,), 0xFF)]
    assert not events[0].accepted  # type: ignore[attr-defined]
    assert proto.data_to_send() == b"\x05\xff"
    assert proto.state == "closed"
    with pytest.raises(RuntimeError):
        proto.next_event()


@pytest.mark.parametrize(
    ("command", "name"), [(2, "BIND"), (3, "UDP ASSOCIATE"), (9, "unknown command 0x09")]
)
def test_unsupported_commands_get_reply_7(command: int, name: str) -> None:
    proto = Socks5ServerProtocol()
    proto.receive_data(GREETING + connect(1, bytes(4), 80, command=command))
    assert proto.next_event() == Greeting((0,), 0)
    assert proto.data_to_send() == b"\x05\x00"
    with pytest.raises(Socks5Error, match=name) as raised:
        proto.next_event()
    assert raised.value.reply_code == socks5.COMMAND_NOT_SUPPORTED == 7
    assert proto.data_to_send() == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert proto.state == "closed"


def test_unsupported_address_type_gets_reply_8() -> None:
    proto = Socks5ServerProtocol()
    proto.receive_data(GREETING + b"\x05\x01\x00\x07")
    proto.next_event()
    proto.data_to_send()
    with pytest.raises(Socks5Error, match="address type 0x07") as raised:
        proto.next_event()
    assert raised.value.reply_code == socks5.ADDRESS_TYPE_NOT_SUPPORTED == 8
    assert proto.data_to_send()[:2] == b"\x05\x08"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x04\x01\x00\x50", "SOCKS4"),
        (b"GET / HTTP/1.1\r\n", "0x47, not a SOCKS5 version byte"),
        (b"\x05\x00", "zero authentication methods"),
        (b"\x16\x03\x01", "0x16"),
    ],
)
def test_garbage_greetings(data: bytes, message: str) -> None:
    proto = Socks5ServerProtocol()
    proto.receive_data(data)
    with pytest.raises(Socks5Error, match=message) as raised:
        proto.next_event()
    assert raised.value.reply_code == socks5.GENERAL_FAILURE
    assert proto.data_to_send() == b""  # nothing to answer a non-SOCKS5 client
    assert proto.state == "closed"


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"\x04\x01\x00\x01", "SOCKS4"),
        (name_request(b""), "empty domain name"),
        (name_request(b"bad name"), "not a valid host name"),
        (name_request(b"a/b"), "not a valid host name"),
        (name_request(b"caf\xc3\xa9"), "not ASCII"),
        (connect(1, bytes([10, 0, 0, 1]), 0), "port 0"),
    ],
)
def test_bad_requests_get_general_failure(request_bytes: bytes, message: str) -> None:
    proto = Socks5ServerProtocol()
    proto.receive_data(GREETING + request_bytes)
    proto.next_event()
    proto.data_to_send()
    with pytest.raises(Socks5Error, match=message) as raised:
        proto.next_event()
    assert raised.value.reply_code == socks5.GENERAL_FAILURE
    assert proto.data_to_send()[:2] == b"\x05\x01"


def test_peer_closing_mid_handshake_is_an_error() -> None:
    proto = Socks5ServerProtocol()
    proto.receive_data(b"\x05\x02\x00")
    assert isinstance(proto.next_event(), NeedData)
    proto.receive_data(b"")
    with pytest.raises(Socks5Error, match="before a complete greeting \\(3 bytes received\\)"):
        proto.next_event()


def test_buffer_is_bounded() -> None:
    proto = Socks5ServerProtocol(max_buffered=300)
    proto.receive_data(b"\x05")
    with pytest.raises(Socks5Error, match="more than 300 bytes"):
        proto.receive_data(b"\x00" * 300)
    assert proto.state == "closed"


def test_incomplete_messages_never_exceed_their_maximum_length() -> None:
    """Once a message's maximum length is buffered the parser has decided, so a driver
    that calls next_event after each read never holds more than that."""
    longest_greeting = b"\x05\xff" + bytes(range(255))
    assert parse_greeting(longest_greeting) == (socks5.MAX_GREETING_LENGTH,
                                                tuple(range(255)))
    longest_request = name_request(b"a" * 255)
    assert len(longest_request) == socks5.MAX_REQUEST_LENGTH
    parsed = parse_request(longest_request)
    assert parsed is not None and parsed[0] == socks5.MAX_REQUEST_LENGTH
    for cut in range(len(longest_request)):
        assert parse_request(longest_request[:cut]) is None


def test_reply_and_state_misuse() -> None:
    proto = Socks5ServerProtocol()
    with pytest.raises(RuntimeError):
        proto.send_reply(socks5.SUCCEEDED)
    proto.receive_data(GREETING + IPV4_REQUEST)
    proto.next_event()
    proto.next_event()
    with pytest.raises(RuntimeError):
        proto.next_event()
    assert proto.data_to_send() == b"\x05\x00"
    proto.send_reply(socks5.CONNECTION_REFUSED)
    assert proto.data_to_send() == b"\x05\x05\x00\x01" + bytes(6)
    assert proto.state == "closed"


def test_reply_builders() -> None:
    assert greeting_reply(0) == b"\x05\x00"
    assert request_reply(socks5.HOST_UNREACHABLE) == b"\x05\x04\x00\x01" + bytes(6)
    six = request_reply(socks5.SUCCEEDED, "::1", 15080)
    assert six[:4] == b"\x05\x00\x00\x04"
    assert six[4:20] == ipaddress.IPv6Address("::1").packed
    assert six[20:] == (15080).to_bytes(2, "big")
    assert len(six) == 22


def test_reply_codes_are_rfc_1928() -> None:
    assert list(range(9)) == [
        socks5.SUCCEEDED, socks5.GENERAL_FAILURE, socks5.CONNECTION_NOT_ALLOWED,
        socks5.NETWORK_UNREACHABLE, socks5.HOST_UNREACHABLE, socks5.CONNECTION_REFUSED,
        socks5.TTL_EXPIRED, socks5.COMMAND_NOT_SUPPORTED, socks5.ADDRESS_TYPE_NOT_SUPPORTED,
    ]


def test_reserved_byte_is_ignored() -> None:
    request = bytearray(IPV4_REQUEST)
    request[2] = 0x7F
    assert parse_request(bytes(request)) == (10, ConnectRequest("10.96.0.10", 80,
                                                                AddressType.IPV4))
