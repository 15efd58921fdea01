"""The mesh certificate authority: signs workload CSRs with SPIFFE identities.

Shaped after istiod's CA: a self-signed root (persisted so that restarts keep the trust
bundle) or Istio's plug-in certificate layout (``ca-cert.pem``, ``ca-key.pem``,
``root-cert.pem``, ``cert-chain.pem``). Everything here is synchronous and free of network
IO; only loading and saving the CA's own files touches the disk. What a CSR must be and who
may have it signed is ``csr.py``'s business; this module is the one concept "the CA's keys
and certificates, and the leaves they sign", whose loading checks (a plug-in chain must
lead to its root) take most of its length.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambient_api.identity import SpiffeId
from ambient_common.files import write_atomically
from istiod_lite.csr import CheckedCsr, CsrRejected

DEFAULT_TTL = timedelta(hours=24)
# Istio's MAX_WORKLOAD_CERT_TTL default.
DEFAULT_MAX_TTL = timedelta(days=90)
# Leaves start a little in the past so that a peer whose clock lags still accepts them.
CLOCK_SKEW = timedelta(seconds=60)
ROOT_LIFETIME = timedelta(days=3650)
ROOT_COMMON_NAME = "ambient-lite root CA"

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"

KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-4096"]
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], datetime]


class CaError(Exception):
    """Base class of everything the CA raises on purpose."""


class CaConfigError(CaError):
    """The CA's own certificates or key are missing, unreadable or inconsistent."""


def utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- helpers


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _distinct(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """Each certificate once (compared by DER), in first-seen order."""
    seen: set[bytes] = set()
    distinct: list[x509.Certificate] = []
    for cert in certs:
        der = _der(cert)
        if der not in seen:
            seen.add(der)
            distinct.append(cert)
    return distinct


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of certificates ``issuer`` signs: its SKI, else one derived from its key."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s subject and key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _new_private_key(key_type: KeyType) -> SigningKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa-4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise CaConfigError(f"unknown CA key type {key_type!r}")


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _random_serial() -> int:
    """A random, non-zero, positive 128-bit serial (RFC 5280 allows up to 20 octets)."""
    serial = 0
    while serial == 0:
        serial = secrets.randbits(128)
    return serial


def _read_file(path: Path) -> bytes | None:
    """A CA file's bytes, or None if it does not exist."""
    if not path.exists():
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaConfigError(f"{path}: cannot be read: {exc}") from None


def _parse_certs(data: bytes | None, where: str, *, required: bool) -> list[x509.Certificate]:
    """PEM certificates from a plug-in file (``where`` names it in errors); None = absent."""
    if data is None:
        if required:
            raise CaConfigError(f"{where}: missing")
        return []
    if not data.strip():
        if required:
            raise CaConfigError(f"{where}: empty, a PEM certificate is required")
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaConfigError(f"{where}: not PEM certificates: {exc}") from None


def _parse_key(data: bytes | None, where: str) -> SigningKey:
    """The unencrypted ECDSA or RSA signing key of a plug-in file; None = absent."""
    if data is None:
        raise CaConfigError(f"{where}: missing")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CaConfigError(
            f"{where}: the key is encrypted; an unencrypted key is required"
        ) from None
    except ValueError as exc:
        raise CaConfigError(f"{where}: not a PEM private key: {exc}") from None
    except Exception as exc:  # UnsupportedAlgorithm and friends
        raise CaConfigError(f"{where}: unsupported private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError(
            f"{where}: {type(key).__name__} keys are not supported; use ECDSA or RSA"
        )
    return key


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode("ascii", "replace") if isinstance(value, str) else value


def _subject_o(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


def new_self_signed_root(
    trust_domain: str, *, key_type: KeyType = "ecdsa-p256", now: Clock = utc_now
) -> tuple[x509.Certificate, SigningKey]:
    """A fresh root CA certificate and key for ``trust_domain`` (its subject O, as Istio's
    self-signed root), valid ten years."""
    key = _new_private_key(key_type)
    start = now() - CLOCK_SKEW
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME),
        ]
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(start)
        .not_valid_after(start + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return root, key


def self_signed_plugin_files(root: x509.Certificate, key: SigningKey) -> dict[str, str]:
    """A self-signed root in Istio's plug-in layout (what ``from_plugin_files`` reads back):
    the root signs, so it is the CA certificate, the chain and the root at once."""
    root_pem = _pem(root)
    return {
        CA_CERT_FILE: root_pem,
        CA_KEY_FILE: _key_pem(key),
        ROOT_CERT_FILE: root_pem,
        CERT_CHAIN_FILE: root_pem,
    }


# --------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """Signs workload certificates for one trust domain.

    ``signing_cert``/``signing_key`` sign leaves; ``intermediates`` are the certificates
    between the signing certificate and ``root`` (in order, upward); ``extra_roots`` join the
    trust bundle (root rotation, multi-cluster) without signing anything.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        root: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        extra_roots: Sequence[x509.Certificate] = (),
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
        now: Clock = utc_now,
    ) -> None:
        if default_ttl <= timedelta(0) or max_ttl <= timedelta(0):
            raise CaConfigError("default_ttl and max_ttl must be positive")
        if _spki(signing_key.public_key()) != _spki(signing_cert.public_key()):
            raise CaConfigError("the signing key does not match the signing certificate")
        self.trust_domain = trust_domain
        self.signing_cert = signing_cert
        self._signing_key = signing_key
        self.root = root
        self.intermediates = list(intermediates)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._now = now
        # What follows the leaf in every answer: signing cert (unless it is the root),
        # intermediates, root; each once.
        chain_tail = _distinct([signing_cert, *self.intermediates, root])
        self._chain_tail_pems = [_pem(cert) for cert in chain_tail]
        self._trust_bundle = [_pem(cert) for cert in _distinct([root, *extra_roots])]
        # Fixed for the CA's life, so computed once rather than per leaf.
        self._ca_expiry = min(cert.not_valid_after_utc for cert in chain_tail)
        self._issuer_key_id = _authority_key_identifier(signing_cert)

    # ------------------------------------------------------------------ construction

    @classmethod
    def self_signed(
        cls,
        trust_domain: str,
        state_dir: Path | None,
        *,
        key_type: KeyType = "ecdsa-p256",
        extra_roots: Sequence[x509.Certificate] = (),
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
        now: Clock = utc_now,
    ) -> CertificateAuthority:
        """A CA with its own root. With ``state_dir`` the root is saved in Istio's plug-in
        layout and reloaded on the next start, so workloads keep trusting each other."""
        if state_dir is not None and (state_dir / CA_CERT_FILE).exists():
            ca = cls.from_plugin_dir(
                state_dir,
                trust_domain=trust_domain,
                extra_roots=extra_roots,
                default_ttl=default_ttl,
                max_ttl=max_ttl,
                now=now,
            )
            ca.check_saved_root(f"{state_dir / ROOT_CERT_FILE}", f"remove {state_dir}")
            return ca

        root, key = new_self_signed_root(trust_domain, key_type=key_type, now=now)
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            files = self_signed_plugin_files(root, key)
            modes = {CA_KEY_FILE: 0o600, ROOT_CERT_FILE: 0o644, CERT_CHAIN_FILE: 0o644}
            for name, mode in modes.items():
                write_atomically(state_dir / name, files[name], mode)
            # Written last: its presence is what marks the directory as complete.
            write_atomically(state_dir / CA_CERT_FILE, files[CA_CERT_FILE], 0o644)
        return cls(
            trust_domain=trust_domain,
            signing_cert=root,
            signing_key=key,
            root=root,
            extra_roots=extra_roots,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            now=now,
        )

    def check_saved_root(self, where: str, remedy: str) -> None:
        """A root this CA generated and saved earlier must be for the configured trust domain
        (its subject O), else workloads of the new domain would be signed by the old root.
        Raises CaConfigError naming ``where`` and how to start over (``remedy``)."""
        organization = _subject_o(self.root)
        if organization != self.trust_domain:
            raise CaConfigError(
                f"{where}: the saved root is for trust domain {organization!r}, not "
                f"{self.trust_domain!r}; {remedy} to start over"
            )
    @classmethod
    def from_plugin_dir(
        cls,
        path: Path,
        *,
        trust_domain: str = "cluster.local",
        extra_roots: Sequence[x509.Certificate] = (),
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
        now: Clock = utc_now,
    ) -> CertificateAuthority:
        """Load Istio's plug-in CA files and check they form a usable CA (see
        ``from_plugin_files``). Raises CaConfigError naming the file at fault."""
        if not path.is_dir():
            raise CaConfigError(f"{path}: not a directory")
        files = {
            name: _read_file(path / name)
            for name in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE)
        }
        return cls.from_plugin_files(
            files,
            where=lambda name: str(path / name),
            trust_domain=trust_domain,
            extra_roots=extra_roots,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            now=now,
        )

    @classmethod
    def from_plugin_files(
        cls,
        files: Mapping[str, str | bytes | None],
        *,
        where: Callable[[str], str],
        trust_domain: str = "cluster.local",
        extra_roots: Sequence[x509.Certificate] = (),
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
        now: Clock = utc_now,
    ) -> CertificateAuthority:
        """Istio's plug-in layout from any store (a directory, a Kubernetes Secret): ``files``
        maps ``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem`` and optionally
        ``cert-chain.pem`` to their contents (absent or None = missing), ``where(name)`` says
        in errors where that file came from. Checks the key matches ``ca-cert.pem``, which is
        a CA certificate, and ``cert-chain.pem`` leads from it to a root in
        ``root-cert.pem``. Raises CaConfigError naming the file at fault."""
        cert_path = where(CA_CERT_FILE)
        key_path = where(CA_KEY_FILE)
        root_path = where(ROOT_CERT_FILE)
        chain_path = where(CERT_CHAIN_FILE)

        signing_certs = _parse_certs(
            _as_bytes(files.get(CA_CERT_FILE)), cert_path, required=True
        )
        if len(signing_certs) != 1:
            raise CaConfigError(
                f"{cert_path}: holds {len(signing_certs)} certificates; it must hold only the "
                f"signing certificate (put the rest of the chain in {CERT_CHAIN_FILE})"
            )
        signing_cert = signing_certs[0]
        key = _parse_key(_as_bytes(files.get(CA_KEY_FILE)), key_path)
        if _spki(key.public_key()) != _spki(signing_cert.public_key()):
            raise CaConfigError(f"{key_path}: the key does not match {cert_path}")
        if not _is_ca(signing_cert):
            raise CaConfigError(
                f"{cert_path}: not a CA certificate (needs basicConstraints CA:TRUE "
                "and keyCertSign)"
            )
        current = now()
        if signing_cert.not_valid_after_utc <= current:
            raise CaConfigError(
                f"{cert_path}: expired at {signing_cert.not_valid_after_utc.isoformat()}"
            )
        roots = _parse_certs(_as_bytes(files.get(ROOT_CERT_FILE)), root_path, required=True)
        root_ders = {_der(root) for root in roots}
        chain = [
            cert
            for cert in _parse_certs(
                _as_bytes(files.get(CERT_CHAIN_FILE)), chain_path, required=False
            )
            if _der(cert) != _der(signing_cert) and _der(cert) not in root_ders
        ]
        # Walk upward: signing cert -> chain... -> a root.
        path_certs = [signing_cert, *chain]
        for child, parent in zip(path_certs, path_certs[1:], strict=False):
            if not _is_ca(parent):
                raise CaConfigError(
                    f"{chain_path}: {parent.subject.rfc4514_string()} is not a CA certificate"
                )
            if not _issued_by(child, parent):
                raise CaConfigError(
                    f"{chain_path}: {child.subject.rfc4514_string()} is not signed by "
                    f"{parent.subject.rfc4514_string()} (the chain must go from "
                    f"{CA_CERT_FILE} up to the root, in order)"
                )
        top = path_certs[-1]
        if _der(top) in root_ders:
            root = top
            intermediates: list[x509.Certificate] = []
        else:
            issuers = [root for root in roots if _issued_by(top, root)]
            if not issuers:
                at_fault = chain_path if chain else cert_path
                raise CaConfigError(
                    f"{at_fault}: {top.subject.rfc4514_string()} does not chain to any root "
                    f"in {root_path}"
                )
            root = issuers[0]
            intermediates = chain
        return cls(
            trust_domain=trust_domain,
            signing_cert=signing_cert,
            signing_key=key,
            root=root,
            intermediates=intermediates,
            extra_roots=[*(r for r in roots if r is not root), *extra_roots],
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            now=now,
        )

    # ------------------------------------------------------------------ queries

    @property
    def trust_bundle(self) -> list[str]:
        """Root PEMs a peer must trust: this CA's root first, then the extra roots."""
        return list(self._trust_bundle)

    @property
    def chain_tail(self) -> list[str]:
        """What follows a leaf issued by this CA: intermediates then the root, as PEM."""
        return list(self._chain_tail_pems)

    def now(self) -> datetime:
        return self._now()

    # ------------------------------------------------------------------ signing

    def sign_csr(self, csr: CheckedCsr, ttl: timedelta | None = None) -> list[str]:
        """Sign a checked workload CSR. Returns PEMs leaf first, root last. Raises
        CsrRejected for an identity of another trust domain or a TTL that is not positive."""
        if csr.identity.trust_domain != self.trust_domain:
            raise CsrRejected(
                f"CSR identity {csr.identity} is in trust domain "
                f"{csr.identity.trust_domain!r}; this CA signs for {self.trust_domain!r}"
            )
        if ttl is not None and ttl <= timedelta(0):
            raise CsrRejected(f"requested TTL {ttl} is not positive")
        return self.issue_leaf(
            csr.public_key, [x509.UniformResourceIdentifier(str(csr.identity))], ttl=ttl
        )

    def issue_serving_certificate(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        spiffe_id: SpiffeId | None = None,
        *,
        ttl: timedelta | None = None,
    ) -> tuple[str, list[str]]:
        """A fresh P-256 key and certificate for istiod_lite's own TLS listener.
        Returns (key PEM, chain PEMs leaf first)."""
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        for address in ip_addresses:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                raise ValueError(f"not an IP address: {address!r}") from None
        if spiffe_id is not None:
            names.append(x509.UniformResourceIdentifier(str(spiffe_id)))
        if not names:
            raise ValueError("a serving certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        chain = self.issue_leaf(key.public_key(), names, ttl=ttl)
        return _key_pem(key), chain

    def issue_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        subject_alt_names: Sequence[x509.GeneralName],
        *,
        ttl: timedelta | None = None,
        not_before: datetime | None = None,
    ) -> list[str]:
        """Sign ``public_key`` with the given SANs, no CSR checks. Only for callers that built
        the names themselves (``sign_csr``, the serving certificate, test PKI helpers).

        ``not_before`` defaults to now minus the clock-skew allowance; the lifetime ``ttl``
        (default ``default_ttl``, capped by ``max_ttl`` and the CA's own expiry) counts from
        now, so a short TTL still yields a usable certificate.
        """
        if not subject_alt_names:
            raise ValueError("a leaf certificate needs at least one SAN")
        lifetime = min(ttl if ttl is not None else self.default_ttl, self.max_ttl)
        if not_before is None:
            now = self._now()
            start, natural_end = now - CLOCK_SKEW, now + lifetime
        else:
            start, natural_end = not_before, not_before + lifetime
        end = min(natural_end, self._ca_expiry)
        if end <= start:
            raise CaError(
                f"the CA certificate expires at {self._ca_expiry.isoformat()}; "
                "it cannot issue certificates any more"
            )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(start)
            .not_valid_after(end)
            # The subject is empty, so RFC 5280 requires the SAN extension to be critical.
            .add_extension(x509.SubjectAlternativeName(subject_alt_names), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._issuer_key_id, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._signing_key, hashes.SHA256())
        )
        return [_pem(leaf), *self._chain_tail_pems]
