"""Who is calling istiod_lite: every request carries ``authorization: Bearer <token>``.

The answer is a :class:`Caller` naming the *node* whose proxy is calling, because node
authorization (which certificates a ztunnel may obtain, which discovery stream it may open)
is decided per node.

Authenticators implement :class:`Authenticator`. Today there is one:

- :class:`BootstrapTokenAuthenticator` for the embedded mode: a file maps each node to a
  random token handed to that node's ztunnel.

Seam for Kubernetes (the TokenReview issue): a ``TokenReviewAuthenticator`` will implement the
same protocol by POSTing the bearer token to ``authentication.k8s.io/v1`` TokenReview with
audience ``istio-ca``, accepting only the trusted node-agent service accounts (Istio's
``ztunnel`` SA in ``istio-system``) and reading the node name from the bound pod's
``authentication.kubernetes.io/node-name`` extra field, then returning
``Caller(node=<that node>, method="token-review")``. The server needs no change for it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml


class AuthenticationError(Exception):
    """The request could not be attributed to a node (answered 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BootstrapTokenFileError(ValueError):
    """The bootstrap token file is unreadable or malformed."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the node its proxy runs on, and how we know."""

    node: str
    method: str


class Authenticator(Protocol):
    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        """Identify the caller from the request headers (lower-case names), or raise
        AuthenticationError saying why not."""
        ...


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an ``authorization: Bearer <token>`` header."""
    value = headers.get("authorization")
    if value is None:
        raise AuthenticationError("missing authorization header (expected 'Bearer <token>')")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationError("authorization header is not of the form 'Bearer <token>'")
    token = token.strip()
    if not token:
        raise AuthenticationError("empty bearer token")
    return token


class BootstrapTokenAuthenticator:
    """Per-node static tokens (the embedded mode)."""

    method = "bootstrap-token"

    def __init__(self, tokens: Mapping[str, str]) -> None:
        """``tokens`` maps token -> node name."""
        self._tokens = [(token.encode(), node) for token, node in tokens.items()]

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        presented = bearer_token(headers).encode()
        found: str | None = None
        # Compare against every token, without stopping early, so that timing reveals
        # neither which token matched nor how much of a guess was right.
        for token, node in self._tokens:
            if hmac.compare_digest(presented, token):
                found = node
        if found is None:
            raise AuthenticationError("unknown bootstrap token")
        return Caller(node=found, method=self.method)


def load_bootstrap_tokens(path: Path | str) -> dict[str, str]:
    """Read a YAML or JSON file ``{node: token}`` and return token -> node.

    Raises BootstrapTokenFileError naming the problem (never echoing a token)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BootstrapTokenFileError(f"{path}: cannot read: {error.strerror}") from error
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise BootstrapTokenFileError(f"{path}: not valid YAML/JSON: {error}") from error
    if not isinstance(data, dict):
        raise BootstrapTokenFileError(
            f"{path}: expected a mapping of node name to token, got {type(data).__name__}"
        )
    tokens: dict[str, str] = {}
    for node, token in data.items():
        if not isinstance(node, str) or not node:
            raise BootstrapTokenFileError(f"{path}: node name {node!r} is not a non-empty string")
        if not isinstance(token, str) or not token.strip():
            raise BootstrapTokenFileError(f"{path}: token of node {node!r} is not a string")
        if len(token) < 16:
            raise BootstrapTokenFileError(
                f"{path}: token of node {node!r} is shorter than 16 characters"
            )
        if token in tokens:
            raise BootstrapTokenFileError(
                f"{path}: nodes {tokens[token]!r} and {node!r} share the same token"
            )
        tokens[token] = node
    return tokens
