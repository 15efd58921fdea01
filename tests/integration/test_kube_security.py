"""istiod_lite's Kubernetes security pieces against the API stand-in, through the real
``kubernetes`` client: TokenReview authentication (driving the real IstiodApp over TLS), the
CA's Secrets, and the root ConfigMap publication."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from kubernetes import client as k8s

import istiod_lite.kube.cakeys as cakeys
from ambient_api.discovery import ACK_PATH, CERTIFICATE_PATH
from ambient_api.identity import SpiffeId
from istiod_lite.auth import AuthenticationError, Caller
from istiod_lite.ca import (
    CaConfigError,
    CertificateAuthority,
    new_self_signed_root,
    self_signed_plugin_files,
)
from istiod_lite.discovery import ResourceStore
from istiod_lite.kube.cakeys import load_or_create_ca
from istiod_lite.kube.client import build_api_client
from istiod_lite.kube.rootcert import ROOT_CERT_KEY, ROOT_CONFIGMAP, RootCertPublisher
from istiod_lite.kube.tokenreview import TokenReviewAuthenticator
from istiod_lite.server import IstiodApp, hypercorn_config, serve
from tests.integration.control_plane_servers import workload, write_serving_cert
from tests.kube.apiserver import FakeKubeApiServer, TokenReviewAnswer
from tests.pki import TestPki, new_key_and_csr

ZTUNNEL_TOKEN = "ztunnel-node-1-projected-token"
WAYPOINT_TOKEN = "waypoint-projected-token"
WRONG_AUDIENCE_TOKEN = "token-for-the-api-server"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture
async def apiserver(nursery: trio.Nursery, loopback: Any) -> FakeKubeApiServer:
    server: FakeKubeApiServer = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    return server


@pytest.fixture
def api_client(apiserver: FakeKubeApiServer, tmp_path: Path) -> Iterator[k8s.ApiClient]:
    kubeconfig = tmp_path / "kubeconfig"
    apiserver.write_kubeconfig(kubeconfig)
    client = build_api_client(kubeconfig=kubeconfig)
    yield client
    client.close()


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


def pod(name: str, ns: str, sa: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running"},
    }


def review_requests(apiserver: FakeKubeApiServer) -> int:
    return sum(1 for method, path, _ in apiserver.requests
               if method == "POST" and path.endswith("/tokenreviews"))


@pytest.fixture
def cluster(apiserver: FakeKubeApiServer) -> FakeKubeApiServer:
    """The ztunnel of node-1 with its bound token, a waypoint account's token, and one
    token for another audience."""
    for name in ("istio-system", "demo"):
        apiserver.apply(namespace(name))
    ztunnel = apiserver.apply(pod("ztunnel-x1", "istio-system", "ztunnel", "node-1"))
    apiserver.token_reviews[ZTUNNEL_TOKEN] = TokenReviewAnswer(
        username="system:serviceaccount:istio-system:ztunnel",
        audiences=("istio-ca",),
        pod_name="ztunnel-x1",
        pod_uid=ztunnel["metadata"]["uid"],
    )
    apiserver.token_reviews[WAYPOINT_TOKEN] = TokenReviewAnswer(
        username="system:serviceaccount:demo:waypoint", audiences=("istio-ca",)
    )
    apiserver.token_reviews[WRONG_AUDIENCE_TOKEN] = TokenReviewAnswer(
        username="system:serviceaccount:demo:sleep", audiences=("https://kubernetes.default.svc",)
    )
    return apiserver


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- TokenReview through the real server -----------------------------------------------------


@pytest.fixture
async def istiod(
    nursery: trio.Nursery, cluster: FakeKubeApiServer, api_client: k8s.ApiClient,
    tmp_path: Path, loopback: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    pki = TestPki()
    store = ResourceStore()
    store.replace_all([
        workload("sleep", "node-1", namespace="demo", address="127.0.20.1"),
        workload("httpbin", "node-2", namespace="demo", address="127.0.20.2"),
    ])
    app = IstiodApp(store, pki.ca, TokenReviewAuthenticator(api_client))
    address = loopback.new()
    certfile, keyfile = write_serving_cert(pki, tmp_path, address)
    await nursery.start(serve, app, hypercorn_config(address, 15012, certfile, keyfile,
                                                     graceful_timeout=0.2))
    context = ssl.create_default_context(cadata="".join(pki.trust_bundle))
    async with httpx.AsyncClient(http2=True, verify=context, base_url=f"https://{address}:15012",
                                 timeout=5.0) as client:
        yield client
    app.begin_shutdown()


async def request_certificate(
    client: httpx.AsyncClient, token: str, ns: str, sa: str
) -> httpx.Response:
    _, csr = new_key_and_csr(str(SpiffeId("cluster.local", ns, sa)))
    return await client.post(CERTIFICATE_PATH, json={"csr": csr}, headers=bearer(token))


async def test_node_agent_gets_certificates_only_for_pods_on_its_pods_node(
    istiod: httpx.AsyncClient,
) -> None:
    allowed = await request_certificate(istiod, ZTUNNEL_TOKEN, "demo", "sleep")
    assert allowed.status_code == 200, allowed.text
    refused = await request_certificate(istiod, ZTUNNEL_TOKEN, "demo", "httpbin")
    assert refused.status_code == 403
    assert refused.json()["error"] == "no instances of demo/httpbin on node node-1"
    # It speaks for node-1, its pod's node, and no other.
    ack = await istiod.post(ACK_PATH, json={"node": "node-2", "nonce": "n"},
                            headers=bearer(ZTUNNEL_TOKEN))
    assert ack.status_code == 403
    assert "node 'node-1'" in ack.json()["error"]


async def test_service_account_caller_gets_only_its_own_identity(
    istiod: httpx.AsyncClient,
) -> None:
    own = await request_certificate(istiod, WAYPOINT_TOKEN, "demo", "waypoint")
    assert own.status_code == 200, own.text
    other = await request_certificate(istiod, WAYPOINT_TOKEN, "demo", "sleep")
    assert other.status_code == 403
    assert "may only obtain its own identity" in other.json()["error"]


async def test_unknown_and_wrong_audience_tokens_are_unauthenticated(
    istiod: httpx.AsyncClient,
) -> None:
    unknown = await request_certificate(istiod, "no-such-token", "demo", "sleep")
    assert unknown.status_code == 401
    assert "token rejected by the API server" in unknown.json()["error"]
    wrong = await request_certificate(istiod, WRONG_AUDIENCE_TOKEN, "demo", "sleep")
    assert wrong.status_code == 401


# -- TokenReview, the authenticator alone ----------------------------------------------------


async def test_node_caller_follows_the_pod_and_answers_are_cached(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    authenticator = TokenReviewAuthenticator(api_client, cache_ttl=60.0)
    with structlog.testing.capture_logs() as logs:
        caller = await authenticator.authenticate(bearer(ZTUNNEL_TOKEN))
        assert caller == Caller(node="node-1", method="token-review")
        reviews = review_requests(cluster)
        assert await authenticator.authenticate(bearer(ZTUNNEL_TOKEN)) == caller
        assert review_requests(cluster) == reviews  # served from the cache
    assert ZTUNNEL_TOKEN not in repr(logs)


async def test_service_account_caller_in_the_configured_trust_domain(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    authenticator = TokenReviewAuthenticator(api_client, trust_domain="mesh.example")
    caller = await authenticator.authenticate(bearer(WAYPOINT_TOKEN))
    assert caller.service_account == SpiffeId("mesh.example", "demo", "waypoint")
    assert caller.principal == "serviceaccount:demo/waypoint"


async def test_wrong_audience_and_unknown_tokens_say_why(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    authenticator = TokenReviewAuthenticator(api_client)
    with pytest.raises(AuthenticationError, match="token rejected by the API server"):
        await authenticator.authenticate(bearer(WRONG_AUDIENCE_TOKEN))
    with pytest.raises(AuthenticationError, match="token rejected by the API server"):
        await authenticator.authenticate(bearer("never-issued"))
    # Asking for the audience the token has is what makes it pass.
    other = TokenReviewAuthenticator(api_client, audiences=("https://kubernetes.default.svc",))
    caller = await other.authenticate(bearer(WRONG_AUDIENCE_TOKEN))
    assert caller.principal == "serviceaccount:demo/sleep"


async def test_node_agent_whose_pod_is_gone_is_refused(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    cluster.delete("pods", "ztunnel-x1", namespace="istio-system")
    authenticator = TokenReviewAuthenticator(api_client)
    with pytest.raises(AuthenticationError, match="pod istio-system/ztunnel-x1 .* not found"):
        await authenticator.authenticate(bearer(ZTUNNEL_TOKEN))


async def test_untrusted_ztunnel_account_is_only_a_service_account(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    authenticator = TokenReviewAuthenticator(
        api_client, trusted_node_accounts=frozenset({"kube-system/node-agent"})
    )
    caller = await authenticator.authenticate(bearer(ZTUNNEL_TOKEN))
    assert caller.node is None
    assert caller.principal == "serviceaccount:istio-system/ztunnel"


async def test_api_server_failure_is_an_authentication_error_and_not_cached(
    cluster: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    authenticator = TokenReviewAuthenticator(api_client)
    cluster.fail_next(1, status=500)
    with pytest.raises(AuthenticationError, match="TokenReview failed: 500") as failure:
        await authenticator.authenticate(bearer(WAYPOINT_TOKEN))
    assert str(failure.value).endswith("(create_token_review)")  # the error names the call
    caller = await authenticator.authenticate(bearer(WAYPOINT_TOKEN))
    assert caller.principal == "serviceaccount:demo/waypoint"


# -- CA keys in Secrets ----------------------------------------------------------------------


def stored_secret(apiserver: FakeKubeApiServer, name: str) -> dict[str, Any]:
    secret = apiserver.get("secrets", name, namespace="istio-system")
    assert secret is not None, f"Secret istio-system/{name} does not exist"
    return secret


def secret_posts(apiserver: FakeKubeApiServer) -> int:
    return sum(1 for method, path, _ in apiserver.requests
               if method == "POST" and path.endswith("/secrets"))


def secret_data(apiserver: FakeKubeApiServer, name: str) -> dict[str, str]:
    secret = stored_secret(apiserver, name)
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


async def test_self_signed_root_is_created_once_and_reloaded(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    apiserver.apply(namespace("istio-system"))
    first = await load_or_create_ca(api_client, trust_domain="cluster.local")
    stored = stored_secret(apiserver, "istio-ca-secret")
    assert stored["type"] == "istio.io/ca-root"
    data = secret_data(apiserver, "istio-ca-secret")
    assert set(data) == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem", "key.pem"}
    assert data["root-cert.pem"] == data["ca-cert.pem"] == first.trust_bundle[0]

    again = await load_or_create_ca(api_client, trust_domain="cluster.local")
    assert secret_posts(apiserver) == 1
    assert again.root == first.root
    assert again.trust_bundle == first.trust_bundle
    with pytest.raises(CaConfigError, match="trust domain 'cluster.local', not 'other.td'"):
        await load_or_create_ca(api_client, trust_domain="other.td")


async def test_two_replicas_starting_together_share_one_root(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    apiserver.apply(namespace("istio-system"))
    results: list[CertificateAuthority] = []

    async def start_replica() -> None:
        results.append(await load_or_create_ca(api_client, trust_domain="cluster.local"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_replica)
        nursery.start_soon(start_replica)
    stored = secret_data(apiserver, "istio-ca-secret")["ca-cert.pem"]
    assert [ca.trust_bundle[0] for ca in results] == [stored, stored]


async def test_replica_losing_the_create_race_uses_the_winners_root(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    apiserver.apply(namespace("istio-system"))
    winner_root, winner_key = new_self_signed_root("cluster.local")
    winner_files = self_signed_plugin_files(winner_root, winner_key)

    def generate_while_the_other_replica_wins(*args: Any, **kwargs: Any) -> Any:
        # The other replica creates the Secret between our GET (404) and our POST.
        body = cakeys.self_signed_secret_body("istio-system", winner_files)
        apiserver.apply(k8s.ApiClient().sanitize_for_serialization(body))
        return new_self_signed_root(*args, **kwargs)

    monkeypatch.setattr(cakeys, "new_self_signed_root", generate_while_the_other_replica_wins)
    ca = await load_or_create_ca(api_client, trust_domain="cluster.local")
    assert secret_posts(apiserver) == 1  # ours, answered 409
    assert ca.root == winner_root
    assert secret_data(apiserver, "istio-ca-secret")["ca-cert.pem"] == ca.trust_bundle[0]


def plugin_secret(files: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": "istio-system"},
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in files.items()},
    }


async def test_plugin_cacerts_secret_wins_and_is_validated(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    apiserver.apply(namespace("istio-system"))
    root, key = new_self_signed_root("cluster.local")
    files = self_signed_plugin_files(root, key)
    apiserver.apply(plugin_secret(files))
    ca = await load_or_create_ca(api_client, trust_domain="cluster.local")
    assert ca.root == root
    assert secret_posts(apiserver) == 0  # no self-signed Secret was created

    other_key = self_signed_plugin_files(*new_self_signed_root("cluster.local"))["ca-key.pem"]
    apiserver.apply(plugin_secret({**files, "ca-key.pem": other_key}))
    with pytest.raises(
        CaConfigError,
        match="Secret istio-system/cacerts key ca-key.pem: the key does not match "
        "Secret istio-system/cacerts key ca-cert.pem",
    ):
        await load_or_create_ca(api_client, trust_domain="cluster.local")


# -- root ConfigMap --------------------------------------------------------------------------


def root_configmap(apiserver: FakeKubeApiServer, ns: str) -> dict[str, Any] | None:
    found = [cm for cm in apiserver.objects("configmaps", namespace=ns)
             if cm["metadata"]["name"] == ROOT_CONFIGMAP]
    return found[0] if found else None


def source_namespaces(apiserver: FakeKubeApiServer) -> dict[str, dict[str, Any]]:
    """What the Kubernetes source would hand over: Namespaces by name."""
    return {ns["metadata"]["name"]: ns for ns in apiserver.objects("namespaces")}


async def test_root_is_published_to_enrolled_namespaces_only(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    apiserver.apply(namespace("demo", AMBIENT))
    apiserver.apply(namespace("plain"))
    root_pem = TestPki().trust_bundle[0]
    publisher = RootCertPublisher(api_client, [root_pem])
    result = await publisher.reconcile(source_namespaces(apiserver))
    assert result.created == ["demo"] and not result.failed
    published = root_configmap(apiserver, "demo")
    assert published is not None
    assert published["data"] == {ROOT_CERT_KEY: root_pem}
    assert published["metadata"]["labels"] == {"istio.io/config": "true"}
    assert root_configmap(apiserver, "plain") is None

    # Enrolling a namespace publishes there at the next reconcile; a second pass is a no-op.
    apiserver.apply(namespace("plain", AMBIENT))
    result = await publisher.reconcile(source_namespaces(apiserver))
    assert result.created == ["plain"] and result.unchanged == ["demo"]
    writes_before = len(apiserver.requests)
    result = await publisher.reconcile()
    assert result.unchanged == ["demo", "plain"]
    assert len(apiserver.requests) == writes_before + 1  # just the LIST


async def test_edited_or_deleted_configmaps_are_repaired_by_the_resync(
    nursery: trio.Nursery, apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    for name in ("demo", "other"):
        apiserver.apply(namespace(name, AMBIENT))
    root_pem = TestPki().trust_bundle[0]
    publisher = RootCertPublisher(api_client, [root_pem], resync_interval=0.05)
    await publisher.reconcile(source_namespaces(apiserver))
    await nursery.start(publisher.run)

    edited = root_configmap(apiserver, "demo")
    assert edited is not None
    edited["data"] = {ROOT_CERT_KEY: "tampered"}
    apiserver.apply(edited)
    apiserver.delete("configmaps", ROOT_CONFIGMAP, namespace="other")

    with trio.fail_after(5):
        while True:
            demo, other = root_configmap(apiserver, "demo"), root_configmap(apiserver, "other")
            if demo and other and demo["data"][ROOT_CERT_KEY] == other["data"][ROOT_CERT_KEY] \
                    == root_pem:
                break
            await trio.sleep(0.02)


async def test_namespace_missing_from_the_api_server_is_reported_not_fatal(
    apiserver: FakeKubeApiServer, api_client: k8s.ApiClient
) -> None:
    apiserver.apply(namespace("demo", AMBIENT))
    namespaces = {**source_namespaces(apiserver), "ghost": namespace("ghost", AMBIENT)}
    publisher = RootCertPublisher(api_client, [TestPki().trust_bundle[0]])
    result = await publisher.reconcile(namespaces)
    assert result.created == ["demo"]
    assert set(result.failed) == {"ghost"} and "404" in result.failed["ghost"]
