"""Test-only PKI: mesh certificates on demand, without running istiod_lite.

    pki = TestPki()                                  # trust domain cluster.local, fresh root
    client = pki.issue("default", "sleep")           # IssuedCert, P-256, 1 h
    stale = pki.issue_expired("default", "sleep")    # expired an hour ago
    odd = pki.issue_with_uri("spiffe://evil.example/ns/a/sa/b")  # no CSR checks
    other = pki.foreign_pki()                        # same trust domain, unrelated root
    cert_path, key_path, ca_path = write_pem_files(tmp_path, client)   # for Envoy & co.

Certificates come from the real ``istiod_lite.ca.CertificateAuthority`` so they look exactly
like the ones the mesh hands out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ambient_api.identity import InvalidSpiffeId, SpiffeId
from istiod_lite.ca import CertificateAuthority, utc_now
from istiod_lite.csr import check_csr

# Generous so tests may ask for long-lived certificates; the mesh default stays 90 days.
_TEST_MAX_TTL = timedelta(days=3650)


@dataclass(frozen=True)
class IssuedCert:
    """A key and its certificate chain (leaf first, root last).

    ``identity`` is the SPIFFE id in the URI SAN; it is None only for ``issue_with_uri``
    with a URI that is not a SPIFFE id.
    """

    identity: SpiffeId | None
    key_pem: str
    chain_pem: list[str]
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        """The leaf alone."""
        return self.chain_pem[0]

    @property
    def root_pem(self) -> str:
        return self.chain_pem[-1]

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def new_key_and_csr(uri: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key and a CSR carrying ``uri`` as its only SAN and no subject, as ztunnel
    sends them."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


class TestPki:
    """A throwaway mesh CA for one test (or one module)."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        trust_domain: str = "cluster.local",
        *,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.trust_domain = trust_domain
        self._now = now
        self.ca = CertificateAuthority.self_signed(
            trust_domain, None, max_ttl=_TEST_MAX_TTL, now=now
        )

    @property
    def trust_bundle(self) -> list[str]:
        return self.ca.trust_bundle

    @property
    def root_pem(self) -> str:
        return self.ca.trust_bundle[0]

    def identity(self, namespace: str, service_account: str) -> SpiffeId:
        return SpiffeId(self.trust_domain, namespace, service_account)

    def issue(
        self,
        namespace: str,
        service_account: str,
        *,
        ttl: timedelta = timedelta(hours=1),
        not_before: datetime | None = None,
    ) -> IssuedCert:
        """A workload certificate for spiffe://<td>/ns/<namespace>/sa/<service_account>,
        made through a real CSR (so the CA's CSR checks run too)."""
        identity = self.identity(namespace, service_account)
        key, csr_pem = new_key_and_csr(str(identity))
        if not_before is None:
            chain = self.ca.sign_csr(check_csr(csr_pem), ttl)
        else:
            checked = check_csr(csr_pem).identity
            chain = self.ca.issue_leaf(
                key.public_key(),
                [x509.UniformResourceIdentifier(str(checked))],
                ttl=ttl,
                not_before=not_before,
            )
        return self._issued(identity, key, chain)

    def issue_expired(
        self,
        namespace: str,
        service_account: str,
        *,
        expired_ago: timedelta = timedelta(hours=1),
        ttl: timedelta = timedelta(hours=1),
    ) -> IssuedCert:
        """A certificate whose validity ended ``expired_ago`` before now."""
        not_before = self._now() - expired_ago - ttl
        return self.issue(namespace, service_account, ttl=ttl, not_before=not_before)

    def issue_with_uri(
        self,
        uri: str,
        *,
        ttl: timedelta = timedelta(hours=1),
        not_before: datetime | None = None,
    ) -> IssuedCert:
        """A certificate with an arbitrary URI SAN (wrong trust domain, not SPIFFE at all...),
        bypassing the CSR checks, for tests of peers that must refuse it."""
        key = ec.generate_private_key(ec.SECP256R1())
        chain = self.ca.issue_leaf(
            key.public_key(),
            [x509.UniformResourceIdentifier(uri)],
            ttl=ttl,
            not_before=not_before,
        )
        try:
            identity: SpiffeId | None = SpiffeId.parse(uri)
        except InvalidSpiffeId:
            identity = None
        return self._issued(identity, key, chain)

    def foreign_pki(self) -> TestPki:
        """An unrelated CA for the same trust domain: its certificates must not be trusted."""
        return TestPki(self.trust_domain, now=self._now)

    @staticmethod
    def _issued(
        identity: SpiffeId | None, key: ec.EllipticCurvePrivateKey, chain: list[str]
    ) -> IssuedCert:
        return IssuedCert(
            identity=identity,
            key_pem=_key_pem(key),
            chain_pem=chain,
            cert=x509.load_pem_x509_certificate(chain[0].encode("ascii")),
        )


def foreign_pki(trust_domain: str = "cluster.local") -> TestPki:
    """Another independent TestPki (a different root)."""
    return TestPki(trust_domain)


def write_pem_files(
    directory: Path, issued: IssuedCert, *, name: str = "workload"
) -> tuple[Path, Path, Path]:
    """Write ``<name>-cert.pem`` (the chain, leaf first), ``<name>-key.pem`` (0600) and
    ``<name>-ca.pem`` (the issuing root) for tools that want files, e.g. Envoy.
    Returns (cert_path, key_path, ca_path)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}-cert.pem"
    key_path = directory / f"{name}-key.pem"
    ca_path = directory / f"{name}-ca.pem"
    cert_path.write_text("".join(issued.chain_pem), encoding="ascii")
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_text(issued.key_pem, encoding="ascii")
    ca_path.write_text(issued.root_pem, encoding="ascii")
    return cert_path, key_path, ca_path
