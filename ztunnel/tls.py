"""Mutual-TLS contexts for HBONE and the SPIFFE identity checks that replace hostname checks.

Identity in the mesh is the one SPIFFE URI SAN of the peer's leaf certificate; DNS names play no
part, so hostname checking is off and callers verify the identity explicitly after the handshake.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from istiod_lite.api.identity import InvalidSpiffeId, SpiffeId

# Anything that exposes the negotiated TLS session (trio.SSLStream forwards to its SSLObject).
TlsConnection = ssl.SSLObject | ssl.SSLSocket | trio.SSLStream[Any]

ALPN_H2 = "h2"
# TLS 1.2 is only enabled behind an explicit flag; these are its AEAD ECDHE suites.
_TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:" \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"


class CertificateError(ValueError):
    """A certificate or key given to us is unusable; the message says why."""


class PeerIdentityError(Exception):
    """The TLS peer has no acceptable SPIFFE identity; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CertifiedKey:
    """A workload certificate chain (leaf first) with its private key and the leaf's facts."""

    identity: SpiffeId
    chain_pem: tuple[str, ...]
    key_pem: str
    not_before: datetime
    not_after: datetime
    serial: str

    @classmethod
    def from_pem(cls, chain: Sequence[str], key: str) -> CertifiedKey:
        """Build from PEM strings; raises CertificateError when the chain or key is unusable."""
        if not chain:
            raise CertificateError("certificate chain is empty")
        try:
            leaf = x509.load_pem_x509_certificate(chain[0].encode())
        except ValueError as exc:
            raise CertificateError(f"leaf certificate is not valid PEM: {exc}") from exc
        try:
            private_key = serialization.load_pem_private_key(key.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"private key is not valid unencrypted PEM: {exc}") from exc
        public_der = serialization.PublicFormat.SubjectPublicKeyInfo
        if private_key.public_key().public_bytes(
            serialization.Encoding.DER, public_der
        ) != leaf.public_key().public_bytes(serialization.Encoding.DER, public_der):
            raise CertificateError("private key does not match the leaf certificate")
        try:
            identity = certificate_identity(leaf)
        except PeerIdentityError as exc:
            raise CertificateError(f"leaf certificate: {exc.reason}") from exc
        return cls(
            identity=identity,
            chain_pem=tuple(chain),
            key_pem=key,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=format(leaf.serial_number, "x"),
        )


def certificate_identity(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of ``cert``; PeerIdentityError says what is wrong otherwise."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise PeerIdentityError("certificate has no subjectAltName extension") from None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise PeerIdentityError("certificate has no URI SAN")
    if len(uris) > 1:
        raise PeerIdentityError(f"certificate has {len(uris)} URI SANs, expected exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerIdentityError(f"URI SAN is not a SPIFFE id: {exc}") from exc


def peer_identity(ssl_object: TlsConnection) -> SpiffeId:
    """The verified peer's SPIFFE id (call after the handshake)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    return certificate_identity(x509.load_der_x509_certificate(der))


def verify_peer(ssl_object: TlsConnection, expected: SpiffeId) -> SpiffeId:
    """Check that the peer is exactly ``expected`` (the client's check of a server)."""
    actual = peer_identity(ssl_object)
    if actual != expected:
        raise PeerIdentityError(f"peer identity is {actual}, expected {expected}")
    return actual


def check_trust_domain(identity: SpiffeId, accepted_trust_domains: Collection[str]) -> None:
    """Servers accept clients only from their own (or explicitly federated) trust domains."""
    if identity.trust_domain not in accepted_trust_domains:
        accepted = ", ".join(sorted(accepted_trust_domains)) or "<none>"
        raise PeerIdentityError(
            f"peer trust domain {identity.trust_domain!r} is not accepted (accepted: {accepted})"
        )


def check_alpn(ssl_object: TlsConnection) -> None:
    """HBONE requires h2; a peer that did not negotiate it cannot speak the tunnel."""
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise PeerIdentityError(f"peer negotiated ALPN {selected!r}, HBONE needs 'h2'")


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed handshake (trio wraps ssl errors in BrokenResourceError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            if current.reason == "UNEXPECTED_EOF_WHILE_READING":
                return "peer closed the connection during TLS (it may have refused our certificate)"
            return f"TLS error: {current.reason or current}"
        if isinstance(current, PeerIdentityError):
            return current.reason
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def server_context(
    cert: CertifiedKey, trust_bundle: Sequence[str], *, allow_tls12: bool = False
) -> ssl.SSLContext:
    """Server side of HBONE: client certificates required and chained to ``trust_bundle``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, cert, trust_bundle, allow_tls12)
    return context


def client_context(
    cert: CertifiedKey, trust_bundle: Sequence[str], *, allow_tls12: bool = False
) -> ssl.SSLContext:
    """Client side of HBONE: the server identity is checked by verify_peer, not by hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    _configure(context, cert, trust_bundle, allow_tls12)
    return context


def _configure(
    context: ssl.SSLContext, cert: CertifiedKey, trust_bundle: Sequence[str], allow_tls12: bool
) -> None:
    if not trust_bundle:
        raise CertificateError("trust bundle is empty")
    context.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        context.set_ciphers(_TLS12_CIPHERS)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    try:
        context.load_verify_locations(cadata="\n".join(trust_bundle))
    except ssl.SSLError as exc:
        raise CertificateError(f"trust bundle is not valid PEM: {exc}") from exc
    with _private_pem_files(cert) as (chain_path, key_path):
        try:
            context.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise CertificateError(f"cannot load certificate chain and key: {exc}") from exc


@contextmanager
def _private_pem_files(cert: CertifiedKey) -> Iterator[tuple[str, str]]:
    """ssl only loads keys from files: write them 0600 in a 0700 temp dir, removed at once."""
    with tempfile.TemporaryDirectory(prefix="ztunnel-tls-") as directory:
        chain_path = os.path.join(directory, "chain.pem")
        key_path = os.path.join(directory, "key.pem")
        for path, text in ((chain_path, "".join(_ensure_newline(p) for p in cert.chain_pem)),
                           (key_path, cert.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        yield chain_path, key_path


def _ensure_newline(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


async def mutual_handshake(
    tls: trio.SSLStream[Any],
    timeout: float,
    check_peer: Callable[[TlsConnection], SpiffeId],
    what: str,
) -> SpiffeId:
    """Handshake, require ALPN h2, and check the peer's SPIFFE id with ``check_peer``.

    Every failure closes the stream and becomes PeerIdentityError with a one-line reason.
    """
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
        check_alpn(tls)
        return check_peer(tls)
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise PeerIdentityError(f"TLS handshake {what} took longer than {timeout}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(tls)
        raise PeerIdentityError(describe_tls_error(exc)) from exc
    except PeerIdentityError:
        await trio.aclose_forcefully(tls)
        raise
