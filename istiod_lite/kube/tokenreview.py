"""Authenticating proxies on Kubernetes: projected ServiceAccount tokens checked by TokenReview.

A ztunnel or waypoint pod presents an audience-bound (``istio-ca``) projected token as
``authorization: Bearer <token>``. istiod_lite asks the API server (``authentication.k8s.io/v1``
TokenReview, ``spec.audiences`` set) who it belongs to, and maps the answer onto
:class:`istiod_lite.auth.Caller`:

- a service account listed in ``trusted_node_accounts`` (Istio's ``CA_TRUSTED_NODE_ACCOUNTS``,
  ``<ns>/<sa>`` entries; by default ``istio-system/ztunnel``) is a node agent: it becomes a
  **node** caller, and the node is the ``spec.nodeName`` of the pod the token is bound to,
  read from the API server (never from anything the caller says), so the CA's
  ``authorize_node`` checks against where the pod really runs;
- any other service account becomes a **service-account** caller with that identity.

The decisions (what a review or a pod means) are plain functions; :class:`TokenReviewAuthenticator`
is the thin driver doing the two blocking API calls in a worker thread and caching positive
answers briefly under a hash of the token. Tokens are never logged or kept in clear.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from kubernetes import client as k8s

from ambient_api.identity import SpiffeId
from istiod_lite.auth import (
    DEFAULT_TRUST_DOMAIN,
    AuthenticationError,
    Caller,
    bearer_token,
)
from istiod_lite.kube.client import KubeApiError, call_json

log = structlog.get_logger()

K = TypeVar("K")
V = TypeVar("V")

METHOD = "token-review"
DEFAULT_AUDIENCES = ("istio-ca",)
DEFAULT_TRUSTED_NODE_ACCOUNTS = frozenset({"istio-system/ztunnel"})
DEFAULT_CACHE_TTL = 10.0
DEFAULT_CACHE_SIZE = 10_000

SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


# --------------------------------------------------------------------------- sans-IO decisions


@dataclass(frozen=True)
class ReviewedToken:
    """What the API server vouched for: the service account, and the pod a bound token
    belongs to (None for a token not bound to a pod)."""

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None

    @property
    def account(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def parse_trusted_node_accounts(entries: Iterable[str]) -> frozenset[str]:
    """Validate ``<ns>/<sa>`` entries (Istio's ``CA_TRUSTED_NODE_ACCOUNTS``); raises ValueError
    naming a malformed one."""
    accounts: set[str] = set()
    for entry in entries:
        namespace, slash, name = entry.strip().partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise ValueError(f"trusted node account {entry!r} is not of the form <namespace>/<sa>")
        accounts.add(f"{namespace}/{name}")
    return frozenset(accounts)


def _first_extra(user: Mapping[str, Any], key: str) -> str | None:
    extra = user.get("extra")
    if not isinstance(extra, Mapping):
        return None
    values = extra.get(key)
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


def parse_token_review(review: Mapping[str, Any], *, audiences: Collection[str]) -> ReviewedToken:
    """Interpret a TokenReview answer: it must be authenticated, for one of ``audiences``, and
    name a service account. Raises AuthenticationError saying which check failed."""
    status = review.get("status")
    if not isinstance(status, Mapping):
        raise AuthenticationError("TokenReview answer has no status")
    if not status.get("authenticated"):
        detail = status.get("error")
        suffix = f": {detail}" if isinstance(detail, str) and detail else ""
        raise AuthenticationError(f"token rejected by the API server{suffix}")
    if audiences:
        granted = status.get("audiences") or []
        if not isinstance(granted, list) or not set(granted) & set(audiences):
            raise AuthenticationError(
                f"token is not for audience {', '.join(sorted(audiences))} "
                f"(it is for {', '.join(map(str, granted)) or 'no audience'})"
            )
    user = status.get("user")
    if not isinstance(user, Mapping):
        raise AuthenticationError("TokenReview answer names no user")
    username = user.get("username")
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_USER_PREFIX):
        raise AuthenticationError(f"token of {username!r} is not a service account token")
    parts = username.removeprefix(SERVICE_ACCOUNT_USER_PREFIX).split(":")
    if len(parts) != 2 or not all(parts):
        raise AuthenticationError(f"malformed service account user name {username!r}")
    return ReviewedToken(
        namespace=parts[0],
        service_account=parts[1],
        pod_name=_first_extra(user, POD_NAME_EXTRA),
        pod_uid=_first_extra(user, POD_UID_EXTRA),
    )


def node_of_pod(pod: Mapping[str, Any], token: ReviewedToken) -> str:
    """The node a node agent's pod runs on, after checking the pod is the one the token was
    issued for (same uid, same service account, as Istio's node authorizer does). Raises
    AuthenticationError."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    where = f"pod {token.namespace}/{token.pod_name}"
    if token.pod_uid is not None and metadata.get("uid") != token.pod_uid:
        raise AuthenticationError(
            f"{where} is not the pod the token was issued for (uid {metadata.get('uid')!r}, "
            f"token bound to {token.pod_uid!r})"
        )
    pod_account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if pod_account != token.service_account:
        raise AuthenticationError(
            f"{where} runs as service account {pod_account!r}, the token is of "
            f"{token.service_account!r}"
        )
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise AuthenticationError(f"{where} is not scheduled on a node")
    return node


def token_key(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so no token is kept in clear."""
    return hashlib.sha256(token.encode()).digest()


class TtlCache(Generic[K, V]):
    """A small bounded cache whose entries expire ``ttl`` seconds after insertion (on the
    injected ``clock``); the oldest entries go first when it is full."""

    def __init__(
        self, ttl: float, *, max_entries: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return value

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        now = self._clock()
        self._entries.pop(key, None)
        while self._entries:
            oldest_key, (expires, _) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) < self.max_entries:
                break
            del self._entries[oldest_key]
        self._entries[key] = (now + self.ttl, value)


# --------------------------------------------------------------------------- the driver


class TokenReviewAuthenticator:
    """``auth.Authenticator`` for Kubernetes: a projected ServiceAccount token checked by
    TokenReview; node agents (``trusted_node_accounts``) become node callers placed on their
    pod's real node, other accounts service-account callers in ``trust_domain``."""

    method = METHOD

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        audiences: Collection[str] = DEFAULT_AUDIENCES,
        trusted_node_accounts: Iterable[str] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises ValueError for a malformed trusted node account or no audience."""
        if not audiences:
            raise ValueError("at least one token audience is required (tokens must be bound)")
        self.audiences = tuple(audiences)
        self.trusted_node_accounts = parse_trusted_node_accounts(trusted_node_accounts)
        self.trust_domain = trust_domain
        self._authentication = k8s.AuthenticationV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._cache: TtlCache[bytes, Caller] = TtlCache(
            cache_ttl, max_entries=cache_size, clock=clock
        )

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        token = bearer_token(headers)
        key = token_key(token)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        reviewed = parse_token_review(await self._review(token), audiences=self.audiences)
        if reviewed.account in self.trusted_node_accounts:
            caller = Caller(node=await self._node_of(reviewed), method=self.method)
        else:
            caller = Caller(
                node=None,
                method=self.method,
                service_account=SpiffeId(
                    self.trust_domain, reviewed.namespace, reviewed.service_account
                ),
            )
        self._cache.put(key, caller)
        log.debug(
            "token reviewed", caller=caller.principal, account=reviewed.account,
            pod=reviewed.pod_name,
        )
        return caller

    async def _review(self, token: str) -> dict[str, Any]:
        review = k8s.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=k8s.V1TokenReviewSpec(token=token, audiences=list(self.audiences)),
        )
        try:
            return await call_json(self._authentication.create_token_review, review)
        except KubeApiError as error:
            log.error("TokenReview failed", status=error.status, error=str(error))
            raise AuthenticationError(f"TokenReview failed: {error}") from None

    async def _node_of(self, reviewed: ReviewedToken) -> str:
        if reviewed.pod_name is None:
            raise AuthenticationError(
                f"node agent {reviewed.account} presented a token not bound to a pod "
                "(use a projected service account token)"
            )
        try:
            pod = await call_json(
                self._core.read_namespaced_pod, reviewed.pod_name, reviewed.namespace
            )
        except KubeApiError as error:
            if error.status == 404:
                raise AuthenticationError(
                    f"pod {reviewed.namespace}/{reviewed.pod_name} of node agent "
                    f"{reviewed.account} not found"
                ) from None
            log.error("reading the node agent's pod failed", status=error.status,
                      error=str(error))
            raise AuthenticationError(
                f"cannot read pod {reviewed.namespace}/{reviewed.pod_name}: {error}"
            ) from None
        return node_of_pod(pod, reviewed)
