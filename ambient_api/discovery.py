"""Messages of the workload-discovery stream and the certificate endpoint.

The transport is HTTP/2 over TLS to istiod_lite (default port 15012, as Istio's):

- ``POST /v1/discovery``: body is a ``DiscoveryRequest``; the response is a stream of
  newline-delimited JSON ``DeltaUpdate`` objects, kept open for as long as the client listens.
  The first update brings everything the client does not already have at the version it holds
  (delta xDS's ``initial_resource_versions``), later ones only what changed. A client whose
  ``Accept-Encoding`` allows ``deflate`` gets the stream as ``Content-Encoding: deflate``
  (each update decodable as soon as it arrives; see istiod_lite/deflate.py).
- ``POST /v1/discovery/ack``: body is an ``Ack``; answers 204. A NACK is an Ack with ``error``.
- ``POST /v1/certificate``: body is a ``CertificateRequest``; answers a ``CertificateResponse``
  (200) or an ``ErrorResponse`` (400 malformed CSR, 401 unauthenticated, 403 refused: a node
  may only obtain identities of service accounts with a pod on it, a waypoint only its own).

Every call carries ``authorization: Bearer <token>``: in the embedded mode a bootstrap token
bound to a node (ztunnel) or to a service account (waypoint, principal
``serviceaccount:<ns>/<sa>``); on Kubernetes a projected ServiceAccount token (TokenReview).
``DiscoveryRequest.node`` and ``Ack.node`` must name the caller's own principal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DISCOVERY_PATH = "/v1/discovery"
ACK_PATH = "/v1/discovery/ack"
CERTIFICATE_PATH = "/v1/certificate"
DEFAULT_DISCOVERY_PORT = 15012


@dataclass(frozen=True)
class DiscoveryRequest:
    node: str
    # resource key ("kind/name") -> version the client already holds.
    initial_resource_versions: dict[str, str] = field(default_factory=dict)
    # The kinds to receive (see kinds.py); empty means the L4 kinds a ztunnel needs.
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourceUpdate:
    kind: str  # a name from kinds.KIND_BY_TYPE ("workload", "service", ..., "httproute", ...)
    name: str  # the resource's key, see model.resource_key
    version: str
    resource: dict[str, Any]  # codec.to_jsonable(model object)


@dataclass(frozen=True)
class ResourceRemoval:
    kind: str
    name: str


@dataclass(frozen=True)
class DeltaUpdate:
    nonce: str
    system_version: int
    resources: tuple[ResourceUpdate, ...] = ()
    removed: tuple[ResourceRemoval, ...] = ()


@dataclass(frozen=True)
class Ack:
    node: str
    nonce: str
    error: str | None = None  # set for a NACK: why the update could not be applied


@dataclass(frozen=True)
class CertificateRequest:
    csr: str  # PEM PKCS#10, one URI SAN (the SPIFFE id), ECDSA P-256
    ttl_seconds: int | None = None  # a wish; the CA caps it at its configured maximum


@dataclass(frozen=True)
class CertificateResponse:
    cert_chain: tuple[str, ...]  # PEM, leaf first, root last
    trust_bundle: tuple[str, ...]  # PEM roots the mesh trusts


@dataclass(frozen=True)
class ErrorResponse:
    error: str


def versioned_key(kind: str, name: str) -> str:
    """The key used in ``initial_resource_versions``."""
    return f"{kind}/{name}"
