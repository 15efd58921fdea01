"""Flag value parsers shared by the three programs' command lines."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from pathlib import Path

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"24h"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` or plain seconds (``"3600"``).

    Raises ValueError naming the value and the accepted forms."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    else:
        position = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            position = match.end()
        if not value or position != len(value):
            raise ValueError(
                f"{text!r} is not a duration; use e.g. 90s, 15m, 24h, 1h30m, 2d or plain seconds"
            )
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return timedelta(seconds=seconds)


def duration_seconds(text: str) -> float:
    """An argparse ``type``: a duration flag as seconds."""
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 1-65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_host_port(text: str) -> tuple[str, int]:
    """An argparse ``type``: ``HOST:PORT`` (``[v6]:PORT``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def add_control_plane_credentials(parser: argparse.ArgumentParser, holder: str) -> None:
    """``--root-cert`` and ``--token-file``/``--token``: how a proxy trusts and authenticates
    to istiod_lite. ``holder`` names whose token it is in the help (``this node's``)."""
    parser.add_argument(
        "--root-cert",
        type=Path,
        required=True,
        help="PEM root certificate(s) to trust istiod_lite (bootstrap bundle)",
    )
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument("--token-file", type=Path, help=f"file holding {holder} bearer token")
    token.add_argument("--token", help=f"{holder} bearer token (prefer --token-file)")


def control_plane_credentials(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[Path, str]:
    """The root certificate path and the bearer token from the flags that
    ``add_control_plane_credentials`` added; a bad value ends in ``parser.error`` (exit 2)
    naming the flag, as argparse does for its own checks."""
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--token-file {args.token_file}: {exc.strerror}")
        if not token:
            parser.error(f"--token-file {args.token_file} is empty")
    else:
        token = args.token.strip()
        if not token:
            parser.error("--token is empty")
    if not args.root_cert.is_file():
        parser.error(f"--root-cert {args.root_cert}: no such file")
    return args.root_cert, token
