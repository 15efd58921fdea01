"""``RequestAuthentication`` with ``targetRefs`` -> ``JwtPolicy`` (``ambient_api.l7``) for
waypoints.

JWKS come inline (``jwks``) or from an absolute ``file://`` path, read at translation time
and inlined. Fetching over the network is not supported; such a provider, or one whose JWKS
is not a JSON object with a ``keys`` list, is left out with a warning, so tokens of its
issuer are rejected (401) rather than trusted. A policy whose every provider was left out is
still sent, so that any presented token is rejected. Without ``targetRefs`` (a sidecar-style
selector) it applies to no waypoint and is ignored, with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from ambient_api import l7
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import policy_values
from istiod_lite.translate.common import name_of, namespace_of
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.policy_values import PolicyValueError
from istiod_lite.translate.targets import resolve_targets, target_refs

logger = structlog.get_logger(__name__)

ReadFile = Callable[[str], str]


def read_text_file(path: str) -> str:
    """The default ``read_file``: the file's text (raises OSError)."""
    return Path(path).read_text()


def jwt_policy(
    policy: dict[str, Any], objects: ClusterObjects, mesh: MeshConfig, read_file: ReadFile
) -> l7.JwtPolicy | None:
    name, namespace = name_of(policy), namespace_of(policy)
    where = f"{namespace}/{name}"
    spec = policy.get("spec") or {}
    refs = target_refs(spec)
    if not refs:
        if spec.get("selector"):
            logger.warning(
                "RequestAuthentication with a selector is not supported in ambient mode "
                "(Istio: use targetRefs to a waypoint or Service); ignored",
                policy=where,
            )
        else:
            logger.warning(
                "RequestAuthentication without targetRefs applies to no waypoint; ignored "
                "(Istio: use targetRefs to a waypoint or Service)",
                policy=where,
            )
        return None
    targets, _unresolved = resolve_targets(refs, namespace, where, objects, mesh)
    if not targets:
        logger.warning("policy has no usable target; ignored", policy=where)
        return None
    rules = spec.get("jwtRules") or []
    if not isinstance(rules, list):
        logger.warning("spec.jwtRules must be a list; no provider, so every token is rejected",
                       policy=where)
        return l7.JwtPolicy(name=name, namespace=namespace, targets=targets, providers=())
    if not rules:
        logger.info("RequestAuthentication has no jwtRules; nothing to enforce", policy=where)
        return None
    providers = []
    for index, rule in enumerate(rules):
        provider = jwt_provider(rule, f"{where} jwtRules[{index}]", read_file)
        if provider is not None:
            providers.append(provider)
    return l7.JwtPolicy(
        name=name, namespace=namespace, targets=targets, providers=tuple(providers)
    )


def jwt_provider(rule: Any, where: str, read_file: ReadFile) -> l7.JwtProvider | None:
    """One ``jwtRules`` entry -> a JwtProvider, or None (logged) when it cannot be used."""
    if not isinstance(rule, Mapping):
        logger.warning("jwtRules entry is not a mapping; provider skipped", rule=where)
        return None
    issuer = rule.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        logger.warning("jwtRules entry has no issuer; provider skipped", rule=where)
        return None
    jwks = _jwks(rule, where, read_file)
    if jwks is None:
        return None
    for unsupported in ("fromParams", "fromCookies", "outputPayloadToHeader"):
        if rule.get(unsupported):
            logger.warning(f"jwtRules {unsupported} is not supported; ignored", rule=where)
    try:
        audiences = policy_values.strings(rule.get("audiences"), "audiences")
        from_headers = _from_headers(rule.get("fromHeaders"))
        claim_headers = _claim_headers(rule.get("outputClaimToHeaders"))
    except PolicyValueError as exc:
        logger.warning("jwtRules entry is malformed; provider skipped", rule=where,
                       reason=str(exc))
        return None
    extraction: dict[str, Any] = {} if from_headers is None else {"from_headers": from_headers}
    return l7.JwtProvider(
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        forward_original_token=bool(rule.get("forwardOriginalToken", False)),
        output_claim_to_headers=claim_headers,
        **extraction,
    )


def _jwks(rule: Mapping[str, Any], where: str, read_file: ReadFile) -> str | None:
    """The provider's JWKS document, validated, or None (logged) when unusable."""
    inline, uri = rule.get("jwks"), rule.get("jwksUri")
    if inline:
        if not isinstance(inline, str):
            logger.warning("jwks must be a string holding a JWKS document; provider skipped",
                           rule=where)
            return None
        source, text = "jwks", inline
    elif uri:
        uri = str(uri)
        if uri.startswith(("http://", "https://")):
            logger.warning(
                "fetching JWKS over the network is not supported; provider skipped "
                "(inline the keys with jwks, or use a file:// jwksUri)",
                rule=where, jwks_uri=uri,
            )
            return None
        if not uri.startswith("file://"):
            logger.warning("jwksUri scheme not supported (use file://); provider skipped",
                           rule=where, jwks_uri=uri)
            return None
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            logger.warning("jwksUri file:// path must be absolute; provider skipped",
                           rule=where, jwks_uri=uri)
            return None
        try:
            text = read_file(path)
        except OSError as exc:
            logger.warning("cannot read jwksUri; provider skipped", rule=where, path=path,
                           reason=exc.strerror or str(exc))
            return None
        source = uri
    else:
        logger.warning(
            "jwtRules entry has neither jwks nor jwksUri (OIDC discovery over the network is "
            "not supported); provider skipped",
            rule=where,
        )
        return None
    problem = jwks_problem(text)
    if problem is not None:
        logger.warning("invalid JWKS; provider skipped", rule=where, source=source,
                       reason=problem)
        return None
    return text


def jwks_problem(text: str) -> str | None:
    """Why ``text`` is not a usable JWKS document (a JSON object with a ``keys`` list of
    objects), or None when it is."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return 'not a JWKS: expected a JSON object with a "keys" list'
    if not all(isinstance(key, dict) for key in document["keys"]):
        return 'not a JWKS: every entry of "keys" must be a JSON object'
    return None


def _from_headers(value: Any) -> tuple[tuple[str, str], ...] | None:
    if not value:
        return None
    if not isinstance(value, list):
        raise PolicyValueError("fromHeaders must be a list")
    headers = []
    for entry in value:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise PolicyValueError("each fromHeaders entry needs a name")
        headers.append((entry["name"].lower(), str(entry.get("prefix") or "")))
    return tuple(headers)


def _claim_headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise PolicyValueError("outputClaimToHeaders must be a list")
    pairs = []
    for entry in value:
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("header"), str)
            or not isinstance(entry.get("claim"), str)
        ):
            raise PolicyValueError("each outputClaimToHeaders entry needs a header and a claim")
        pairs.append((entry["header"].lower(), entry["claim"]))
    return tuple(pairs)
