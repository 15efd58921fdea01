"""Callers: node (ztunnel) and service-account (waypoint) bootstrap tokens, and what each
may obtain from the CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient_api.identity import SpiffeId
from ambient_api.model import Workload
from istiod_lite.auth import (
    AuthenticationError,
    BootstrapTokenAuthenticator,
    BootstrapTokenFileError,
    Caller,
    load_bootstrap_tokens,
    parse_service_account_principal,
    service_account_principal,
)
from istiod_lite.csr import (
    CsrAuthorizationError,
    IdentityAuthorizationError,
    NodeAuthorizationError,
    authorize_node,
    authorize_service_account,
)

WAYPOINT = SpiffeId("example.org", "demo", "waypoint")


def test_load_tokens_for_nodes_and_service_accounts(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        "node-1: aaaaaaaaaaaaaaaaaaaa\n"
        "serviceaccount:demo/waypoint: bbbbbbbbbbbbbbbbbbbb\n"
    )
    assert load_bootstrap_tokens(path) == {
        "aaaaaaaaaaaaaaaaaaaa": "node-1",
        "bbbbbbbbbbbbbbbbbbbb": "serviceaccount:demo/waypoint",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("serviceaccount:demo: bbbbbbbbbbbbbbbbbbbb\n", "not of the form serviceaccount:"),
        ("serviceaccount:/wp: bbbbbbbbbbbbbbbbbbbb\n", "not of the form serviceaccount:"),
        ("serviceaccount:demo/a/b: bbbbbbbbbbbbbbbbbbbb\n", "not of the form serviceaccount:"),
        ("serviceaccount:demo/wp: short\n", "token of service account 'serviceaccount:demo/wp' "
                                            "is shorter than 16"),
        ("node-1: bbbbbbbbbbbbbbbbbbbb\nserviceaccount:demo/wp: bbbbbbbbbbbbbbbbbbbb\n",
         "'node-1' and 'serviceaccount:demo/wp' share the same token"),
    ],
)
def test_bad_service_account_entries(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(BootstrapTokenFileError, match=message) as error:
        load_bootstrap_tokens(path)
    assert "bbbbbbbbbbbbbbbbbbbb" not in str(error.value)


async def test_authenticator_tells_nodes_from_service_accounts() -> None:
    auth = BootstrapTokenAuthenticator(
        {"token-node-0123456789": "node-1", "token-wp-0123456789": "serviceaccount:demo/waypoint"},
        trust_domain="example.org",
    )
    node = await auth.authenticate({"authorization": "Bearer token-node-0123456789"})
    assert node == Caller(node="node-1", method="bootstrap-token")
    assert node.principal == "node-1"
    assert node.describe() == "node 'node-1'"
    waypoint = await auth.authenticate({"authorization": "Bearer token-wp-0123456789"})
    assert waypoint == Caller(node=None, method="bootstrap-token", service_account=WAYPOINT)
    assert waypoint.principal == "serviceaccount:demo/waypoint"
    assert waypoint.describe() == "service account demo/waypoint"
    with pytest.raises(AuthenticationError, match="unknown bootstrap token"):
        await auth.authenticate({"authorization": "Bearer token-wp-012345678"})


def test_authenticator_refuses_malformed_service_account_names() -> None:
    with pytest.raises(ValueError, match="serviceaccount:<namespace>/<name>"):
        BootstrapTokenAuthenticator({"token-wp-0123456789": "serviceaccount:demo"})


def test_caller_is_a_node_or_a_service_account() -> None:
    with pytest.raises(ValueError, match="either a node or a service account"):
        Caller(node="node-1", method="x", service_account=WAYPOINT)
    with pytest.raises(ValueError, match="either a node or a service account"):
        Caller(node=None, method="x")


def test_service_account_principal_round_trip() -> None:
    name = service_account_principal("demo", "waypoint")
    assert name == "serviceaccount:demo/waypoint"
    assert parse_service_account_principal(name) == ("demo", "waypoint")
    assert parse_service_account_principal("node-1") is None


def test_service_account_caller_may_obtain_only_its_own_identity() -> None:
    authorize_service_account(WAYPOINT, SpiffeId("example.org", "demo", "waypoint"))
    for other in (
        SpiffeId("example.org", "demo", "sleep"),
        SpiffeId("example.org", "other", "waypoint"),
        SpiffeId("cluster.local", "demo", "waypoint"),
    ):
        with pytest.raises(IdentityAuthorizationError) as info:
            authorize_service_account(WAYPOINT, other)
        assert str(info.value) == (
            f"caller spiffe://example.org/ns/demo/sa/waypoint may only obtain its own "
            f"identity, not {other}"
        )
    # The server answers 403 for both kinds of refusal through the common base.
    assert issubclass(IdentityAuthorizationError, CsrAuthorizationError)
    assert issubclass(NodeAuthorizationError, CsrAuthorizationError)


# -- node authorization ----------------------------------------------------------------


def workload(
    name: str, sa: str, node: str, *, ns: str = "default", td: str = "cluster.local"
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=("127.0.20.1",),
        service_account=sa,
        node=node,
        trust_domain=td,
    )


WORKLOADS = [
    workload("sleep-1", "sleep", "node-a"),
    workload("httpbin-1", "httpbin", "node-b"),
    workload("other-td", "web", "node-a", td="other.td"),
]


def test_node_may_get_identities_of_its_own_pods() -> None:
    authorize_node("node-a", SpiffeId("cluster.local", "default", "sleep"), WORKLOADS)
    authorize_node("node-b", SpiffeId("cluster.local", "default", "httpbin"), iter(WORKLOADS))


@pytest.mark.parametrize(
    ("node", "identity", "message"),
    [
        (
            "node-a",
            SpiffeId("cluster.local", "default", "httpbin"),
            "no instances of default/httpbin on node node-a",
        ),
        (
            "node-c",
            SpiffeId("cluster.local", "default", "sleep"),
            "no instances of default/sleep on node node-c",
        ),
        (
            "node-a",
            SpiffeId("cluster.local", "prod", "sleep"),
            "no instances of prod/sleep on node node-a",
        ),
        (
            "node-a",
            SpiffeId("cluster.local", "default", "web"),
            "no instances of default/web on node node-a",
        ),
        (
            "",
            SpiffeId("cluster.local", "default", "sleep"),
            "no instances of default/sleep on node ",
        ),
    ],
)
def test_node_authorization_refusals(node: str, identity: SpiffeId, message: str) -> None:
    with pytest.raises(NodeAuthorizationError) as info:
        authorize_node(node, identity, WORKLOADS)
    assert str(info.value) == message


def test_unnamed_node_is_refused_even_for_unscheduled_workloads() -> None:
    with pytest.raises(NodeAuthorizationError):
        authorize_node("", SpiffeId("cluster.local", "default", "vm"), [workload("vm", "vm", "")])
