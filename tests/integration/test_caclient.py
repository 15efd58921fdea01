"""CaClient and CertificateManager against istiod_lite's real certificate endpoint over
HTTP/2 + TLS: issuance, refusals with the server's reason, an unreachable CA, and rotation
of short-lived certificates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509

from ambient_api.identity import SpiffeId
from ambient_dataplane.controlplane import (
    CaClient,
    CaRefused,
    CaUnavailable,
    ControlPlaneConnection,
)
from ambient_dataplane.identity import CertificateManager, new_key_and_csr
from istiod_lite.ca import CLOCK_SKEW
from tests.conftest import LoopbackAllocator
from tests.integration.control_plane_servers import (
    client_ssl_context,
    start_real_istiod,
    workload,
)
from tests.pki import TestPki

SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")
HTTPBIN_ID = SpiffeId("cluster.local", "default", "httpbin")
WORKLOADS = [workload("sleep", "node-1"), workload("httpbin", "node-2", address="127.0.20.2")]
TOKENS = {"node-1-token": "node-1", "node-2-token": "node-2"}


async def test_sign_returns_chain_and_trust_bundle_over_http2(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(nursery, tmp_path, loopback.new(), pki, WORKLOADS, TOKENS)
    async with ControlPlaneConnection(istiod.url, "node-1-token", client_ssl_context(pki)) as cp:
        ca = CaClient(cp)
        _key, csr = new_key_and_csr(SLEEP_ID)
        answer = await ca.sign(csr, ttl_seconds=600)
        leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SLEEP_ID)]
        # TTL counted from now; valid from a minute back (the CA's clock-skew allowance).
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=660)
        assert answer.cert_chain[-1] == pki.root_pem
        assert list(answer.trust_bundle) == pki.trust_bundle
        # The same HTTP/2 connection serves further calls.
        response = await cp.client.get("/ready")
        assert response.http_version == "HTTP/2"


async def test_refusals_carry_the_servers_reason(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(nursery, tmp_path, loopback.new(), pki, WORKLOADS, TOKENS)
    ssl_context = client_ssl_context(pki)
    async with ControlPlaneConnection(istiod.url, "node-1-token", ssl_context) as cp:
        ca = CaClient(cp)
        with pytest.raises(CaRefused) as refused:
            await ca.sign(new_key_and_csr(HTTPBIN_ID)[1])  # httpbin runs on node-2 only
        assert refused.value.status == 403
        assert "no instances of default/httpbin on node node-1" in refused.value.reason
        with pytest.raises(CaRefused) as malformed:
            await ca.sign("-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
        assert malformed.value.status == 400 and "CSR" in malformed.value.reason
    async with ControlPlaneConnection(istiod.url, "stolen", ssl_context) as cp:
        with pytest.raises(CaRefused) as unauthenticated:
            await CaClient(cp).sign(new_key_and_csr(SLEEP_ID)[1])
        assert unauthenticated.value.status == 401


async def test_unreachable_or_untrusted_ca_is_unavailable(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    csr = new_key_and_csr(SLEEP_ID)[1]
    nobody = f"https://{loopback.new()}:15012"
    async with ControlPlaneConnection(nobody, "t", client_ssl_context(pki)) as cp:
        with pytest.raises(CaUnavailable, match="ConnectError"):
            await CaClient(cp).sign(csr)
    # An istiod whose certificate is not from our mesh root is not trusted.
    istiod = await start_real_istiod(nursery, tmp_path, loopback.new(), pki, WORKLOADS, TOKENS)
    foreign = client_ssl_context(pki.foreign_pki())
    async with ControlPlaneConnection(istiod.url, "node-1-token", foreign) as cp:
        with pytest.raises(CaUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await CaClient(cp).sign(csr)


async def test_short_lived_certificate_is_rotated_before_expiry(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(nursery, tmp_path, loopback.new(), pki, WORKLOADS, TOKENS)
    cp = ControlPlaneConnection(istiod.url, "node-1-token", client_ssl_context(pki))
    manager = CertificateManager(CaClient(cp), requested_ttl=2, backoff_initial=0.05)
    rotations: list[str] = []
    manager.add_rotation_hook(lambda _identity, cert: rotations.append(cert.serial))
    manager.set_wanted({SLEEP_ID})
    await nursery.start(manager.run)
    first = await manager.wait_for(SLEEP_ID, timeout=5)
    assert first.not_after - first.not_before == timedelta(seconds=2) + CLOCK_SKEW
    with trio.fail_after(3):
        while (current := manager.current(SLEEP_ID)) is None or current.serial == first.serial:
            await trio.sleep(0.02)
    assert datetime.now(UTC) < first.not_after  # renewed before the old one expired
    assert current.not_after > first.not_after
    assert rotations[:2] == [first.serial, current.serial]
    assert manager.dump()[0]["state"] == "Available"
    await cp.aclose()


async def test_refused_identity_shows_reason_in_dump(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(nursery, tmp_path, loopback.new(), pki, WORKLOADS, TOKENS)
    cp = ControlPlaneConnection(istiod.url, "node-1-token", client_ssl_context(pki))
    manager = CertificateManager(CaClient(cp), backoff_initial=0.05, backoff_cap=0.1)
    manager.set_wanted({SLEEP_ID, HTTPBIN_ID})
    await nursery.start(manager.run)
    await manager.wait_for(SLEEP_ID, timeout=5)
    with pytest.raises(TimeoutError):
        await manager.wait_for(HTTPBIN_ID, timeout=0.3)
    states = {entry["identity"]: entry["state"] for entry in manager.dump()}
    assert states == {
        str(SLEEP_ID): "Available",
        str(HTTPBIN_ID): "Unavailable: refused (403): no instances of default/httpbin on node "
        "node-1",
    }
    assert manager.missing() == [HTTPBIN_ID]
    await cp.aclose()


def test_httpx_is_imported_for_http2() -> None:
    # http2=True needs the h2 extra; fail loudly here rather than on the first connection.
    import h2  # noqa: F401

    assert httpx.__version__
