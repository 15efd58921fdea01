"""Who is calling istiod_lite: every request carries ``authorization: Bearer <token>``.

The answer is a :class:`Caller`, one of two kinds, because what a caller may do is decided
differently for each:

- a **node** caller (a ztunnel) may obtain the identities of the workloads scheduled on its
  node and opens the discovery stream of that node (``DiscoveryRequest.node = <node>``);
- a **service-account** caller (a waypoint: one process serving one identity) may obtain only
  its own identity and opens the stream named ``serviceaccount:<ns>/<sa>``.

``Caller.principal`` is that name, so the server checks both kinds the same way.

Authenticators implement :class:`Authenticator`. This module has the embedded one:

- :class:`BootstrapTokenAuthenticator` for the embedded mode: a file maps each node, and each
  ``serviceaccount:<ns>/<sa>`` a waypoint runs as, to a random token handed to that process.

On Kubernetes, ``istiod_lite.kube.tokenreview.TokenReviewAuthenticator`` implements the same
protocol by POSTing the bearer token to ``authentication.k8s.io/v1`` TokenReview with audience
``istio-ca``. The reviewed token names a service account (``system:serviceaccount:<ns>:<sa>``),
so its caller is a service-account caller (``method="token-review"``) — which is what a
waypoint pod presents. Only the trusted node-agent accounts (Istio's
``CA_TRUSTED_NODE_ACCOUNTS``, by default ``istio-system/ztunnel``) become node callers, on the
``spec.nodeName`` of the pod the token is bound to, read from the API server. The server needs
no change for it.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from ambient_api.identity import SpiffeId


class AuthenticationError(Exception):
    """The request could not be attributed to a node or service account (answered 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BootstrapTokenFileError(ValueError):
    """The bootstrap token file is unreadable or malformed."""


SERVICE_ACCOUNT_PREFIX = "serviceaccount:"
DEFAULT_TRUST_DOMAIN = "cluster.local"
_NAME_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def service_account_principal(namespace: str, service_account: str) -> str:
    """``serviceaccount:<ns>/<sa>``: how a service-account caller is named in bootstrap token
    files and in ``DiscoveryRequest.node`` / ``Ack.node``."""
    return f"{SERVICE_ACCOUNT_PREFIX}{namespace}/{service_account}"


def parse_service_account_principal(name: str) -> tuple[str, str] | None:
    """``(namespace, service account)`` of a ``serviceaccount:<ns>/<sa>`` name, None for a
    name without the prefix (a node). Raises ValueError for a malformed one."""
    if not name.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, _, account = name.removeprefix(SERVICE_ACCOUNT_PREFIX).partition("/")
    if not _NAME_SEGMENT.match(namespace) or not _NAME_SEGMENT.match(account):
        raise ValueError(f"{name!r} is not of the form {SERVICE_ACCOUNT_PREFIX}<namespace>/<name>")
    return namespace, account


@dataclass(frozen=True)
class Caller:
    """An authenticated caller and how we know: either the node its proxy runs on (a
    ztunnel) or the service account it runs as (a waypoint), never both."""

    node: str | None
    method: str
    service_account: SpiffeId | None = None

    def __post_init__(self) -> None:
        if (self.node is None) == (self.service_account is None):
            raise ValueError("a Caller is either a node or a service account")

    @property
    def principal(self) -> str:
        """The name this caller must use in ``DiscoveryRequest.node`` and ``Ack.node``."""
        if self.service_account is not None:
            return service_account_principal(
                self.service_account.namespace, self.service_account.service_account
            )
        assert self.node is not None
        return self.node

    def describe(self) -> str:
        """How messages name the caller: ``node 'node-1'`` or ``service account demo/wp``."""
        if self.service_account is not None:
            account = self.service_account
            return f"service account {account.namespace}/{account.service_account}"
        return f"node {self.node!r}"


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
    """Static tokens (the embedded mode): per node for ztunnels, per service account for
    waypoints."""

    method = "bootstrap-token"

    def __init__(
        self, tokens: Mapping[str, str], *, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> None:
        """``tokens`` maps token -> node name or ``serviceaccount:<ns>/<sa>`` (as
        ``load_bootstrap_tokens`` returns it); service-account callers get identities in
        ``trust_domain`` (the mesh's). Raises ValueError for a malformed service account."""
        self._tokens: list[tuple[bytes, Caller]] = []
        for token, name in tokens.items():
            account = parse_service_account_principal(name)
            if account is None:
                caller = Caller(node=name, method=self.method)
            else:
                caller = Caller(
                    node=None,
                    method=self.method,
                    service_account=SpiffeId(trust_domain, *account),
                )
            self._tokens.append((token.encode(), caller))

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        presented = bearer_token(headers).encode()
        found: Caller | None = None
        # Compare against every token, without stopping early, so that timing reveals
        # neither which token matched nor how much of a guess was right.
        for token, caller in self._tokens:
            if hmac.compare_digest(presented, token):
                found = caller
        if found is None:
            raise AuthenticationError("unknown bootstrap token")
        return found


def load_bootstrap_tokens(path: Path | str) -> dict[str, str]:
    """Read a YAML or JSON file ``{name: token}`` and return token -> name, where a name is a
    node or ``serviceaccount:<ns>/<sa>`` (a waypoint's identity).

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
            f"{path}: expected a mapping of node name (or serviceaccount:<ns>/<sa>) to token, "
            f"got {type(data).__name__}"
        )
    tokens: dict[str, str] = {}
    for name, token in data.items():
        if not isinstance(name, str) or not name:
            raise BootstrapTokenFileError(f"{path}: node name {name!r} is not a non-empty string")
        try:
            account = parse_service_account_principal(name)
        except ValueError as error:
            raise BootstrapTokenFileError(f"{path}: {error}") from None
        owner = "node" if account is None else "service account"
        if not isinstance(token, str) or not token.strip():
            raise BootstrapTokenFileError(f"{path}: token of {owner} {name!r} is not a string")
        if len(token) < 16:
            raise BootstrapTokenFileError(
                f"{path}: token of {owner} {name!r} is shorter than 16 characters"
            )
        if token in tokens:
            raise BootstrapTokenFileError(
                f"{path}: {tokens[token]!r} and {name!r} share the same token"
            )
        tokens[token] = name
    return tokens
