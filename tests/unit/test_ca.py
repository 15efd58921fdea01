"""The mesh CA: roots, plug-in certificates, CSR checks, leaf shape."""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ambient_api.identity import SpiffeId
from istiod_lite.ca import CaConfigError, CaError, CertificateAuthority
from istiod_lite.csr import CsrRejected, check_csr
from tests.pki import TestPki, foreign_pki, new_key_and_csr, write_pem_files

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"


def fixed_clock() -> datetime:
    return NOW


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def verify_client(chain: Sequence[str], roots: Sequence[str], at: datetime = NOW) -> None:
    """Verify a leaf-first chain with cryptography's web-PKI-style client verifier."""
    store = Store([load(root) for root in roots])
    verifier = PolicyBuilder().store(store).time(at).build_client_verifier()
    verifier.verify(load(chain[0]), [load(pem) for pem in chain[1:]])


def build_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    sans: Sequence[x509.GeneralName] | None,
    common_name: str | None = None,
) -> str:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.self_signed("cluster.local", None, now=fixed_clock)


# --------------------------------------------------------------------------- plug-in helpers


def make_ca_cert(
    subject_cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = True,
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


class PluginFiles:
    """A root and an intermediate written in Istio's plug-in layout."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.root_key = p256()
        self.root = make_ca_cert("Root CA", self.root_key, None)
        self.intermediate_key = p256()
        self.intermediate = make_ca_cert(
            "Intermediate CA", self.intermediate_key, (self.root, self.root_key)
        )
        directory.mkdir(exist_ok=True)
        self.write(
            ca_cert=pem(self.intermediate),
            ca_key=key_pem(self.intermediate_key),
            root_cert=pem(self.root),
            # What Istio's docs produce: cat ca-cert.pem root-cert.pem > cert-chain.pem
            cert_chain=pem(self.intermediate, self.root),
        )

    def write(
        self,
        *,
        ca_cert: str | None = None,
        ca_key: str | None = None,
        root_cert: str | None = None,
        cert_chain: str | None = None,
    ) -> None:
        for name, content in [
            ("ca-cert.pem", ca_cert),
            ("ca-key.pem", ca_key),
            ("root-cert.pem", root_cert),
            ("cert-chain.pem", cert_chain),
        ]:
            if content is not None:
                (self.dir / name).write_text(content)

    def load(self) -> CertificateAuthority:
        return CertificateAuthority.from_plugin_dir(self.dir, now=fixed_clock)


# --------------------------------------------------------------------------- self-signed root


def test_self_signed_root_shape(ca: CertificateAuthority) -> None:
    root = load(ca.trust_bundle[0])
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "ambient-lite root CA"
    )
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert lifetime == timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert ca.trust_bundle == [pem(root)]


def test_self_signed_persists_and_reloads_the_same_root(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    first = CertificateAuthority.self_signed("cluster.local", state, now=fixed_clock)
    files = {p.name for p in state.iterdir()}
    assert files == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600

    second = CertificateAuthority.self_signed("cluster.local", state, now=fixed_clock)
    assert second.trust_bundle == first.trust_bundle
    # The reloaded CA signs with the same key: its leaves verify against the first root.
    _, csr = new_key_and_csr(SLEEP)
    verify_client(second.sign_csr(check_csr(csr)), first.trust_bundle)
    assert second.sign_csr(check_csr(csr))[-1] == first.trust_bundle[0]


def test_self_signed_without_state_dir_makes_a_new_root_each_time() -> None:
    one = CertificateAuthority.self_signed("cluster.local", None, now=fixed_clock)
    two = CertificateAuthority.self_signed("cluster.local", None, now=fixed_clock)
    assert one.trust_bundle != two.trust_bundle


def test_self_signed_refuses_a_saved_root_of_another_trust_domain(tmp_path: Path) -> None:
    CertificateAuthority.self_signed("cluster.local", tmp_path, now=fixed_clock)
    with pytest.raises(CaConfigError, match="trust domain 'cluster.local', not 'other.td'"):
        CertificateAuthority.self_signed("other.td", tmp_path, now=fixed_clock)


def test_self_signed_rsa_root_signs_valid_leaves() -> None:
    ca = CertificateAuthority.self_signed(
        "cluster.local", None, key_type="rsa-2048", now=fixed_clock
    )
    _, csr = new_key_and_csr(SLEEP)
    chain = ca.sign_csr(check_csr(csr))
    assert isinstance(load(chain[-1]).public_key(), rsa.RSAPublicKey)
    verify_client(chain, ca.trust_bundle)


# --------------------------------------------------------------------------- plug-in layout


def test_plugin_with_intermediate_chains_leaf_intermediate_root(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path / "cacerts")
    ca = files.load()
    _, csr = new_key_and_csr(SLEEP)
    chain = ca.sign_csr(check_csr(csr))
    assert [load(c) for c in chain[1:]] == [files.intermediate, files.root]
    assert load(chain[0]).issuer == files.intermediate.subject
    assert ca.trust_bundle == [pem(files.root)]
    verify_client(chain, ca.trust_bundle)
    # Without the intermediate in hand a verifier cannot reach the root.
    with pytest.raises(VerificationError):
        verify_client(chain[:1], ca.trust_bundle)


def test_plugin_cert_chain_may_be_absent_or_hold_only_the_intermediate(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    (tmp_path / "cert-chain.pem").unlink()
    _, csr = new_key_and_csr(SLEEP)
    chain = files.load().sign_csr(check_csr(csr))
    assert [load(c) for c in chain[1:]] == [files.intermediate, files.root]

    files.write(cert_chain=pem(files.intermediate))
    chain = files.load().sign_csr(check_csr(csr))
    assert [load(c) for c in chain[1:]] == [files.intermediate, files.root]


def test_plugin_with_two_intermediates(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    issuing_key = p256()
    issuing = make_ca_cert("Issuing CA", issuing_key, (files.intermediate, files.intermediate_key))
    files.write(
        ca_cert=pem(issuing),
        ca_key=key_pem(issuing_key),
        cert_chain=pem(issuing, files.intermediate, files.root),
    )
    _, csr = new_key_and_csr(SLEEP)
    chain = files.load().sign_csr(check_csr(csr))
    assert [load(c) for c in chain[1:]] == [issuing, files.intermediate, files.root]
    verify_client(chain, [pem(files.root)])


def test_plugin_self_signed_root_with_empty_chain(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    files.write(ca_cert=pem(files.root), ca_key=key_pem(files.root_key), cert_chain="")
    _, csr = new_key_and_csr(SLEEP)
    chain = files.load().sign_csr(check_csr(csr))
    assert [load(c) for c in chain[1:]] == [files.root]
    verify_client(chain, [pem(files.root)])


def test_plugin_root_file_with_two_roots_trusts_both(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    new_root = make_ca_cert("Next Root", p256(), None)
    files.write(root_cert=pem(new_root, files.root))
    ca = files.load()
    assert ca.trust_bundle == [pem(files.root), pem(new_root)]
    _, csr = new_key_and_csr(SLEEP)
    assert load(ca.sign_csr(check_csr(csr))[-1]) == files.root


def test_plugin_key_mismatch_names_the_key_file(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    files.write(ca_key=key_pem(p256()))
    with pytest.raises(CaConfigError, match=r"ca-key\.pem: the key does not match .*ca-cert\.pem"):
        files.load()


def test_plugin_signing_cert_must_be_a_ca(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    leaf_key = p256()
    leaf = make_ca_cert("not a CA", leaf_key, (files.root, files.root_key), ca=False)
    files.write(ca_cert=pem(leaf), ca_key=key_pem(leaf_key), cert_chain="")
    with pytest.raises(CaConfigError, match=r"ca-cert\.pem: not a CA certificate"):
        files.load()


def test_plugin_chain_to_an_unknown_root_is_refused(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    files.write(root_cert=pem(make_ca_cert("Other Root", p256(), None)))
    with pytest.raises(CaConfigError, match=r"does not chain to any root in .*root-cert\.pem"):
        files.load()


def test_plugin_chain_out_of_order_is_refused(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    stranger = make_ca_cert("Stranger CA", p256(), None)
    files.write(cert_chain=pem(stranger))
    with pytest.raises(CaConfigError, match=r"cert-chain\.pem: .*Intermediate CA.* is not signed"):
        files.load()


def test_plugin_missing_and_garbage_files_are_named(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    (tmp_path / "root-cert.pem").unlink()
    with pytest.raises(CaConfigError, match=r"root-cert\.pem: missing"):
        files.load()
    files.write(root_cert=pem(files.root), ca_cert="-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(CaConfigError, match=r"ca-cert\.pem: not PEM certificates"):
        files.load()
    files.write(ca_cert=pem(files.intermediate), ca_key="nonsense")
    with pytest.raises(CaConfigError, match=r"ca-key\.pem: not a PEM private key"):
        files.load()
    with pytest.raises(CaConfigError, match="not a directory"):
        CertificateAuthority.from_plugin_dir(tmp_path / "nope")


def test_plugin_expired_signing_cert_is_refused(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    expired = make_ca_cert(
        "Old CA",
        files.intermediate_key,
        (files.root, files.root_key),
        not_after=NOW - timedelta(seconds=1),
    )
    files.write(ca_cert=pem(expired), cert_chain="")
    with pytest.raises(CaConfigError, match=r"ca-cert\.pem: expired at"):
        files.load()


# --------------------------------------------------------------------------- CSR checks


def test_check_csr_accepts_istio_style_csr() -> None:
    _, csr = new_key_and_csr(SLEEP)
    assert check_csr(csr).identity == SpiffeId("cluster.local", "default", "sleep")
    assert check_csr(csr.encode()).identity == SpiffeId("cluster.local", "default", "sleep")


@pytest.mark.parametrize(
    ("csr_factory", "reason"),
    [
        (
            lambda: build_csr(rsa.generate_private_key(65537, 2048), [uri(SLEEP)]),
            "CSR key is RSA-2048; ECDSA P-256 is required",
        ),
        (
            lambda: build_csr(ec.generate_private_key(ec.SECP384R1()), [uri(SLEEP)]),
            "CSR key is ECDSA on curve secp384r1; ECDSA P-256 is required",
        ),
        (
            lambda: build_csr(p256(), [uri(SLEEP), uri("spiffe://cluster.local/ns/a/sa/b")]),
            "CSR has 2 SANs; exactly one SPIFFE URI SAN is required",
        ),
        (
            lambda: build_csr(p256(), [uri(SLEEP), x509.DNSName("sleep.default.svc")]),
            "CSR has a DNS SAN 'sleep.default.svc'; only a SPIFFE URI SAN is allowed",
        ),
        (
            lambda: build_csr(p256(), [x509.IPAddress(ip_address("10.0.0.1"))]),
            "CSR has an IP SAN 10.0.0.1; only a SPIFFE URI SAN is allowed",
        ),
        (
            lambda: build_csr(p256(), [x509.RFC822Name("me@example.com")]),
            "CSR has an email SAN 'me@example.com'; only a SPIFFE URI SAN is allowed",
        ),
        (
            lambda: build_csr(p256(), [uri(SLEEP)], common_name="sleep"),
            "CSR subject has a common name (CN); the identity goes in a URI SAN only",
        ),
        (
            lambda: build_csr(p256(), [uri("https://example.com/sleep")]),
            "CSR URI SAN is not a SPIFFE id: 'https://example.com/sleep' does not start "
            "with spiffe://",
        ),
        (
            lambda: build_csr(p256(), None),
            "CSR has no subjectAltName; one SPIFFE URI SAN is required",
        ),
    ],
    ids=["rsa", "p384", "two-sans", "dns-san", "ip-san", "email-san", "cn", "not-spiffe", "no-san"],
)
def test_csr_rejections(csr_factory: Callable[[], str], reason: str) -> None:
    csr = csr_factory()
    with pytest.raises(CsrRejected) as info:
        check_csr(csr)
    assert info.value.reason == reason
    assert str(info.value) == reason


def test_csr_from_a_foreign_trust_domain_is_rejected(ca: CertificateAuthority) -> None:
    csr = build_csr(p256(), [uri("spiffe://evil.example/ns/default/sa/sleep")])
    assert check_csr(csr).identity.trust_domain == "evil.example"  # well formed...
    with pytest.raises(CsrRejected, match="trust domain 'evil.example'; this CA signs for"):
        ca.sign_csr(check_csr(csr))  # ...but not ours


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "hello",
        b"\x00\x01\x02",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n",
    ],
)
def test_garbage_pem_is_rejected(garbage: str | bytes) -> None:
    with pytest.raises(CsrRejected, match="not a PEM certificate signing request"):
        check_csr(garbage)


def test_tampered_csr_signature_is_rejected() -> None:
    _, csr_pem = new_key_and_csr(SLEEP)
    der = bytearray(
        x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # last byte of the signature's s value
    tampered = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CsrRejected, match="signature"):
        check_csr(tampered)


# --------------------------------------------------------------------------- leaf shape


def test_leaf_shape(ca: CertificateAuthority) -> None:
    key, csr = new_key_and_csr(SLEEP)
    chain = ca.sign_csr(check_csr(csr))
    assert len(chain) == 2 and chain[-1] == ca.trust_bundle[0]
    leaf = load(chain[0])
    root = load(chain[1])
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root.subject
    assert leaf.signature_hash_algorithm is not None
    assert leaf.signature_hash_algorithm.name == "sha256"
    assert leaf.public_key() == key.public_key()

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [uri(SLEEP)]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    assert 0 < leaf.serial_number < 2**128
    assert leaf.serial_number != load(ca.sign_csr(check_csr(csr))[0]).serial_number
    verify_client(chain, ca.trust_bundle)


def test_default_ttl_is_24h_from_now_valid_from_skew_earlier(ca: CertificateAuthority) -> None:
    _, csr = new_key_and_csr(SLEEP)
    leaf = load(ca.sign_csr(check_csr(csr))[0])
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)


def test_requested_ttl_is_honoured_and_capped() -> None:
    ca = CertificateAuthority.self_signed(
        "cluster.local",
        None,
        default_ttl=timedelta(hours=2),
        max_ttl=timedelta(hours=12),
        now=fixed_clock,
    )
    _, csr = new_key_and_csr(SLEEP)

    def lifetime(ttl: timedelta | None) -> timedelta:
        leaf = load(ca.sign_csr(check_csr(csr), ttl)[0])
        return leaf.not_valid_after_utc - NOW

    assert lifetime(None) == timedelta(hours=2)
    assert lifetime(timedelta(hours=5)) == timedelta(hours=5)
    assert lifetime(timedelta(days=30)) == timedelta(hours=12)
    with pytest.raises(CsrRejected, match="not positive"):
        ca.sign_csr(check_csr(csr), timedelta(0))


def test_ca_expiry_caps_the_leaf(tmp_path: Path) -> None:
    files = PluginFiles(tmp_path)
    soon = NOW + timedelta(hours=3)
    short = make_ca_cert(
        "Short CA", files.intermediate_key, (files.root, files.root_key), not_after=soon
    )
    files.write(ca_cert=pem(short), cert_chain="")
    _, csr = new_key_and_csr(SLEEP)
    leaf = load(files.load().sign_csr(check_csr(csr))[0])
    assert leaf.not_valid_after_utc == soon


def test_expired_ca_refuses_to_sign() -> None:
    clock = [NOW]
    ca = CertificateAuthority.self_signed("cluster.local", None, now=lambda: clock[0])
    clock[0] = NOW + timedelta(days=3651)
    _, csr = new_key_and_csr(SLEEP)
    with pytest.raises(CaError, match="cannot issue certificates any more"):
        ca.sign_csr(check_csr(csr))


def test_extra_roots_join_the_trust_bundle() -> None:
    old = CertificateAuthority.self_signed("cluster.local", None, now=fixed_clock)
    old_root = load(old.trust_bundle[0])
    new = CertificateAuthority.self_signed(
        "cluster.local", None, extra_roots=[old_root, old_root], now=fixed_clock
    )
    assert len(new.trust_bundle) == 2
    assert new.trust_bundle[1] == old.trust_bundle[0]
    _, csr = new_key_and_csr(SLEEP)
    assert new.sign_csr(check_csr(csr))[-1] == new.trust_bundle[0]  # only the own root signs


def test_serving_certificate(ca: CertificateAuthority) -> None:
    istiod = SpiffeId("cluster.local", "istio-system", "istiod")
    key_pem_text, chain = ca.issue_serving_certificate(
        ["istiod.istio-system.svc"], ["127.0.9.1"], istiod
    )
    key = serialization.load_pem_private_key(key_pem_text.encode(), password=None)
    leaf = load(chain[0])
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.9.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(istiod)]
    store = Store([load(ca.trust_bundle[0])])
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(NOW)
        .build_server_verifier(x509.DNSName("istiod.istio-system.svc"))
    )
    verifier.verify(leaf, [])
    with pytest.raises(ValueError, match="not an IP address: 'localhost'"):
        ca.issue_serving_certificate([], ["localhost"], None)
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_serving_certificate([], [], None)


# --------------------------------------------------------------------------- tests.pki helper


def test_pki_helper_issues_verifiable_certs_and_foreign_ones_fail(tmp_path: Path) -> None:
    pki = TestPki()
    issued = pki.issue("default", "sleep")
    assert issued.identity == SpiffeId("cluster.local", "default", "sleep")
    assert issued.cert == load(issued.cert_pem)
    # TTL from now, valid from a minute back (the clock-skew allowance).
    assert issued.not_after - issued.not_before == timedelta(hours=1, seconds=60)
    now = datetime.now(UTC)
    verify_client(issued.chain_pem, pki.trust_bundle, at=now)

    other = pki.foreign_pki()
    assert other.trust_bundle != pki.trust_bundle
    with pytest.raises(VerificationError):
        verify_client(other.issue("default", "sleep").chain_pem, pki.trust_bundle, at=now)
    assert foreign_pki().trust_bundle != pki.trust_bundle

    expired = pki.issue_expired("default", "sleep")
    assert expired.not_after < now
    with pytest.raises(VerificationError):
        verify_client(expired.chain_pem, pki.trust_bundle, at=now)

    later = pki.issue("default", "sleep", not_before=now + timedelta(hours=1))
    assert later.not_before == (now + timedelta(hours=1)).replace(microsecond=0)

    odd = pki.issue_with_uri("https://example.com/x")
    assert odd.identity is None
    san = odd.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [uri("https://example.com/x")]
    wrong_td = pki.issue_with_uri("spiffe://evil.example/ns/a/sa/b")
    assert wrong_td.identity == SpiffeId("evil.example", "a", "b")

    cert_path, key_path, ca_path = write_pem_files(tmp_path / "pem", issued)
    assert cert_path.read_text() == "".join(issued.chain_pem)
    assert key_path.read_text() == issued.key_pem
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert ca_path.read_text() == pki.trust_bundle[0]
