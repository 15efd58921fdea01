"""Certificate timing (pure functions), CSR shape, and the CertificateManager driven by a
virtual clock: the CA's clock and the manager's both follow trio's MockClock, so hours of
certificate lifetime pass in milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ambient_api.discovery import CertificateResponse
from ambient_api.identity import SpiffeId
from ambient_dataplane.controlplane import CaRefused, CaUnavailable
from ambient_dataplane.identity import (
    CertificateManager,
    describe_certificate,
    new_key_and_csr,
    next_backoff,
    renewal_delay,
)
from ambient_dataplane.tls import CertifiedKey
from istiod_lite.csr import check_csr
from tests.pki import TestPki

SLEEP = SpiffeId("cluster.local", "default", "sleep")
HTTPBIN = SpiffeId("cluster.local", "default", "httpbin")
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


def virtual_now() -> datetime:
    return EPOCH + timedelta(seconds=trio.current_time())


# -- pure functions -------------------------------------------------------------------------


def test_renewal_delay_is_half_life_from_now() -> None:
    start = EPOCH
    end = EPOCH + timedelta(hours=24)
    assert renewal_delay(start, end, start) == 12 * 3600
    # Arriving late (or backdated for clock skew): half of what remains.
    assert renewal_delay(start, end, start + timedelta(hours=2)) == 11 * 3600
    assert renewal_delay(start, end, start + timedelta(hours=24)) == 0
    assert renewal_delay(start, end, start + timedelta(hours=30)) == 0  # overdue: now


def test_next_backoff_doubles_from_one_second_and_caps_at_150() -> None:
    waits = []
    previous = None
    for _ in range(10):
        previous = next_backoff(previous)
        waits.append(previous)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    assert next_backoff(None, initial=0.5, cap=0.75) == 0.5
    assert next_backoff(0.5, initial=0.5, cap=0.75) == 0.75


def test_csr_is_p256_with_one_uri_san_and_no_cn() -> None:
    key_pem, csr_pem = new_key_and_csr(SLEEP)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert list(csr.subject) == []
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SLEEP)]
    assert len(list(san)) == 1
    assert csr.is_signature_valid
    # The real CA's checks accept it.
    assert check_csr(csr_pem).identity == SLEEP
    assert "PRIVATE KEY" in key_pem
    # Every call makes a fresh key.
    assert new_key_and_csr(SLEEP)[0] != key_pem


def test_describe_certificate_reports_serial_validity_and_sans() -> None:
    issued = TestPki().issue("default", "sleep", ttl=timedelta(hours=2))
    info = describe_certificate(issued.cert_pem)
    assert info.serial_number == format(issued.serial, "x")
    # Valid from a minute back (the CA's clock-skew allowance) until two hours from now.
    assert info.expiration_time - info.valid_from == timedelta(hours=2, minutes=1)
    assert info.subject_alt_names == (str(SLEEP),)
    dumped = info.to_dump()
    assert dumped["validFrom"].endswith("Z") and dumped["expirationTime"].endswith("Z")


# -- the manager ----------------------------------------------------------------------------


class ScriptedCa:
    """Signs with a real CA on the virtual clock; ``failures`` are raised first, in order."""

    def __init__(self, pki: TestPki, failures: list[Exception] | None = None) -> None:
        self.pki = pki
        self.failures = list(failures or [])
        self.calls: list[tuple[float, SpiffeId]] = []

    async def sign(self, csr_pem: str, ttl_seconds: int | None = None) -> CertificateResponse:
        self.calls.append((trio.current_time(), check_csr(csr_pem).identity))
        if self.failures:
            raise self.failures.pop(0)
        ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else None
        chain = self.pki.ca.sign_csr(check_csr(csr_pem), ttl)
        return CertificateResponse(tuple(chain), tuple(self.pki.trust_bundle))

    def call_times(self, identity: SpiffeId) -> list[float]:
        return [t for t, i in self.calls if i == identity]


def make_manager(
    ca: ScriptedCa, **kwargs: object
) -> tuple[CertificateManager, list[tuple[SpiffeId, CertifiedKey]]]:
    rotated: list[tuple[SpiffeId, CertifiedKey]] = []
    manager = CertificateManager(
        ca,
        clock=virtual_now,
        on_rotated=lambda identity, cert: rotated.append((identity, cert)),
        bootstrap_trust_bundle=["bootstrap-root"],
        **kwargs,  # type: ignore[arg-type]
    )
    return manager, rotated


async def run_manager(nursery: trio.Nursery, manager: CertificateManager) -> None:
    await nursery.start(manager.run)


async def test_fetches_certificate_and_updates_trust_bundle(autojump_clock: object) -> None:
    pki = TestPki(now=virtual_now)
    ca = ScriptedCa(pki)
    manager, rotated = make_manager(ca, requested_ttl=3600)
    assert manager.trust_bundle == ["bootstrap-root"]
    manager.set_wanted({SLEEP})
    assert manager.state(SLEEP) == "Initializing"
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        cert = await manager.wait_for(SLEEP, timeout=5)
        assert cert.identity == SLEEP
        assert manager.current(SLEEP) is cert
        assert manager.trust_bundle == pki.trust_bundle
        assert rotated == [(SLEEP, cert)]
        (entry,) = manager.dump()
        assert entry["identity"] == str(SLEEP)
        assert entry["state"] == "Available"
        assert entry["certChain"][0]["serialNumber"] == cert.serial
        assert entry["certChain"][0]["subjectAltNames"] == [str(SLEEP)]
        assert len(entry["certChain"]) == 2  # leaf + root
        assert manager.missing() == []
        nursery.cancel_scope.cancel()


async def test_renews_at_half_life_and_rotates(autojump_clock: object) -> None:
    ca = ScriptedCa(TestPki(now=virtual_now))
    manager, rotated = make_manager(ca, requested_ttl=3600)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        first = await manager.wait_for(SLEEP, timeout=5)
        while len(rotated) < 3:
            await trio.sleep(60)
        second, third = rotated[1][1], rotated[2][1]
        assert len({first.serial, second.serial, third.serial}) == 3
        times = ca.call_times(SLEEP)
        # Half of the usable life: from arrival (not the backdated notBefore) to notAfter.
        arrived = EPOCH + timedelta(seconds=times[0])
        half_life = arrived + (first.not_after - arrived) / 2
        assert times[1] == pytest.approx((half_life - EPOCH).total_seconds(), abs=1e-3)
        # Renewed well before expiry; the renewed certificate is the current one.
        assert times[1] < (first.not_after - EPOCH).total_seconds()
        assert manager.current(SLEEP) == third
        nursery.cancel_scope.cancel()


async def test_failures_back_off_exponentially(autojump_clock: object) -> None:
    failures: list[Exception] = [CaUnavailable("connection refused")] * 4
    ca = ScriptedCa(TestPki(now=virtual_now), failures)
    manager, _ = make_manager(ca, backoff_initial=1.0, backoff_cap=150.0)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await trio.sleep(0.5)
        assert manager.state(SLEEP) == "Unavailable: connection refused"
        assert manager.current(SLEEP) is None
        assert manager.missing() == [SLEEP]
        await manager.wait_for(SLEEP, timeout=60)
        times = ca.call_times(SLEEP)
        gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
        assert gaps == [1, 2, 4, 8]
        assert manager.state(SLEEP) == "Available"
        nursery.cancel_scope.cancel()


async def test_refusal_is_reported_and_retried_with_capped_backoff(autojump_clock: object) -> None:
    refusal = CaRefused(403, "no instances of default/sleep on node node-1")
    ca = ScriptedCa(TestPki(now=virtual_now), [refusal] * 5)
    manager, _ = make_manager(ca, backoff_initial=1.0, backoff_cap=4.0)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await trio.sleep(0.5)
        assert manager.state(SLEEP) == (
            "Unavailable: refused (403): no instances of default/sleep on node node-1"
        )
        with pytest.raises(TimeoutError, match="no instances of default/sleep"):
            await manager.wait_for(SLEEP, timeout=2)
        await manager.wait_for(SLEEP, timeout=60)
        times = ca.call_times(SLEEP)
        gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
        assert gaps == [1, 2, 4, 4, 4]
        nursery.cancel_scope.cancel()


async def test_failed_renewal_keeps_the_valid_certificate_until_it_expires(
    autojump_clock: object,
) -> None:
    pki = TestPki(now=virtual_now)
    ca = ScriptedCa(pki)
    manager, _ = make_manager(ca, requested_ttl=600, backoff_cap=10.0)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        cert = await manager.wait_for(SLEEP, timeout=5)
        ca.failures = [CaUnavailable("istiod restarting")] * 10_000
        expiry = (cert.not_after - EPOCH).total_seconds()
        await trio.sleep(expiry - trio.current_time() - 5)
        # Renewal has been failing for a while, yet the still-valid certificate is served.
        assert len(ca.call_times(SLEEP)) > 5
        assert manager.current(SLEEP) is cert
        assert manager.state(SLEEP) == "Available"
        await trio.sleep(10)
        assert manager.current(SLEEP) is None
        assert manager.state(SLEEP) == "Unavailable: istiod restarting"
        # Once the CA is back, a fresh certificate arrives within one capped backoff.
        ca.failures = []
        fresh = await manager.wait_for(SLEEP, timeout=11)
        assert fresh.serial != cert.serial
        nursery.cancel_scope.cancel()


async def test_set_wanted_adds_and_drops_identities(autojump_clock: object) -> None:
    ca = ScriptedCa(TestPki(now=virtual_now))
    manager, _ = make_manager(ca, requested_ttl=3600)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await manager.wait_for(SLEEP, timeout=5)
        manager.set_wanted({HTTPBIN})
        assert manager.current(SLEEP) is None
        with pytest.raises(KeyError):
            await manager.wait_for(SLEEP, timeout=1)
        await manager.wait_for(HTTPBIN, timeout=5)
        assert [entry["identity"] for entry in manager.dump()] == [str(HTTPBIN)]
        calls_before = len(ca.call_times(SLEEP))
        await trio.sleep(7200)  # several renewal periods: the dropped identity is not renewed
        assert len(ca.call_times(SLEEP)) == calls_before
        assert len(ca.call_times(HTTPBIN)) > 1
        nursery.cancel_scope.cancel()


async def test_certificate_already_past_half_life_does_not_hammer_the_ca(
    autojump_clock: object,
) -> None:
    # A CA whose clock is two minutes behind: a 30 s certificate arrives already expired.
    ca = ScriptedCa(TestPki(now=lambda: virtual_now() - timedelta(minutes=2)))
    manager, _ = make_manager(ca, requested_ttl=30, backoff_initial=1.0, backoff_cap=8.0)
    manager.set_wanted({SLEEP})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await trio.sleep(20)
        times = ca.call_times(SLEEP)
        gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
        assert gaps[:4] == [1, 2, 4, 8]
        nursery.cancel_scope.cancel()
