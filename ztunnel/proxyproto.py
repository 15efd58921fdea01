"""PROXY protocol v1 and v2 header parser (HAProxy's spec), sans-IO.

In the embedded mode nothing captures traffic, so a plaintext client of a pod's inbound
listener (``podIP:15006``) first sends a PROXY header saying which port it meant; this is the
stand-in for ``SO_ORIGINAL_DST`` (docs/internals.md). The listener takes only the destination
port from it; addresses are parsed and checked all the same so that a broken header is
reported, not half-used.

``parse_proxy_header(buf)`` returns ``(consumed, ProxyHeader)`` once a whole header is in
``buf``, ``None`` while more bytes are needed, and raises ``ProxyProtocolError`` as soon as
the bytes cannot be a valid header. A caller never needs to buffer more than
``MAX_HEADER_LENGTH`` bytes: if the parser still wants more, the header is longer than that.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # including the CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
MAX_HEADER_LENGTH = V2_FIXED_LENGTH + 0xFFFF

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_V2_FAMILY_UNSPEC = 0x0
_V2_FAMILY_INET = 0x1
_V2_FAMILY_INET6 = 0x2
_V2_FAMILY_UNIX = 0x3
_V2_TRANSPORT_STREAM = 0x1
_V2_ADDRESS_LENGTHS = {_V2_FAMILY_INET: 12, _V2_FAMILY_INET6: 36, _V2_FAMILY_UNIX: 216}

Endpoint = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The connection does not start with a valid PROXY protocol header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    """The addresses the header declares; both None for ``UNKNOWN`` (v1), ``LOCAL`` (v2,
    health checks) and address families without IP addresses."""

    source: Endpoint | None
    destination: Endpoint | None
    version: int = 1


def parse_proxy_header(buf: bytes | bytearray) -> tuple[int, ProxyHeader] | None:
    data = bytes(buf[:MAX_HEADER_LENGTH])
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError(f"connection starts with {data[:8]!r}, not a PROXY protocol "
                             "header (send 'PROXY TCP4 ...' or the v2 signature first)")


def _parse_v1(data: bytes) -> tuple[int, ProxyHeader] | None:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError(f"v1 header must start with 'PROXY ', got {head!r}")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
        if b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyProtocolError("v1 header line ends without CR before LF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) < 2:
        raise ProxyProtocolError(f"v1 header {line!r} has no protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return end + 2, ProxyHeader(None, None, 1)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(f"v1 header {line!r} does not have the form "
                                 "'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    version = 4 if protocol == "TCP4" else 6
    source = (_v1_address(fields[2], version, "source"), _v1_port(fields[4], "source"))
    destination = (
        _v1_address(fields[3], version, "destination"),
        _v1_port(fields[5], "destination"),
    )
    return end + 2, ProxyHeader(source, destination, 1)


def _v1_address(text: str, version: int, what: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 {what} address {text!r} is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError(f"v1 {what} address {text!r} is not IPv{version} as "
                                 f"TCP{version} requires")
    return str(address)


def _v1_port(text: str, what: str) -> int:
    # The spec: decimal, no leading zero, 0-65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 {what} port {text!r} is not a decimal number")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 {what} port {port} is out of range")
    return port


def _parse_v2(data: bytes) -> tuple[int, ProxyHeader] | None:
    head = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        raise ProxyProtocolError("bytes do not match the PROXY protocol v2 signature")
    if len(data) < V2_FIXED_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"v2 header has version {version}, expected 2")
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        raise ProxyProtocolError(f"v2 header has unknown command {command:#x}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return None
    if command == _V2_COMMAND_LOCAL:
        return total, ProxyHeader(None, None, 2)
    if family not in (_V2_FAMILY_UNSPEC, *_V2_ADDRESS_LENGTHS):
        raise ProxyProtocolError(f"v2 header has unknown address family {family:#x}")
    if family in _V2_ADDRESS_LENGTHS and transport != _V2_TRANSPORT_STREAM:
        raise ProxyProtocolError(f"v2 header transport {transport:#x} is not STREAM (TCP)")
    needed = _V2_ADDRESS_LENGTHS.get(family, 0)
    if length < needed:
        raise ProxyProtocolError(f"v2 address block is {length} bytes, family "
                                 f"{family:#x} needs {needed}")
    block = data[V2_FIXED_LENGTH:total]
    if family == _V2_FAMILY_INET:
        source = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        dest = (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
        return total, ProxyHeader(source, dest, 2)
    if family == _V2_FAMILY_INET6:
        source = (str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        dest = (str(ipaddress.IPv6Address(block[16:32])), int.from_bytes(block[34:36], "big"))
        return total, ProxyHeader(source, dest, 2)
    return total, ProxyHeader(None, None, 2)  # UNSPEC or UNIX: no IP addresses (TLVs ignored)


def build_v1_header(source: Endpoint, destination: Endpoint) -> bytes:
    """A v1 header, for clients (the plaintext side of tests and ``ambientctl``)."""
    version = ipaddress.ip_address(source[0]).version
    if ipaddress.ip_address(destination[0]).version != version:
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    return (f"PROXY TCP{version} {source[0]} {destination[0]} "
            f"{source[1]} {destination[1]}\r\n").encode("ascii")


def build_v2_header(source: Endpoint, destination: Endpoint) -> bytes:
    """A v2 PROXY/STREAM header without TLVs."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    family = _V2_FAMILY_INET if src.version == 4 else _V2_FAMILY_INET6
    block = (src.packed + dst.packed + source[1].to_bytes(2, "big")
             + destination[1].to_bytes(2, "big"))
    return (V2_SIGNATURE + bytes([0x20 | _V2_COMMAND_PROXY, family << 4 | _V2_TRANSPORT_STREAM])
            + len(block).to_bytes(2, "big") + block)
