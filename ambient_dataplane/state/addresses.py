"""Addresses and identities of workloads as the proxies compare and dial them: one canonical
spelling of an IP address (the indexes' key), a workload's SPIFFE identity, its address to
connect to and whether it speaks HBONE.
"""

from __future__ import annotations

import functools
import ipaddress

from ambient_api.identity import SpiffeId
from ambient_api.model import (
    TunnelProtocol,
    Workload,
)


# Memoized: every connection looks up a few addresses, and parsing them with ipaddress was
# ~2.6% of a ztunnel's CPU under connection churn; the same few thousand pod and node
# addresses come back again and again (bounded, so junk input cannot grow it).
@functools.lru_cache(maxsize=8192)
def canonical_ip(value: str) -> str | None:
    """The one spelling of an address used as index key (IPv4-mapped IPv6, as dual-stack
    sockets report peers, counts as IPv4); None when ``value`` is not an IP address."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def identity_of(workload: Workload) -> SpiffeId:
    return SpiffeId(workload.trust_domain, workload.namespace, workload.service_account)


def address_of(workload: Workload) -> str:
    """The address to connect to a workload on (its first, canonical)."""
    return canonical_ip(workload.addresses[0]) or workload.addresses[0]


def is_hbone(workload: Workload) -> bool:
    return workload.tunnel_protocol is TunnelProtocol.HBONE
