"""What a request's headers may say about who sent it, once it has passed the waypoint.

Sans-IO: ``sanitize_request_headers`` takes the headers a client sent and the peer the
waypoint authenticated (``TunnelPeer``) and returns the headers the rest of the waypoint, and
then the backend, see. The downstream is any workload of the mesh, so nothing it writes about
identity or about a proxy's doings is believed. Each rule is the treatment Istio's waypoint
(Envoy's HTTP connection manager, as istiod configures it) gives such a request:

- ``x-forwarded-client-cert``: Envoy's ``SANITIZE_SET`` with Subject, URI and DNS details.
  Whatever the client sent is dropped and one entry describes the authenticated peer:
  ``By=<waypoint's SPIFFE id>;Hash=<hex SHA-256 of the peer's certificate>;Subject="";
  URI=<peer's SPIFFE id>`` (``Hash`` only when the digest is known; ``Subject`` is empty
  because mesh certificates have an empty subject, Envoy still writes the key). A peer without
  a verified identity gets no entry at all, as Envoy removes the header on a connection
  without a client certificate.
- ``x-forwarded-for``: the peer's address is appended (repeated headers joined with ``,``
  first, then ``,<peer>``; nothing is added without a known address): Envoy's
  ``use_remote_address`` with ``xff_num_trusted_hops: 0``. Whatever a client writes stays to
  the left; the right-most entry is always the peer the waypoint saw. (Istio's own waypoint
  leaves the header as received; ambient-lite has always recorded the tunnel peer and keeps
  doing so.)
- ``x-envoy-*``: every one the client sent is dropped. Envoy strips its internal headers
  (retry and timeout knobs, ``x-envoy-internal``, ``x-envoy-decorator-operation``,
  ``x-envoy-original-url`` ...) from a request that is not from a trusted internal address;
  the rest (``x-envoy-original-path``, ``x-envoy-peer-metadata``, ``x-envoy-peer-metadata-id``
  ...) are claims only a proxy makes about a request, and this waypoint acts on none of them,
  so passing one on would only let a client speak for a proxy to whatever reads it next.
- ``x-request-id``: kept when the client sent one, a fresh UUID4 otherwise (Envoy's
  ``generate_request_id``; not overwritten, as for a request that is not an edge request).
- ``x-forwarded-proto``: kept when present, else ``http`` (the scheme of the HTTP connection
  inside the tunnel), as Envoy sets it when absent.

Everything else passes unchanged and in order; the added headers come last.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from ambient_api.identity import SpiffeId

FORWARDED_CLIENT_CERT = "x-forwarded-client-cert"
FORWARDED_FOR = "x-forwarded-for"
FORWARDED_PROTO = "x-forwarded-proto"
REQUEST_ID = "x-request-id"
_PROXY_HEADER_PREFIX = "x-envoy-"


@dataclass(frozen=True)
class TunnelPeer:
    """The peer of the HBONE tunnel a request arrived in, as the mTLS handshake proved it."""

    address: str  # the peer's IP, as the waypoint's socket saw it
    identity: SpiffeId | None  # the peer certificate's SPIFFE id; None: not verified
    certificate_sha256: str | None = None  # lower-case hex of the peer certificate's DER


@lru_cache(maxsize=4096)  # the same few (waypoint, peer) pairs, request after request
def client_cert_entry(waypoint: SpiffeId, peer: TunnelPeer) -> str | None:
    """The one XFCC entry that describes ``peer`` (Envoy's field order), or None when the
    peer has no verified identity."""
    if peer.identity is None:
        return None
    fields = [f"By={waypoint}"]
    if peer.certificate_sha256:
        fields.append(f"Hash={peer.certificate_sha256}")
    fields += ['Subject=""', f"URI={peer.identity}"]
    return ";".join(fields)


def sanitize_request_headers(
    headers: Iterable[tuple[str, str]],
    peer: TunnelPeer,
    *,
    waypoint: SpiffeId,
    new_request_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> tuple[tuple[str, str], ...]:
    """The client's (lower-case named) headers as the waypoint forwards them; the rules are
    the module's. ``new_request_id`` is only called when the client sent no x-request-id."""
    kept: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for name, value in headers:
        if name == FORWARDED_FOR:
            forwarded_for.append(value)
        elif name != FORWARDED_CLIENT_CERT and not name.startswith(_PROXY_HEADER_PREFIX):
            kept.append((name, value))
    present = {name for name, _ in kept}
    if peer.address:
        forwarded_for.append(peer.address)
    added = [(FORWARDED_FOR, ",".join(forwarded_for))] if forwarded_for else []
    if (entry := client_cert_entry(waypoint, peer)) is not None:
        added.append((FORWARDED_CLIENT_CERT, entry))
    if FORWARDED_PROTO not in present:
        added.append((FORWARDED_PROTO, "http"))
    if REQUEST_ID not in present:
        added.append((REQUEST_ID, new_request_id()))
    return (*kept, *added)
