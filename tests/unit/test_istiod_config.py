"""istiod_lite flags and bootstrap-token authentication (no sockets)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ambient_common.flags import parse_duration
from istiod_lite.auth import (
    AuthenticationError,
    BootstrapTokenAuthenticator,
    BootstrapTokenFileError,
    Caller,
    load_bootstrap_tokens,
)
from istiod_lite.config import parse_args, parse_listen
from istiod_lite.translate import MeshConfig

REQUIRED = ["--config-dir", "cfg", "--state-dir", "state", "--bootstrap-tokens", "t.yaml"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("24h", 86400), ("1h30m", 5400), ("2d", 172800), ("500ms", 0.5), ("3600", 3600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "10x", "1h 30m", "-5s", "0s", "5s3"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration(text)


def test_parse_listen() -> None:
    assert parse_listen("127.0.9.1:15012") == ("127.0.9.1", 15012)
    assert parse_listen("[::1]:15012") == ("::1", 15012)
    with pytest.raises(ValueError, match="not an IP address"):
        parse_listen("localhost:15012")
    with pytest.raises(ValueError, match="port"):
        parse_listen("127.0.0.1:99999")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("15012")


def test_parse_args_defaults_and_values() -> None:
    config = parse_args(REQUIRED)
    assert (config.listen_host, config.listen_port) == ("127.0.9.1", 15012)
    assert config.cert_ttl == timedelta(hours=24)
    assert config.config_dir == Path("cfg")
    config = parse_args([*REQUIRED, "--listen", "127.0.9.2:1512", "--cert-ttl", "90s"])
    assert config.listen == "127.0.9.2:1512"
    assert config.cert_ttl == timedelta(seconds=90)


def test_the_mesh_config_carries_the_cluster_id_and_the_root_namespace() -> None:
    """The root namespace is istiod's own in Kubernetes mode, as Istio's rootNamespace
    defaults to it; the embedded mode keeps istio-system."""
    embedded = parse_args([*REQUIRED, "--cluster-id", "east", "--trust-domain", "td.example",
                           "--network", "net-1"])
    assert embedded.mesh == MeshConfig(trust_domain="td.example", cluster_id="east",
                                       network="net-1", root_namespace="istio-system")
    kubernetes = parse_args(["--kubernetes", "--state-dir", "state", "--pod-namespace", "mesh",
                             "--cluster-id", "west"])
    assert kubernetes.kubernetes is not None and kubernetes.kubernetes.namespace == "mesh"
    assert kubernetes.root_namespace == "mesh"
    assert kubernetes.mesh == MeshConfig(cluster_id="west", root_namespace="mesh")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--cert-ttl", "soon"], "'soon' is not a duration"),
        (["--cert-ttl", "100d"], "--cert-ttl (100 days, 0:00:00) is longer than --max-cert-ttl"),
        (["--listen", "nowhere"], "is not HOST:PORT"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_load_bootstrap_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("node-1: aaaaaaaaaaaaaaaaaaaa\nnode-2: bbbbbbbbbbbbbbbbbbbb\n")
    assert load_bootstrap_tokens(path) == {
        "aaaaaaaaaaaaaaaaaaaa": "node-1",
        "bbbbbbbbbbbbbbbbbbbb": "node-2",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- b\n", "expected a mapping"),
        ("node-1: short\n", "shorter than 16"),
        ("node-1: 42\n", "not a string"),
        ("a: aaaaaaaaaaaaaaaaaaaa\nb: aaaaaaaaaaaaaaaaaaaa\n", "share the same token"),
        ("a: [unclosed\n", "not valid YAML/JSON"),
    ],
)
def test_load_bootstrap_tokens_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(BootstrapTokenFileError, match=message) as error:
        load_bootstrap_tokens(path)
    assert "aaaaaaaaaaaaaaaaaaaa" not in str(error.value)


def test_load_bootstrap_tokens_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BootstrapTokenFileError, match="cannot read"):
        load_bootstrap_tokens(tmp_path / "absent.yaml")


async def test_bootstrap_token_authenticator() -> None:
    auth = BootstrapTokenAuthenticator({"secret-token-node-1": "node-1"})
    caller = await auth.authenticate({"authorization": "Bearer secret-token-node-1"})
    assert caller == Caller(node="node-1", method="bootstrap-token")
    for headers, reason in [
        ({}, "missing authorization header"),
        ({"authorization": "Basic abc"}, "Bearer"),
        ({"authorization": "Bearer "}, "empty bearer token"),
        ({"authorization": "Bearer secret-token-node-2"}, "unknown bootstrap token"),
    ]:
        with pytest.raises(AuthenticationError, match=reason):
            await auth.authenticate(headers)
