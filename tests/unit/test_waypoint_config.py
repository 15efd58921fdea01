"""The waypoint's flags -> WaypointConfig, and the credential flags it shares with ztunnel."""

from __future__ import annotations

from pathlib import Path

import pytest

from waypoint.config import DEFAULT_MAX_REQUEST_BYTES, WaypointConfig, config_from_args
from waypoint.paths import PathNormalization
from ztunnel.config import config_from_args as ztunnel_config_from_args


@pytest.fixture
def root_cert(tmp_path: Path) -> Path:
    path = tmp_path / "root-cert.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def base_args(root_cert: Path, *extra: str) -> list[str]:
    return [
        "--name", "waypoint",
        "--namespace", "demo",
        "--address", "127.0.40.1",
        "--xds-address", "127.0.9.1:15012",
        "--root-cert", str(root_cert),
        *extra,
    ]  # fmt: skip


def test_defaults(root_cert: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-token-value\n")
    config = config_from_args(base_args(root_cert, "--token-file", str(token_file)))
    assert config == WaypointConfig(
        name="waypoint",
        namespace="demo",
        address="127.0.40.1",
        xds_address=("127.0.9.1", 15012),
        root_cert=root_cert,
        token="s3cret-token-value",
        token_file=token_file,
    )
    # Istio names a waypoint's service account after the Gateway.
    assert config.service_account == "waypoint"
    assert config.spiffe_uri == "spiffe://cluster.local/ns/demo/sa/waypoint"
    assert (config.ports.hbone, config.ports.admin, config.ports.metrics,
            config.ports.readiness) == (15008, 15000, 15020, 15021)  # fmt: skip
    assert config.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert config.path_normalization is PathNormalization.BASE  # Istio's default
    assert config.otlp_endpoint is None
    assert (config.log_format, config.log_level) == ("auto", "info")


def test_every_flag(root_cert: Path) -> None:
    config = config_from_args(
        base_args(
            root_cert,
            "--token", "inline-token",
            "--service-account", "bookinfo-reviews",
            "--trust-domain", "example.org",
            "--cluster-id", "east",
            "--root-namespace", "mesh-root",
            "--otlp-endpoint", "http://127.0.0.1:4318",
            "--connect-timeout", "250ms",
            "--drain-timeout", "1m",
            "--max-request-bytes", "1024",
            "--path-normalization", "DECODE_AND_MERGE_SLASHES",
            "--log-format", "json",
            "--log-level", "debug",
        )
    )  # fmt: skip
    assert config.token == "inline-token"
    assert config.service_account == "bookinfo-reviews"
    assert config.spiffe_uri == "spiffe://example.org/ns/demo/sa/bookinfo-reviews"
    assert (config.cluster_id, config.root_namespace) == ("east", "mesh-root")
    assert config.otlp_endpoint == "http://127.0.0.1:4318"
    assert (config.connect_timeout, config.drain_timeout) == (0.25, 60.0)
    assert config.max_request_bytes == 1024
    assert config.path_normalization is PathNormalization.DECODE_AND_MERGE_SLASHES
    assert (config.log_format, config.log_level) == ("json", "debug")


def test_ipv6_address_is_normalised(root_cert: Path) -> None:
    args = base_args(root_cert, "--token", "t")
    args[args.index("--address") + 1] = "[0:0::1]"
    assert config_from_args(args).address == "::1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--address", "localhost"), "'localhost' is not an IP address"),
        (("--namespace", "Demo"), "'Demo' is not a valid namespace name"),
        (("--name", "bad_name"), "'bad_name' is not a valid object name"),
        (("--xds-address", "127.0.9.1"), "invalid address '127.0.9.1': expected HOST:PORT"),
        (("--connect-timeout", "soon"), "'soon' is not a duration"),
        (("--max-request-bytes", "0"), "'0' is not a positive whole number"),
        (("--otlp-endpoint", "grpc://collector"), "must be an http:// or https:// URL"),
        (("--log-level", "loud"), "invalid choice: 'loud'"),
        (("--path-normalization", "base"), "invalid choice: 'base'"),
    ],
)
def test_bad_flags_name_the_problem(
    root_cert: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], message: str
) -> None:
    args = base_args(root_cert, "--token", "t")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_required_flags(root_cert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--name", "waypoint"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--namespace" in err and "--address" in err and "--root-cert" in err


CREDENTIAL_CASES = [
    (lambda d: ["--token-file", str(d / "missing")], "--token-file {d}/missing: No such file"),
    (lambda d: ["--token-file", str(d / "empty")], "--token-file {d}/empty is empty"),
    (lambda d: ["--token", "  "], "--token is empty"),
    (lambda d: ["--token", "a", "--token-file", str(d / "empty")], "not allowed with argument"),
    (lambda d: [], "one of the arguments --token-file --token is required"),
]


@pytest.mark.parametrize(("extra", "message"), CREDENTIAL_CASES)
@pytest.mark.parametrize("program", ["waypoint", "ztunnel"])
def test_credentials_are_checked_alike_by_both_proxies(
    tmp_path: Path,
    root_cert: Path,
    capsys: pytest.CaptureFixture[str],
    program: str,
    extra: object,
    message: str,
) -> None:
    (tmp_path / "empty").write_text("\n")
    flags = extra(tmp_path)  # type: ignore[operator]
    if program == "waypoint":
        argv = base_args(root_cert, *flags)
        parse = config_from_args
    else:
        argv = ["--node", "n1", "--node-address", "127.0.10.1", "--xds-address",
                "127.0.9.1:15012", "--root-cert", str(root_cert), *flags]  # fmt: skip
        parse = ztunnel_config_from_args  # type: ignore[assignment]
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message.format(d=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("program", ["waypoint", "ztunnel"])
def test_missing_root_cert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], program: str
) -> None:
    missing = tmp_path / "nope.pem"
    if program == "waypoint":
        with pytest.raises(SystemExit):
            config_from_args(base_args(missing, "--token", "t"))
    else:
        with pytest.raises(SystemExit):
            ztunnel_config_from_args(["--node", "n1", "--node-address", "127.0.10.1",
                                      "--xds-address", "127.0.9.1:15012",
                                      "--root-cert", str(missing), "--token", "t"])  # fmt: skip
    assert f"--root-cert {missing}: no such file" in capsys.readouterr().err
