"""TLS contexts and SPIFFE identity extraction (no sockets)."""

from __future__ import annotations

import os
import ssl
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ambient_api.identity import SpiffeId
from ambient_dataplane.tls import (
    CertificateError,
    CertifiedKey,
    PeerIdentityError,
    certificate_identity,
    check_trust_domain,
    client_context,
    describe_tls_error,
    server_context,
)
from tests.pki import TestPki


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki()


def test_certified_key_from_pem(pki: TestPki) -> None:
    issued = pki.issue("default", "sleep")
    cert = CertifiedKey.from_pem(issued.chain_pem, issued.key_pem)
    assert cert.identity == SpiffeId("cluster.local", "default", "sleep")
    assert cert.chain_pem == tuple(issued.chain_pem)
    assert cert.not_before == issued.not_before
    assert cert.not_after == issued.not_after
    assert int(cert.serial, 16) == issued.serial


def test_certified_key_rejects_unusable_input(pki: TestPki) -> None:
    issued = pki.issue("default", "sleep")
    other = pki.issue("default", "other")
    with pytest.raises(CertificateError, match="does not match"):
        CertifiedKey.from_pem(issued.chain_pem, other.key_pem)
    with pytest.raises(CertificateError, match="empty"):
        CertifiedKey.from_pem([], issued.key_pem)
    with pytest.raises(CertificateError, match="not valid PEM"):
        CertifiedKey.from_pem(["junk"], issued.key_pem)
    odd = pki.issue_with_uri("https://example.com/")
    with pytest.raises(CertificateError, match="not a SPIFFE id"):
        CertifiedKey.from_pem(odd.chain_pem, odd.key_pem)


def _leaf(pki: TestPki, names: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = pki.ca.issue_leaf(key.public_key(), names)
    return x509.load_pem_x509_certificate(chain[0].encode())


def test_certificate_identity_reasons(pki: TestPki) -> None:
    uri = x509.UniformResourceIdentifier
    assert certificate_identity(_leaf(pki, [uri("spiffe://cluster.local/ns/a/sa/b")])) == (
        SpiffeId("cluster.local", "a", "b")
    )
    with pytest.raises(PeerIdentityError, match="no URI SAN"):
        certificate_identity(_leaf(pki, [x509.DNSName("a.example")]))
    with pytest.raises(PeerIdentityError, match="2 URI SANs"):
        certificate_identity(_leaf(pki, [uri("spiffe://cluster.local/ns/a/sa/b"),
                                         uri("spiffe://cluster.local/ns/a/sa/c")]))
    with pytest.raises(PeerIdentityError, match="not a SPIFFE id"):
        certificate_identity(_leaf(pki, [uri("spiffe://cluster.local/a/b")]))


def test_trust_domain_check() -> None:
    identity = SpiffeId("other.example", "a", "b")
    check_trust_domain(identity, {"other.example", "cluster.local"})
    with pytest.raises(PeerIdentityError, match="'other.example' is not accepted"):
        check_trust_domain(identity, {"cluster.local"})


def test_contexts_are_tls13_mutual_h2_without_hostname_check(pki: TestPki) -> None:
    issued = pki.issue("default", "sleep")
    cert = CertifiedKey.from_pem(issued.chain_pem, issued.key_pem)
    before = set(os.listdir(tempfile.gettempdir()))
    for context in (server_context(cert, pki.trust_bundle), client_context(cert, pki.trust_bundle)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is False
        assert len(context.get_ca_certs()) == 1
    legacy = client_context(cert, pki.trust_bundle, allow_tls12=True)
    assert legacy.minimum_version == ssl.TLSVersion.TLSv1_2
    leftovers = {n for n in set(os.listdir(tempfile.gettempdir())) - before
                 if n.startswith("ztunnel-tls-")}
    assert leftovers == set()  # private key files never outlive the context creation


def test_contexts_reject_bad_bundles(pki: TestPki) -> None:
    issued = pki.issue("default", "sleep")
    cert = CertifiedKey.from_pem(issued.chain_pem, issued.key_pem)
    with pytest.raises(CertificateError, match="trust bundle is empty"):
        server_context(cert, [])
    with pytest.raises(CertificateError, match="trust bundle"):
        client_context(cert, ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])


def test_describe_tls_error_follows_the_cause_chain() -> None:
    inner = ssl.SSLCertVerificationError(1, "verify failed")
    inner.verify_message = "certificate has expired"
    outer = RuntimeError("wrapped")
    outer.__cause__ = inner
    assert describe_tls_error(outer) == "certificate verification failed: certificate has expired"
    assert describe_tls_error(ValueError("plain")) == "ValueError: plain"
