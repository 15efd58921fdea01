"""istiod_lite end to end, in process: real TLS + HTTP/2 (hypercorn) spoken to with httpx."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ambient_api import codec, kinds
from ambient_api.discovery import (
    ACK_PATH,
    CERTIFICATE_PATH,
    DISCOVERY_PATH,
    CertificateResponse,
    DeltaUpdate,
    versioned_key,
)
from ambient_api.l7 import WaypointAuthorization, WaypointAuthorizationAction
from ambient_api.model import Node, Workload
from ambient_dataplane.labels import connection_labels
from istiod_lite.__main__ import RunningIstiod, run_istiod
from istiod_lite.config import IstiodConfig
from tests.pki import new_key_and_csr

WAYPOINT_PRINCIPAL = "serviceaccount:default/waypoint"
# A service account of the root namespace: /debug/syncz shows it every stream.
OPERATOR_PRINCIPAL = "serviceaccount:istio-system/operator"
TOKENS = {
    "node-1": "token-node-1-0123456789abcdef",
    "node-2": "token-node-2-0123456789abcdef",
    WAYPOINT_PRINCIPAL: "token-waypoint-0123456789abcdef",
    OPERATOR_PRINCIPAL: "token-operator-0123456789abcdef",
}
SLEEP_UID = "Kubernetes//Pod/default/sleep"
HTTPBIN_UID = "Kubernetes//Pod/default/httpbin"

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status:
  addresses: [{{type: InternalIP, address: 127.0.10.1}}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sleep, namespace: default}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: default, labels: {{app: sleep}}}}
spec:
  nodeName: node-1
  serviceAccountName: sleep
  containers: [{{name: sleep, image: sleep}}]
status: {{podIP: {sleep_ip}, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: httpbin, namespace: default, labels: {{app: httpbin}}}}
spec:
  nodeName: node-2
  serviceAccountName: httpbin
  containers: [{{name: httpbin, image: httpbin}}]
status: {{podIP: 127.0.20.2, phase: Running}}
"""


def write_manifest(config_dir: Path, sleep_ip: str) -> None:
    """Replace the file atomically (new inode), as an editor or kubectl would."""
    tmp = config_dir / ".mesh.yaml.tmp"
    tmp.write_text(MANIFEST.format(sleep_ip=sleep_ip))
    os.replace(tmp, config_dir / "mesh.yaml")


def auth(node: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[node]}"}


@pytest.fixture
def istiod_config(tmp_path: Path, loopback: Any) -> IstiodConfig:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_manifest(config_dir, "127.0.20.1")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(json.dumps(TOKENS))
    return IstiodConfig(
        config_dir=config_dir,
        state_dir=tmp_path / "state",
        bootstrap_tokens=tokens,
        listen_host=loopback.new(),
        poll_interval=0.05,
    )


def client_for(running: RunningIstiod) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(running.root_cert_path))
    return httpx.AsyncClient(
        http2=True, verify=context, base_url=running.url, timeout=httpx.Timeout(5.0)
    )


@pytest.fixture
async def istiod(
    nursery: trio.Nursery, istiod_config: IstiodConfig
) -> AsyncIterator[RunningIstiod]:
    running: RunningIstiod = await nursery.start(run_istiod, istiod_config)
    yield running
    running.shutdown()


@pytest.fixture
async def client(istiod: RunningIstiod) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(istiod) as client:
        yield client


async def next_update(lines: AsyncIterator[str]) -> DeltaUpdate:
    with trio.fail_after(5):
        line = await anext(lines)
    return codec.from_jsonable(DeltaUpdate, json.loads(line))


def resource_keys(update: DeltaUpdate) -> set[str]:
    return {versioned_key(r.kind, r.name) for r in update.resources}


def versions_of(update: DeltaUpdate) -> dict[str, str]:
    return {versioned_key(r.kind, r.name): r.version for r in update.resources}


async def syncz(
    client: httpx.AsyncClient, caller: str = OPERATOR_PRINCIPAL
) -> list[dict[str, Any]]:
    """The streams ``caller`` may see (every one, for the default operator)."""
    response = await client.get("/debug/syncz", headers=auth(caller))
    assert response.status_code == 200
    subscribers: list[dict[str, Any]] = response.json()["subscribers"]
    return subscribers


# -- discovery -------------------------------------------------------------------------------


async def test_stream_follows_file_edits_and_records_acks(
    istiod: RunningIstiod, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/ready")).status_code == 200
    # The stream gets its own connection: httpcore does not reset an HTTP/2 stream it stops
    # reading, so closing the connection is how this client tells the server it is gone.
    async with client_for(istiod) as streaming, streaming.stream(
        "POST", DISCOVERY_PATH, json={"node": "node-1"}, headers=auth("node-1")
    ) as response:
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["content-encoding"] == "deflate"  # httpx asks for it
        lines = response.aiter_lines()
        first = await next_update(lines)
        assert {f"workload/{SLEEP_UID}", f"workload/{HTTPBIN_UID}", "node/node-1"} <= (
            resource_keys(first)
        )
        sleep = next(r for r in first.resources if r.name == SLEEP_UID)
        assert sleep.resource["addresses"] == ["127.0.20.1"]

        write_manifest(istiod.config.config_dir, "127.0.20.9")
        second = await next_update(lines)
        assert resource_keys(second) == {f"workload/{SLEEP_UID}"}
        assert second.resources[0].resource["addresses"] == ["127.0.20.9"]
        assert second.system_version > first.system_version
        assert second.nonce != first.nonce

        ack = await client.post(
            ACK_PATH, json={"node": "node-1", "nonce": first.nonce}, headers=auth("node-1")
        )
        assert ack.status_code == 204
        nack = await client.post(
            ACK_PATH,
            json={"node": "node-1", "nonce": second.nonce, "error": "cannot apply"},
            headers=auth("node-1"),
        )
        assert nack.status_code == 204
        [status] = await syncz(client)
        assert status["node"] == "node-1"
        assert status["last_sent_nonce"] == second.nonce
        assert status["last_acked_nonce"] == first.nonce
        assert status["last_nack_nonce"] == second.nonce
        assert status["last_nack_error"] == "cannot apply"

    # The client went away: the server saw the disconnect and unsubscribed it.
    with trio.fail_after(5):
        while await syncz(client):
            await trio.sleep(0.02)


async def test_cluster_id_reaches_every_workload_and_the_proxies_metric_labels(
    istiod_config: IstiodConfig,
) -> None:
    """``--cluster-id`` names the cluster in every Workload (uid and ``cluster_id``) and
    Node, so the proxies' metrics report it as source and destination cluster."""
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_istiod, replace(istiod_config, cluster_id="east"))
        async with client_for(running) as streaming, streaming.stream(
            "POST", DISCOVERY_PATH, json={"node": "node-1"}, headers=auth("node-1")
        ) as response:
            first = await next_update(response.aiter_lines())
        running.shutdown()
    decoded = [codec.from_jsonable(kinds.TYPE_BY_KIND[r.kind], r.resource)
               for r in first.resources]
    workloads = {w.name: w for w in decoded if isinstance(w, Workload)}
    assert set(workloads) == {"sleep", "httpbin"}
    assert {w.uid for w in workloads.values()} == {
        "east//Pod/default/sleep", "east//Pod/default/httpbin"
    }
    assert {r.cluster_id for r in decoded if isinstance(r, Workload | Node)} == {"east"}
    labels = connection_labels(
        "source", workloads["sleep"], None, workloads["httpbin"], None, mtls=True
    )
    assert (labels.source_cluster, labels.destination_cluster) == ("east", "east")


async def test_stream_is_plain_ndjson_or_deflate_as_the_client_asks(
    istiod: RunningIstiod,
) -> None:
    """Two clients, one refusing compression: the same updates, one compressed on the wire."""
    raw: dict[str, bytes] = {}
    for encoding in ("identity", "deflate"):
        async with client_for(istiod) as streaming, streaming.stream(
            "POST", DISCOVERY_PATH, json={"node": "node-1"},
            headers={**auth("node-1"), "accept-encoding": encoding},
        ) as response:
            assert response.headers.get("content-encoding", "identity") == encoding
            with trio.fail_after(5):
                async for chunk in response.aiter_raw():
                    raw[encoding] = raw.get(encoding, b"") + chunk
                    if encoding == "identity" and raw[encoding].endswith(b"\n"):
                        break
                    if encoding == "deflate" and zlib.decompressobj().decompress(
                        raw[encoding]).endswith(b"\n"):
                        break
    plain = json.loads(raw["identity"])
    decoded = json.loads(zlib.decompressobj().decompress(raw["deflate"]))
    assert plain["resources"] and plain["resources"] == decoded["resources"]
    assert raw["deflate"][:2] == b"\x78\x9c"  # a zlib stream, as Content-Encoding: deflate


async def test_resume_after_restart_gets_only_what_changed(
    istiod_config: IstiodConfig,
) -> None:
    async with trio.open_nursery() as nursery:
        running: RunningIstiod = await nursery.start(run_istiod, istiod_config)
        root_before = running.root_cert_path.read_text()
        async with client_for(running) as client, client.stream(
            "POST", DISCOVERY_PATH, json={"node": "node-2"}, headers=auth("node-2")
        ) as response:
            held = versions_of(await next_update(response.aiter_lines()))
        running.shutdown()

    # While istiod is down, the sleep pod moves; a restarted istiod on the same state dir
    # keeps its root and sends the resuming proxy only that pod.
    write_manifest(istiod_config.config_dir, "127.0.20.5")
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_istiod, istiod_config)
        assert running.root_cert_path.read_text() == root_before
        async with client_for(running) as client:
            request = {"node": "node-2", "initial_resource_versions": held}
            async with client.stream(
                "POST", DISCOVERY_PATH, json=request, headers=auth("node-2")
            ) as response:
                update = await next_update(response.aiter_lines())
                assert resource_keys(update) == {f"workload/{SLEEP_UID}"}
                assert update.removed == ()
            # A proxy holding something that is gone is told to remove it.
            gone = {**held, "workload/Kubernetes//Pod/default/gone": "0123"}
            request = {"node": "node-2", "initial_resource_versions": gone}
            async with client.stream(
                "POST", DISCOVERY_PATH, json=request, headers=auth("node-2")
            ) as response:
                update = await next_update(response.aiter_lines())
                assert [r.name for r in update.removed] == ["Kubernetes//Pod/default/gone"]
        running.shutdown()


async def test_shutdown_ends_open_streams_cleanly(istiod_config: IstiodConfig) -> None:
    async with trio.open_nursery() as nursery:
        running: RunningIstiod = await nursery.start(run_istiod, istiod_config)
        async with client_for(running) as client, client.stream(
            "POST", DISCOVERY_PATH, json={"node": "node-1"}, headers=auth("node-1")
        ) as response:
            lines = response.aiter_lines()
            await next_update(lines)
            running.shutdown()
            with trio.fail_after(5):
                remaining = [line async for line in lines]
            assert remaining == []


async def test_discovery_authentication_and_node_checks(client: httpx.AsyncClient) -> None:
    wrong = await client.post(
        DISCOVERY_PATH, json={"node": "node-1"}, headers={"authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    assert "unknown bootstrap token" in wrong.json()["error"]
    missing = await client.post(DISCOVERY_PATH, json={"node": "node-1"})
    assert missing.status_code == 401
    mismatch = await client.post(DISCOVERY_PATH, json={"node": "node-2"}, headers=auth("node-1"))
    assert mismatch.status_code == 403
    assert "node-1" in mismatch.json()["error"]
    bad_key = await client.post(
        DISCOVERY_PATH,
        json={"node": "node-1", "initial_resource_versions": {"bogus": "1"}},
        headers=auth("node-1"),
    )
    assert bad_key.status_code == 400
    assert "bogus" in bad_key.json()["error"]
    nack_for_other = await client.post(
        ACK_PATH, json={"node": "node-2", "nonce": "x"}, headers=auth("node-1")
    )
    assert nack_for_other.status_code == 403


async def test_bad_requests_get_clear_errors(client: httpx.AsyncClient) -> None:
    garbage = await client.post(DISCOVERY_PATH, content=b"{not json", headers=auth("node-1"))
    assert garbage.status_code == 400
    assert "not valid JSON" in garbage.json()["error"]
    contract = await client.post(DISCOVERY_PATH, json={"nodes": "x"}, headers=auth("node-1"))
    assert contract.status_code == 400
    assert "missing required field 'node'" in contract.json()["error"]
    too_big = await client.post(
        CERTIFICATE_PATH, content=b"x" * (65 * 1024), headers=auth("node-1")
    )
    assert too_big.status_code == 413
    unknown = await client.get("/v2/nothing")
    assert unknown.status_code == 404
    assert "/v2/nothing" in unknown.json()["error"]
    wrong_method = await client.get(DISCOVERY_PATH)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"


# -- certificates ----------------------------------------------------------------------------


async def test_csr_for_a_local_service_account_is_signed(
    istiod: RunningIstiod, client: httpx.AsyncClient
) -> None:
    key, csr = new_key_and_csr("spiffe://cluster.local/ns/default/sa/sleep")
    response = await client.post(
        CERTIFICATE_PATH, json={"csr": csr, "ttl_seconds": 3600}, headers=auth("node-1")
    )
    assert response.status_code == 200, response.text
    answer = codec.from_jsonable(CertificateResponse, response.json())
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in answer.cert_chain]
    root = x509.load_pem_x509_certificate(istiod.root_cert_path.read_bytes())
    assert len(chain) == 2
    assert chain[-1] == root
    chain[0].verify_directly_issued_by(root)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert chain[0].public_key() == key.public_key()
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/sleep"
    ]
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime.total_seconds() <= 3600 + 120
    assert list(answer.trust_bundle) == [istiod.root_cert_path.read_text()]


async def test_csr_for_a_service_account_elsewhere_is_refused(client: httpx.AsyncClient) -> None:
    _key, csr = new_key_and_csr("spiffe://cluster.local/ns/default/sa/httpbin")
    response = await client.post(CERTIFICATE_PATH, json={"csr": csr}, headers=auth("node-1"))
    assert response.status_code == 403
    assert "no instances of default/httpbin on node node-1" in response.json()["error"]
    # ...while the node that runs it may have it.
    ok = await client.post(CERTIFICATE_PATH, json={"csr": csr}, headers=auth("node-2"))
    assert ok.status_code == 200


async def test_csr_errors(client: httpx.AsyncClient) -> None:
    malformed = await client.post(
        CERTIFICATE_PATH, json={"csr": "-----BEGIN CERTIFICATE REQUEST-----\nxx"},
        headers=auth("node-1"),
    )
    assert malformed.status_code == 400
    assert "CSR rejected" in malformed.json()["error"]
    garbage = await client.post(CERTIFICATE_PATH, content=b"]]", headers=auth("node-1"))
    assert garbage.status_code == 400
    _key, csr = new_key_and_csr("spiffe://cluster.local/ns/default/sa/sleep")
    unauthenticated = await client.post(
        CERTIFICATE_PATH, json={"csr": csr}, headers={"authorization": "Bearer wrong-token"}
    )
    assert unauthenticated.status_code == 401
    foreign = new_key_and_csr("spiffe://other.domain/ns/default/sa/sleep")[1]
    refused = await client.post(CERTIFICATE_PATH, json={"csr": foreign}, headers=auth("node-1"))
    assert refused.status_code == 403


# -- waypoint (service-account) callers -------------------------------------------------------


async def test_service_account_caller_obtains_only_its_own_identity(
    client: httpx.AsyncClient,
) -> None:
    _key, own = new_key_and_csr("spiffe://cluster.local/ns/default/sa/waypoint")
    response = await client.post(
        CERTIFICATE_PATH, json={"csr": own}, headers=auth(WAYPOINT_PRINCIPAL)
    )
    assert response.status_code == 200, response.text
    answer = codec.from_jsonable(CertificateResponse, response.json())
    leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/waypoint"
    ]
    # Not even an identity that does run in the mesh (sleep, on node-1).
    _key, other = new_key_and_csr("spiffe://cluster.local/ns/default/sa/sleep")
    refused = await client.post(
        CERTIFICATE_PATH, json={"csr": other}, headers=auth(WAYPOINT_PRINCIPAL)
    )
    assert refused.status_code == 403
    assert refused.json()["error"] == (
        "caller spiffe://cluster.local/ns/default/sa/waypoint may only obtain its own "
        "identity, not spiffe://cluster.local/ns/default/sa/sleep"
    )
    # ...and a node's ztunnel cannot obtain the waypoint's identity (no such workload).
    by_node = await client.post(CERTIFICATE_PATH, json={"csr": own}, headers=auth("node-1"))
    assert by_node.status_code == 403
    assert "no instances of default/waypoint on node node-1" in by_node.json()["error"]


async def test_waypoint_subscribes_to_all_kinds_and_ztunnels_do_not_see_l7(
    istiod: RunningIstiod, client: httpx.AsyncClient
) -> None:
    policy = WaypointAuthorization(
        name="deny-admin",
        namespace="default",
        action=WaypointAuthorizationAction.DENY,
        targets=("waypoint:default/waypoint",),
    )
    istiod.store.replace_all([*istiod.store.resources(), policy])
    policy_key = "waypointauthorization/default/deny-admin"
    request = {"node": WAYPOINT_PRINCIPAL, "kinds": sorted(kinds.ALL_KINDS)}
    async with client_for(istiod) as streaming:
        async with streaming.stream(
            "POST", DISCOVERY_PATH, json=request, headers=auth(WAYPOINT_PRINCIPAL)
        ) as response:
            assert response.status_code == 200
            update = await next_update(response.aiter_lines())
            assert {policy_key, f"workload/{SLEEP_UID}"} <= resource_keys(update)
            sent = next(r for r in update.resources if r.kind == "waypointauthorization")
            assert codec.from_jsonable(WaypointAuthorization, sent.resource) == policy
            [status] = await syncz(client)
            assert status["node"] == WAYPOINT_PRINCIPAL
            assert status["kinds"] == sorted(kinds.ALL_KINDS)
            ack = await client.post(
                ACK_PATH, json={"node": WAYPOINT_PRINCIPAL, "nonce": update.nonce},
                headers=auth(WAYPOINT_PRINCIPAL),
            )
            assert ack.status_code == 204
        async with streaming.stream(
            "POST", DISCOVERY_PATH, json={"node": "node-1"}, headers=auth("node-1")
        ) as response:
            update = await next_update(response.aiter_lines())
            assert f"workload/{SLEEP_UID}" in resource_keys(update)
            assert {r.kind for r in update.resources} <= kinds.L4_KINDS


async def test_service_account_and_kinds_checks(client: httpx.AsyncClient) -> None:
    as_node = await client.post(
        DISCOVERY_PATH, json={"node": "node-1"}, headers=auth(WAYPOINT_PRINCIPAL)
    )
    assert as_node.status_code == 403
    assert as_node.json()["error"] == (
        "caller is authenticated as service account default/waypoint but asked for node "
        "'node-1' (it may only use 'serviceaccount:default/waypoint')"
    )
    as_waypoint = await client.post(
        DISCOVERY_PATH, json={"node": WAYPOINT_PRINCIPAL}, headers=auth("node-1")
    )
    assert as_waypoint.status_code == 403
    ack_as_node = await client.post(
        ACK_PATH, json={"node": "node-1", "nonce": "x"}, headers=auth(WAYPOINT_PRINCIPAL)
    )
    assert ack_as_node.status_code == 403
    unknown = await client.post(
        DISCOVERY_PATH,
        json={"node": WAYPOINT_PRINCIPAL, "kinds": ["httproute", "virtualservice", "pod"]},
        headers=auth(WAYPOINT_PRINCIPAL),
    )
    assert unknown.status_code == 400
    assert "unknown kinds 'pod', 'virtualservice'" in unknown.json()["error"]
    unsubscribed = await client.post(
        DISCOVERY_PATH,
        json={"node": "node-1", "initial_resource_versions": {"httproute/default/x": "1"}},
        headers=auth("node-1"),
    )
    assert unsubscribed.status_code == 400
    assert "kind 'httproute' is not among the subscribed kinds" in unsubscribed.json()["error"]


async def test_ca_plugin_dir_and_bad_startup(istiod_config: IstiodConfig, tmp_path: Path) -> None:
    from istiod_lite.__main__ import StartupError

    broken = replace(istiod_config, ca_plugin_dir=tmp_path / "missing-plugin")
    with pytest.raises(StartupError, match="cannot load the CA"):
        await run_istiod(broken)


async def test_process_serves_until_sigterm(istiod_config: IstiodConfig) -> None:
    """``python -m istiod_lite`` starts, serves, and exits 0 on SIGTERM."""
    argv = [
        sys.executable, "-m", "istiod_lite",
        "--config-dir", str(istiod_config.config_dir),
        "--state-dir", str(istiod_config.state_dir),
        "--bootstrap-tokens", str(istiod_config.bootstrap_tokens),
        "--listen", istiod_config.listen,
        "--log-format", "json",
    ]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    try:
        root = istiod_config.state_dir / "root-cert.pem"
        with trio.fail_after(20):
            while True:
                if root.exists():
                    context = ssl.create_default_context(cafile=str(root))
                    try:
                        async with httpx.AsyncClient(http2=True, verify=context) as client:
                            url = f"https://{istiod_config.listen}/ready"
                            if (await client.get(url)).status_code == 200:
                                break
                    except httpx.TransportError:
                        pass
                await trio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    log_lines = (await process.stderr.receive_some(1 << 20)).decode().splitlines()
    events = [json.loads(line)["event"] for line in log_lines if line.startswith("{")]
    assert "istiod_lite ready" in events
    assert "istiod_lite stopped" in events


async def test_process_rejects_unknown_flags_and_bad_files(tmp_path: Path) -> None:
    required = [
        "--config-dir", str(tmp_path), "--state-dir", str(tmp_path / "state"),
        "--bootstrap-tokens", str(tmp_path / "absent.yaml"), "--log-format", "json",
    ]
    base = [sys.executable, "-m", "istiod_lite", *required]
    result = await trio.run_process([*base, "--bogus"], capture_stderr=True, check=False)
    assert result.returncode == 2
    assert b"unrecognized arguments: --bogus" in result.stderr
    result = await trio.run_process(base, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert b"--bootstrap-tokens" in result.stderr
    assert b"absent.yaml: cannot read" in result.stderr
