"""The mesh roots follow their file (issue 11: a new root after an istiod restart): the
control-plane TLS context is rebuilt from a rewritten root-cert.pem, a broken rewrite keeps
the last roots, and the certificate manager renews every certificate when the roots change."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from ambient_dataplane.controlplane import (
    ControlPlaneConnection,
    RootCertificate,
    split_pem_certificates,
)
from tests.pki import TestPki
from tests.unit.test_identity import (
    HTTPBIN,
    SLEEP,
    ScriptedCa,
    make_manager,
    run_manager,
    virtual_now,
)

_STAMP = iter(range(1, 1_000_000))


def rewrite(path: Path, text: str) -> None:
    """Write ``text`` with a fresh mtime, as a ConfigMap update or istiod's rewrite gives."""
    path.write_text(text)
    stamp = next(_STAMP) * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_split_pem_certificates_keeps_each_certificate_whole() -> None:
    first, second = TestPki().root_pem, TestPki().root_pem
    assert split_pem_certificates(first + second) == [first, second]
    assert split_pem_certificates("no certificate here") == []


def test_a_rewritten_root_file_gives_new_roots_and_a_new_context(tmp_path: Path) -> None:
    path = tmp_path / "root-cert.pem"
    old, new = TestPki().root_pem, TestPki().root_pem
    rewrite(path, old)
    roots = RootCertificate(path)
    assert roots.pems == (old,)
    first_context = roots.context
    assert not roots.refresh()  # unchanged
    rewrite(path, old)
    assert not roots.refresh()  # touched, same roots
    rewrite(path, new)
    assert roots.refresh()
    assert roots.pems == (new,)
    assert roots.context is not first_context


def test_a_broken_rewrite_keeps_the_last_roots(tmp_path: Path) -> None:
    path = tmp_path / "root-cert.pem"
    good = TestPki().root_pem
    rewrite(path, good)
    roots = RootCertificate(path)
    for broken in ("", "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"):
        rewrite(path, broken)
        assert not roots.refresh()
        assert roots.pems == (good,)
    path.unlink()
    assert not roots.refresh()
    assert roots.pems == (good,)


async def test_the_connection_rebuilds_its_client_and_tells_the_hooks(tmp_path: Path) -> None:
    path = tmp_path / "root-cert.pem"
    rewrite(path, TestPki().root_pem)
    connection = ControlPlaneConnection("https://127.0.0.1:1", "t", RootCertificate(path))
    seen: list[tuple[str, ...]] = []
    connection.on_roots_changed(seen.append)
    first_client = connection.client
    connection.stream_json("/unused", {})  # opening a request looks at the file
    assert connection.client is first_client and seen == []
    new_root = TestPki().root_pem
    rewrite(path, new_root)
    connection.stream_json("/unused", {})
    assert connection.client is not first_client
    assert seen == [(new_root,)]
    await connection.aclose()
    assert first_client.is_closed and connection.client.is_closed


async def test_renew_all_fetches_every_certificate_now(autojump_clock: object) -> None:
    ca = ScriptedCa(TestPki(now=virtual_now))
    manager, _ = make_manager(ca, requested_ttl=3600)
    manager.set_wanted({SLEEP, HTTPBIN})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await manager.wait_for(SLEEP, timeout=5)
        await manager.wait_for(HTTPBIN, timeout=5)
        await trio.sleep(60)  # far from half-life: no renewal due
        assert len(ca.calls) == 2
        manager.renew_all("the root certificate changed")
        await trio.sleep(1)
        assert len(ca.call_times(SLEEP)) == 2 and len(ca.call_times(HTTPBIN)) == 2
        nursery.cancel_scope.cancel()


async def test_a_new_trust_bundle_from_the_ca_renews_the_other_certificates(
    autojump_clock: object,
) -> None:
    ca = ScriptedCa(TestPki(now=virtual_now))
    manager, _ = make_manager(ca, requested_ttl=3600)
    manager.set_wanted({SLEEP, HTTPBIN})
    async with trio.open_nursery() as nursery:
        await run_manager(nursery, manager)
        await manager.wait_for(SLEEP, timeout=5)
        await manager.wait_for(HTTPBIN, timeout=5)
        ca.pki = TestPki(now=virtual_now)  # istiod came back with another CA
        manager.renew_all("test", except_for=HTTPBIN)  # SLEEP meets the new CA first
        await trio.sleep(1)
        # SLEEP's answer carried the new bundle: HTTPBIN, still of the old root, renewed too.
        assert manager.trust_bundle == ca.pki.trust_bundle
        assert len(ca.call_times(HTTPBIN)) >= 2
        nursery.cancel_scope.cancel()
