"""What a workload's CSR must be, and who may have it signed.

``check_csr`` parses a CSR once and checks it the way istiod does; the caller's
authorization (``authorize_node`` for a node's ztunnel, ``authorize_service_account`` for a
waypoint) then decides on its identity, and ``CertificateAuthority.sign_csr`` signs the
checked CSR's key. Rejections say why, in words sent back to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ambient_api.identity import InvalidSpiffeId, SpiffeId
from ambient_api.model import Workload


class CsrRejected(Exception):
    """A certificate signing request was refused; ``reason`` says why (sent to the caller)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CsrAuthorizationError(Exception):
    """The caller may not obtain the identity its CSR asks for (answered 403)."""


class NodeAuthorizationError(CsrAuthorizationError):
    """A node asked for an identity that has no workload on that node."""


class IdentityAuthorizationError(CsrAuthorizationError):
    """A caller authenticated as a service account asked for another identity."""


# --------------------------------------------------------------------------- CSR checks


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed ``check_csr``: parsed once, then authorized and signed as is."""

    identity: SpiffeId
    public_key: ec.EllipticCurvePublicKey


def _load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrRejected(f"not a PEM certificate signing request: {exc}") from None


def check_csr(csr_pem: str | bytes) -> CheckedCsr:
    """The CSR's identity and key, after checking it the way istiod does: valid signature,
    ECDSA P-256 key, no CN, exactly one SAN which is a SPIFFE URI. Raises CsrRejected.
    (Whether this CA signs that identity's trust domain is ``sign_csr``'s check.)"""
    csr = _load_csr(csr_pem)
    try:
        signature_ok = csr.is_signature_valid
    except Exception as exc:  # unsupported algorithms surface here
        raise CsrRejected(f"CSR signature cannot be checked: {exc}") from None
    if not signature_ok:
        raise CsrRejected("CSR signature is invalid")

    try:
        public_key = csr.public_key()
    except Exception as exc:
        raise CsrRejected(f"CSR public key cannot be read: {exc}") from None
    if isinstance(public_key, rsa.RSAPublicKey):
        raise CsrRejected(f"CSR key is RSA-{public_key.key_size}; ECDSA P-256 is required")
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrRejected(f"CSR key is {type(public_key).__name__}; ECDSA P-256 is required")
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise CsrRejected(
            f"CSR key is ECDSA on curve {public_key.curve.name}; ECDSA P-256 is required"
        )

    if csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise CsrRejected("CSR subject has a common name (CN); the identity goes in a URI SAN only")

    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("CSR has no subjectAltName; one SPIFFE URI SAN is required") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise CsrRejected(f"CSR extensions cannot be parsed: {exc}") from None

    for name in san:
        if isinstance(name, x509.DNSName):
            raise CsrRejected(f"CSR has a DNS SAN {name.value!r}; only a SPIFFE URI SAN is allowed")
        if isinstance(name, x509.IPAddress):
            raise CsrRejected(f"CSR has an IP SAN {name.value}; only a SPIFFE URI SAN is allowed")
        if isinstance(name, x509.RFC822Name):
            raise CsrRejected(
                f"CSR has an email SAN {name.value!r}; only a SPIFFE URI SAN is allowed"
            )
        if not isinstance(name, x509.UniformResourceIdentifier):
            raise CsrRejected(
                f"CSR has a {type(name).__name__} SAN; only a SPIFFE URI SAN is allowed"
            )
    if len(san) != 1:
        raise CsrRejected(f"CSR has {len(san)} SANs; exactly one SPIFFE URI SAN is required")
    uri = san[0].value
    try:
        identity = SpiffeId.parse(uri)
    except InvalidSpiffeId as exc:
        raise CsrRejected(f"CSR URI SAN is not a SPIFFE id: {exc}") from None
    return CheckedCsr(identity, public_key)


# --------------------------------------------------------------------------- caller authorization


def authorize_node(node: str, identity: SpiffeId, workloads: Iterable[Workload]) -> None:
    """Let a node's ztunnel obtain ``identity`` only if a workload running as it is scheduled
    on that node, so one compromised node cannot impersonate the whole mesh."""
    if node:
        for workload in workloads:
            if (
                workload.node == node
                and workload.namespace == identity.namespace
                and workload.service_account == identity.service_account
                and workload.trust_domain == identity.trust_domain
            ):
                return
    raise NodeAuthorizationError(
        f"no instances of {identity.namespace}/{identity.service_account} on node {node}"
    )


def authorize_service_account(caller: SpiffeId, identity: SpiffeId) -> None:
    """Let a caller authenticated as a service account (a waypoint) obtain only its own
    identity: its token proves who it is, not where anything else runs."""
    if identity != caller:
        raise IdentityAuthorizationError(
            f"caller {caller} may only obtain its own identity, not {identity}"
        )
