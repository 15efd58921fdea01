"""DiscoveryClient over real HTTP/2 + TLS: against a scripted istiod (ACK/NACK, broken
streams, resume, backoff) and against istiod_lite itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
from structlog.testing import capture_logs

from ambient_api import codec
from ambient_api.discovery import DeltaUpdate, ResourceUpdate
from ambient_dataplane.controlplane import ControlPlaneConnection
from ambient_dataplane.discovery import DiscoveryClient, parse_stream_line
from ambient_dataplane.state import AppliedChange, ProxyState
from tests.conftest import LoopbackAllocator
from tests.deltas import resource_update
from tests.integration.control_plane_servers import (
    ScriptedIstiod,
    StreamScript,
    client_ssl_context,
    ndjson,
    start_real_istiod,
    start_scripted_istiod,
    workload,
)
from tests.pki import TestPki

SLEEP = workload("sleep", "node-1", address="127.0.20.1")
HTTPBIN = workload("httpbin", "node-2", address="127.0.20.2")
TOKEN = "node-1-token"


def update(nonce: str, *resources: ResourceUpdate) -> DeltaUpdate:
    return DeltaUpdate(nonce=nonce, system_version=int(nonce[1:]), resources=resources)


def broken_update(nonce: str) -> DeltaUpdate:
    """Well-formed JSON whose workload resource misses required fields: apply() rejects it."""
    good = resource_update(HTTPBIN)
    bad = dataclasses.replace(good, resource={"uid": HTTPBIN.uid, "name": "httpbin"})
    return update(nonce, bad)


def test_parse_stream_line() -> None:
    assert parse_stream_line("  \n") is None
    parsed = parse_stream_line(ndjson(update("n1", resource_update(SLEEP))))
    assert parsed is not None and parsed.update is not None
    assert parsed.update.resources[0].name == SLEEP.uid
    not_json = parse_stream_line("{oops")
    assert not_json is not None and not_json.update is None and "not JSON" in str(not_json.error)
    wrong = parse_stream_line('{"nonce": "n7", "system_version": "seven"}')
    assert wrong is not None and wrong.nonce == "n7" and "system_version" in str(wrong.error)


async def test_applies_acks_and_nacks_keeping_last_good_state(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    fake = ScriptedIstiod([
        StreamScript(lines=[
            ndjson(update("n1", resource_update(SLEEP))),
            ndjson(broken_update("n2")),
            '{"nonce": "n3", "system_version": "three"}\n',
            ndjson(update("n4", resource_update(HTTPBIN))),
        ]),
    ])
    url = await start_scripted_istiod(nursery, tmp_path, loopback.new(), pki, fake)
    connection = ControlPlaneConnection(url, TOKEN, client_ssl_context(pki))
    state = ProxyState()
    changes: list[AppliedChange] = []

    async def on_change(change: AppliedChange) -> None:
        changes.append(change)

    client = DiscoveryClient(connection, "node-1", state, on_change)
    await nursery.start(client.run)
    with trio.fail_after(5):
        await client.synced.wait()
        await fake.wait_for_acks(4)

    assert [(a.nonce, a.error is None) for a in fake.acks] == [
        ("n1", True), ("n2", False), ("n3", False), ("n4", True)
    ]
    assert all(a.node == "node-1" for a in fake.acks)
    assert fake.acks[1].error and "httpbin" in fake.acks[1].error
    assert fake.acks[2].error and "system_version" in fake.acks[2].error
    assert {w.uid for w in state.workloads()} == {SLEEP.uid, HTTPBIN.uid}
    assert len(changes) == 2
    assert client.connected and client.updates_applied == 2 and client.updates_rejected == 2
    assert client.last_update_at is not None
    assert fake.requests[0].node == "node-1" and fake.requests[0].initial_resource_versions == {}
    assert fake.authorizations[0] == f"Bearer {TOKEN}"
    await connection.aclose()


async def test_reconnects_with_resume_and_backoff(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    fake = ScriptedIstiod([
        StreamScript(lines=[ndjson(update("n1", resource_update(SLEEP)))], then="close"),
        StreamScript(status=503),
        StreamScript(status=503),
        StreamScript(lines=[ndjson(update("n2", resource_update(HTTPBIN)))]),
    ])
    url = await start_scripted_istiod(nursery, tmp_path, loopback.new(), pki, fake)
    connection = ControlPlaneConnection(url, TOKEN, client_ssl_context(pki))
    state = ProxyState()
    client: DiscoveryClient[AppliedChange] = DiscoveryClient(
        connection, "node-1", state, None, backoff_initial=0.1, backoff_cap=0.25
    )
    with capture_logs() as logs:
        await nursery.start(client.run)
        with trio.fail_after(5):
            await fake.wait_for_acks(1)
            # While istiod refuses, the last good state is still served.
            while len(fake.requests) < 3:
                await trio.sleep(0.01)
            assert not client.connected
            assert client.last_error is not None and "503" in client.last_error
            assert [w.uid for w in state.workloads()] == [SLEEP.uid]
            await fake.wait_for_acks(2)

    # Each reconnection resumes from what the proxy holds.
    sleep_key = f"workload/{SLEEP.uid}"
    assert fake.requests[1].initial_resource_versions == {sleep_key: resource_update(SLEEP).version}
    assert fake.requests[3].initial_resource_versions == fake.requests[1].initial_resource_versions
    # The waits before each reconnection: 0.1 after a healthy stream, then doubling (0.2),
    # then capped (0.25).
    assert [(e["event"], e["retry_in"]) for e in logs if "retry_in" in e] == [
        ("discovery stream disconnected", 0.1),
        ("discovery connect failed", 0.2),
        ("discovery connect failed", 0.25),
    ]
    assert {w.uid for w in state.workloads()} == {SLEEP.uid, HTTPBIN.uid}
    assert client.connected
    await connection.aclose()


async def test_unreachable_istiod_is_retried(loopback: LoopbackAllocator) -> None:
    pki = TestPki()
    connection = ControlPlaneConnection(
        f"https://{loopback.new()}:15012", TOKEN, client_ssl_context(pki), request_timeout=1.0
    )
    client: DiscoveryClient[AppliedChange] = DiscoveryClient(
        connection, "node-1", ProxyState(), backoff_initial=0.05, backoff_cap=0.05
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await trio.sleep(0.3)
        assert not client.connected and not client.synced.is_set()
        assert client.last_error is not None and "Connect" in client.last_error
        nursery.cancel_scope.cancel()
    await connection.aclose()


async def test_follows_real_istiod(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(
        nursery, tmp_path, loopback.new(), pki, [SLEEP], {TOKEN: "node-1"}
    )
    connection = ControlPlaneConnection(istiod.url, TOKEN, client_ssl_context(pki))
    state = ProxyState()
    changes: list[AppliedChange] = []
    client = DiscoveryClient(connection, "node-1", state, changes.append)
    await nursery.start(client.run)
    with trio.fail_after(5):
        await client.synced.wait()
        assert [w.uid for w in state.workloads()] == [SLEEP.uid]
        istiod.store.replace_all([SLEEP, HTTPBIN])
        while len(changes) < 2:
            await trio.sleep(0.01)
        assert {w.uid for w in state.workloads()} == {SLEEP.uid, HTTPBIN.uid}
        # istiod saw the ACK of what it sent last.
        while True:
            (subscriber,) = istiod.store.subscribers()
            if subscriber.last_acked_nonce == subscriber.last_sent_nonce:
                break
            await trio.sleep(0.01)
    assert subscriber.last_nack_nonce is None
    assert codec.to_jsonable(state.known_versions()) == istiod.store.versions()
    await connection.aclose()


async def test_wrong_token_is_reported_not_fatal(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    istiod = await start_real_istiod(
        nursery, tmp_path, loopback.new(), pki, [SLEEP], {TOKEN: "node-1"}
    )
    connection = ControlPlaneConnection(istiod.url, "wrong", client_ssl_context(pki))
    client: DiscoveryClient[AppliedChange] = DiscoveryClient(
        connection, "node-1", ProxyState(), backoff_initial=0.05, backoff_cap=0.05
    )
    async with trio.open_nursery() as inner:
        await inner.start(client.run)
        with trio.fail_after(5):
            while client.last_error is None:
                await trio.sleep(0.01)
        inner.cancel_scope.cancel()
    assert "401" in client.last_error and "unknown bootstrap token" in client.last_error
    await connection.aclose()
