"""The value matchers both policy engines share: Istio's string patterns, IP/CIDR and port lists.

ztunnel's L4 authorization and the waypoint's L7 authorization evaluate the same kinds of
fields (principals, namespaces, addresses, ports) with the same semantics: a field's values are
OR'd, a ``not_`` list excludes on any match, and an empty list constrains nothing. Keeping the
matchers in one place keeps the two engines from drifting apart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def string_matches(pattern: str, value: str) -> bool:
    """Istio string matching: exact, ``prefix*``, ``*suffix``, or ``*`` (any non-empty)."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def strings_match(values: Sequence[str], not_values: Sequence[str], actual: str | None) -> bool:
    if values and (actual is None or not any(string_matches(v, actual) for v in values)):
        return False
    return not (actual is not None and any(string_matches(v, actual) for v in not_values))


def ips_match(values: Sequence[str], not_values: Sequence[str], actual: IpAddress | None) -> bool:
    if values and (actual is None or not any(_ip_in(v, actual) for v in values)):
        return False
    return not (actual is not None and any(_ip_in(v, actual) for v in not_values))


def ports_match(values: Sequence[int], not_values: Sequence[int], actual: int) -> bool:
    if values and actual not in values:
        return False
    return actual not in not_values


def _ip_in(entry: str, address: IpAddress) -> bool:
    network = _parse_network(entry)
    return network is not None and address in network


@lru_cache(maxsize=4096)
def _parse_network(entry: str) -> IpNetwork | None:
    """An address or CIDR from a policy; None (never matches) when it is not valid."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def parse_ip(value: str) -> IpAddress | None:
    """The connection's address; IPv4-mapped IPv6 (dual-stack sockets) counts as IPv4.
    Cached: the same few peer and pod addresses come back on every connection."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
