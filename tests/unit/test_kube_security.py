"""The sans-IO halves of istiod_lite's Kubernetes security pieces: what a TokenReview answer and
a node agent's pod mean, the token cache, the CA Secrets' layouts and the root ConfigMap plan."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from istiod_lite.auth import AuthenticationError
from istiod_lite.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    CaConfigError,
    CertificateAuthority,
    new_self_signed_root,
    self_signed_plugin_files,
)
from istiod_lite.kube.cakeys import (
    SELF_SIGNED_SECRET,
    SELF_SIGNED_SECRET_TYPE,
    decode_secret_data,
    self_signed_secret_body,
    self_signed_secret_files,
)
from istiod_lite.kube.rootcert import (
    ROOT_CERT_KEY,
    ConfigMapAction,
    configmap_is_current,
    is_enrolled,
    plan_root_configmaps,
    wanted_namespaces,
)
from istiod_lite.kube.tokenreview import (
    ReviewedToken,
    TtlCache,
    node_of_pod,
    parse_token_review,
    parse_trusted_node_accounts,
    token_key,
)

AUDIENCES = ("istio-ca",)


def review(
    *,
    authenticated: bool = True,
    username: str = "system:serviceaccount:istio-system:ztunnel",
    audiences: list[str] | None = None,
    extra: dict[str, list[str]] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"authenticated": authenticated}
    if authenticated:
        status["user"] = {
            "username": username,
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": extra
            if extra is not None
            else {
                "authentication.kubernetes.io/pod-name": ["ztunnel-abcde"],
                "authentication.kubernetes.io/pod-uid": ["uid-1"],
            },
        }
        status["audiences"] = ["istio-ca"] if audiences is None else audiences
    if error is not None:
        status["error"] = error
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


# -- TokenReview answers ---------------------------------------------------------------------


def test_bound_service_account_token_names_account_and_pod() -> None:
    token = parse_token_review(review(), audiences=AUDIENCES)
    assert token == ReviewedToken("istio-system", "ztunnel", "ztunnel-abcde", "uid-1")
    assert token.account == "istio-system/ztunnel"


def test_token_without_pod_binding_has_no_pod() -> None:
    token = parse_token_review(
        review(username="system:serviceaccount:demo:waypoint", extra={}), audiences=AUDIENCES
    )
    assert token == ReviewedToken("demo", "waypoint", None, None)


def test_unauthenticated_token_carries_the_api_servers_reason() -> None:
    with pytest.raises(AuthenticationError, match="token rejected by the API server: expired"):
        parse_token_review(review(authenticated=False, error="expired"), audiences=AUDIENCES)
    with pytest.raises(AuthenticationError, match="^token rejected by the API server$"):
        parse_token_review(review(authenticated=False), audiences=AUDIENCES)


@pytest.mark.parametrize("granted", [["kubernetes.default.svc"], []])
def test_token_for_another_audience_is_refused(granted: list[str]) -> None:
    with pytest.raises(AuthenticationError, match="not for audience istio-ca"):
        parse_token_review(review(audiences=granted), audiences=AUDIENCES)


def test_user_that_is_not_a_service_account_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="'alice' is not a service account token"):
        parse_token_review(review(username="alice"), audiences=AUDIENCES)
    with pytest.raises(AuthenticationError, match="malformed service account user name"):
        parse_token_review(review(username="system:serviceaccount:onlyns"), audiences=AUDIENCES)


def test_review_without_status_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="no status"):
        parse_token_review({"kind": "TokenReview"}, audiences=AUDIENCES)


def test_trusted_node_accounts_are_namespace_slash_name() -> None:
    assert parse_trusted_node_accounts([" istio-system/ztunnel", "kube-system/cni"]) == {
        "istio-system/ztunnel",
        "kube-system/cni",
    }
    for bad in ("ztunnel", "/ztunnel", "istio-system/", "a/b/c"):
        with pytest.raises(ValueError, match="not of the form <namespace>/<sa>"):
            parse_trusted_node_accounts([bad])


# -- the node agent's pod --------------------------------------------------------------------

ZTUNNEL = ReviewedToken("istio-system", "ztunnel", "ztunnel-abcde", "uid-1")


def pod(*, uid: str = "uid-1", sa: str = "ztunnel", node: str | None = "node-1") -> dict[str, Any]:
    spec: dict[str, Any] = {"serviceAccountName": sa}
    if node is not None:
        spec["nodeName"] = node
    return {"metadata": {"name": "ztunnel-abcde", "namespace": "istio-system", "uid": uid},
            "spec": spec}


def test_node_comes_from_the_pods_spec() -> None:
    assert node_of_pod(pod(node="node-7"), ZTUNNEL) == "node-7"


def test_pod_recreated_under_the_same_name_is_not_the_tokens_pod() -> None:
    with pytest.raises(AuthenticationError, match="not the pod the token was issued for"):
        node_of_pod(pod(uid="uid-2"), ZTUNNEL)


def test_pod_of_another_service_account_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="runs as service account 'default'"):
        node_of_pod(pod(sa="default"), ZTUNNEL)


def test_unscheduled_pod_has_no_node() -> None:
    with pytest.raises(AuthenticationError, match="is not scheduled on a node"):
        node_of_pod(pod(node=None), ZTUNNEL)


def test_uid_is_not_checked_when_the_token_does_not_carry_one() -> None:
    unbound_uid = ReviewedToken("istio-system", "ztunnel", "ztunnel-abcde", None)
    assert node_of_pod(pod(uid="anything"), unbound_uid) == "node-1"


# -- the token cache -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(5.0, clock=clock)
    cache.put("a", 1)
    clock.now += 4.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is None
    assert len(cache) == 0


def test_cache_is_bounded_and_drops_oldest_first() -> None:
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(60.0, max_entries=2, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, 2, 3)
    assert len(cache) == 2


def test_cache_with_zero_ttl_keeps_nothing() -> None:
    cache: TtlCache[str, int] = TtlCache(0.0)
    cache.put("a", 1)
    assert cache.get("a") is None


def test_token_key_does_not_contain_the_token() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.secret-payload"
    key = token_key(token)
    assert token.encode() not in key and len(key) == 32
    assert key == token_key(token) != token_key(token + "x")


# -- CA Secrets ------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_plugin_files_from_memory_validate_and_name_their_origin() -> None:
    root, key = new_self_signed_root("cluster.local")
    files = self_signed_plugin_files(root, key)
    ca = CertificateAuthority.from_plugin_files(files, where=lambda name: f"Secret x key {name}")
    assert ca.root == root

    broken = {**files, CA_KEY_FILE: "not a key"}
    with pytest.raises(CaConfigError, match="^Secret x key ca-key.pem: not a PEM private key"):
        CertificateAuthority.from_plugin_files(broken, where=lambda name: f"Secret x key {name}")
    missing = {name: value for name, value in files.items() if name != ROOT_CERT_FILE}
    with pytest.raises(CaConfigError, match="^Secret x key root-cert.pem: missing"):
        CertificateAuthority.from_plugin_files(missing, where=lambda name: f"Secret x key {name}")


def test_secret_data_is_base64_decoded_and_bad_keys_are_named() -> None:
    secret = {"data": {"ca-cert.pem": b64("PEM"), "key.pem": ""}}
    assert decode_secret_data(secret, "Secret s") == {"ca-cert.pem": b"PEM", "key.pem": b""}
    assert decode_secret_data({}, "Secret s") == {}
    with pytest.raises(CaConfigError, match="Secret s key ca-key.pem: not valid base64"):
        decode_secret_data({"data": {"ca-key.pem": "%%%"}}, "Secret s")


def test_self_signed_secret_is_written_in_istios_layout() -> None:
    root, key = new_self_signed_root("cluster.local")
    files = self_signed_plugin_files(root, key)
    body = self_signed_secret_body("istio-system", files)
    assert body.metadata is not None and body.data is not None
    assert body.metadata.name == SELF_SIGNED_SECRET == "istio-ca-secret"
    assert body.type == SELF_SIGNED_SECRET_TYPE == "istio.io/ca-root"
    decoded = {name: base64.b64decode(value).decode() for name, value in body.data.items()}
    assert decoded == {
        "ca-cert.pem": files[CA_CERT_FILE],
        "ca-key.pem": files[CA_KEY_FILE],
        "root-cert.pem": files[CA_CERT_FILE],
        "cert-chain.pem": "",
        "key.pem": "",
    }
    # ... and reads back as the same CA.
    stored = self_signed_secret_files({k: v.encode() for k, v in decoded.items()})
    ca = CertificateAuthority.from_plugin_files(stored, where=str)
    assert ca.root == root


def test_self_signed_secret_without_root_key_uses_the_ca_cert_as_root() -> None:
    data = {CA_CERT_FILE: b"CERT", CA_KEY_FILE: b"KEY", ROOT_CERT_FILE: b"", CERT_CHAIN_FILE: b""}
    assert self_signed_secret_files(data)[ROOT_CERT_FILE] == b"CERT"
    assert self_signed_secret_files({CA_CERT_FILE: b"CERT"})[ROOT_CERT_FILE] == b"CERT"


# -- root ConfigMap plan ---------------------------------------------------------------------


def namespace(name: str, labels: dict[str, str] | None = None, phase: str = "Active") -> Any:
    return {"metadata": {"name": name, "labels": labels or {}}, "status": {"phase": phase}}


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_only_enrolled_live_namespaces_get_the_root() -> None:
    namespaces = {
        "demo": namespace("demo", AMBIENT),
        "plain": namespace("plain"),
        "other-mode": namespace("other-mode", {"istio.io/dataplane-mode": "none"}),
        "leaving": namespace("leaving", AMBIENT, phase="Terminating"),
    }
    assert is_enrolled(namespaces["demo"]) and not is_enrolled(namespaces["plain"])
    assert wanted_namespaces(namespaces, is_enrolled) == {"demo"}
    assert wanted_namespaces(namespaces, lambda ns: True) == {"demo", "plain", "other-mode"}


def configmap(root: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "istio-ca-root-cert",
                     "labels": {"istio.io/config": "true"} if labels is None else labels},
        "data": {ROOT_CERT_KEY: root},
    }


def test_plan_creates_missing_and_patches_stale_configmaps() -> None:
    existing = {
        "current": configmap("ROOT"),
        "edited": configmap("SOMETHING ELSE"),
        "unlabelled": configmap("ROOT", labels={}),
        "not-wanted": configmap("OLD"),
    }
    wanted = ["missing", "current", "edited", "unlabelled"]
    assert plan_root_configmaps(wanted, existing, "ROOT") == [
        ConfigMapAction("patch", "edited"),
        ConfigMapAction("create", "missing"),
        ConfigMapAction("patch", "unlabelled"),
    ]
    assert configmap_is_current(existing["current"], "ROOT")
    assert not configmap_is_current({"metadata": {}}, "ROOT")
