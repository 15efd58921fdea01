"""Request authentication: Istio's RequestAuthentication (JWT) semantics for a waypoint.

Sans-IO: ``JwtValidator`` is built from the ``JwtPolicy`` resources that target a service and
answers, per request, ``validate(headers) -> JwtResult``:

- no token in any configured location -> an empty ``JwtResult`` (the request passes
  unauthenticated; authorization decides, e.g. ``not_request_principals: ["*"]``);
- a valid token -> its principal ``"<iss>/<sub>"``, its claims (for ``waypoint.authz``), and
  the header edits the proxy must make (``headers_to_remove``: the token's header unless
  ``forward_original_token``; ``headers_to_add``: ``output_claim_to_headers``, to be *set*,
  replacing any value the client sent);
- any other token -> ``JwtError`` (the proxy answers 401 with
  ``JwtError.www_authenticate(realm)``).

What is rejected: a token that is not three base64url parts of JSON; more than one distinct
token in the request (Istio leaves that undefined; we refuse it); an algorithm other than
RS256 and ES256 (so ``none`` and HS256-with-the-public-key confusion never reach a key;
RS384/RS512/ES384/PS256 are deliberately not accepted yet); an issuer no provider has, or a
provider that does not read the header the token came in; no key of the issuer's JWKS
verifying the signature (by ``kid``, else every key of the algorithm's type); ``exp``/``nbf``
outside ``leeway`` seconds (Envoy's 60 s clock skew); ``aud`` sharing nothing with the
provider's ``audiences`` when it has any (compared like Envoy: without ``http(s)://`` and a
trailing ``/``). ``iat`` is not checked (Envoy does not either). A token without ``sub``
authenticates (its claims are usable) but has no request principal.

JWKS documents are parsed once per distinct document (``parse_jwks`` is cached), so
rebuilding the validator on each policy push costs nothing for unchanged providers; keys that
cannot be used are reported in ``JwtValidator.problems`` and skipped.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError

from ambient_api.l7 import JwtPolicy, JwtProvider
from waypoint.http import HeaderSource, header_values

logger = structlog.get_logger()

ALLOWED_ALGORITHMS = ("RS256", "ES256")
DEFAULT_LEEWAY_SECONDS = 60.0

PublicKey = RSAPublicKey | EllipticCurvePublicKey

_VERIFIERS: dict[str, RSAAlgorithm | ECAlgorithm] = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
}


class JwtErrorKind(StrEnum):
    MALFORMED = "malformed"
    MULTIPLE_TOKENS = "multiple-tokens"
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"
    UNKNOWN_ISSUER = "unknown-issuer"
    NO_KEY = "no-key"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    AUDIENCE = "audience"
    CRITICAL_HEADER = "critical-header"


class JwtError(Exception):
    """A token was presented and is not acceptable: the proxy answers 401."""

    def __init__(self, kind: JwtErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    @staticmethod
    def www_authenticate(realm: str) -> str:
        """The ``www-authenticate`` value of the 401 (RFC 6750, as Envoy sends it; the realm
        is conventionally the request URL)."""
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        return f'Bearer realm="{quoted}", error="invalid_token"'


@dataclass(frozen=True)
class JwtResult:
    """The outcome for a request that was not rejected. All None/empty: no token."""

    principal: str | None = None  # "iss/sub"
    claims: Mapping[str, Any] | None = None  # the verified payload
    provider: JwtProvider | None = None
    policy: str | None = None  # "namespace/name" of the JwtPolicy whose provider verified it
    headers_to_remove: tuple[str, ...] = ()  # lower-case names
    headers_to_add: tuple[tuple[str, str], ...] = field(default=())  # set, replacing

    @property
    def authenticated(self) -> bool:
        return self.claims is not None


NO_TOKEN = JwtResult()


@dataclass(frozen=True)
class JwksKey:
    key_id: str | None
    algorithm: str | None  # the JWK's "alg", if it names one
    key: PublicKey


@dataclass(frozen=True)
class ParsedJwks:
    keys: tuple[JwksKey, ...]
    problems: tuple[str, ...]


@lru_cache(maxsize=256)
def parse_jwks(document: str) -> ParsedJwks:
    """The usable RSA and EC signature keys of a JWKS document; what is wrong with the rest."""
    try:
        parsed = json.loads(document)
    except ValueError as error:
        return ParsedJwks((), (f"JWKS is not JSON: {error}",))
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        return ParsedJwks((), ('JWKS is not an object with a "keys" list',))
    keys: list[JwksKey] = []
    problems: list[str] = []
    for index, entry in enumerate(parsed["keys"]):
        label = f"JWKS key {index}" + (
            f" (kid {entry.get('kid')!r})" if isinstance(entry, dict) and "kid" in entry else ""
        )
        if not isinstance(entry, dict):
            problems.append(f"{label} is not an object")
            continue
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key: not for us, not a problem
        if entry.get("kty") not in ("RSA", "EC"):
            problems.append(f"{label}: key type {entry.get('kty')!r} is not RSA or EC")
            continue
        try:
            key_object: Any = PyJWK(entry).key
        except (PyJWTError, ValueError, TypeError, KeyError) as error:
            problems.append(f"{label} is not a valid key: {error}")
            continue
        if isinstance(key_object, RSAPrivateKey | EllipticCurvePrivateKey):
            key_object = key_object.public_key()
        if not isinstance(key_object, RSAPublicKey | EllipticCurvePublicKey):
            problems.append(f"{label} is not an RSA or EC public key")
            continue
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys.append(
            JwksKey(
                key_id=kid if isinstance(kid, str) else None,
                algorithm=alg if isinstance(alg, str) else None,
                key=key_object,
            )
        )
    return ParsedJwks(tuple(keys), tuple(problems))


@dataclass(frozen=True)
class _Location:
    header: str  # lower case
    prefix: str

    def token_in(self, value: str) -> str | None:
        """The token in one header value, None when the value is not in this location's form
        (e.g. ``Basic ...`` in ``authorization`` for the ``Bearer `` prefix)."""
        if self.prefix:
            if value[: len(self.prefix)].lower() != self.prefix.lower():
                return None
            value = value[len(self.prefix):]
        return value.strip()


@dataclass(frozen=True)
class _Provider:
    policy: str
    provider: JwtProvider
    keys: tuple[JwksKey, ...]
    locations: frozenset[_Location]


@dataclass(frozen=True)
class _Token:
    header: Mapping[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


class JwtValidator:
    """Validates the JWT of a request against the providers of the given policies."""

    def __init__(
        self,
        policies: Iterable[JwtPolicy],
        *,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._leeway = leeway
        self._clock = clock
        providers: list[_Provider] = []
        problems: list[str] = []
        for policy in policies:
            for provider in policy.providers:
                jwks = parse_jwks(provider.jwks)
                problems.extend(
                    f"{policy.key} issuer {provider.issuer}: {p}" for p in jwks.problems
                )
                if not jwks.keys:
                    problems.append(f"{policy.key} issuer {provider.issuer}: no usable key")
                providers.append(
                    _Provider(
                        policy=policy.key,
                        provider=provider,
                        keys=jwks.keys,
                        locations=frozenset(
                            _Location(name.lower(), prefix)
                            for name, prefix in provider.from_headers
                        ),
                    )
                )
        self._providers = tuple(providers)
        locations: dict[_Location, None] = {}
        for entry in providers:
            for location in sorted(entry.locations, key=lambda loc: (loc.header, loc.prefix)):
                locations[location] = None
        self._locations = tuple(locations)
        self.problems = tuple(problems)
        for problem in self.problems:
            logger.warning("jwt provider problem", problem=problem)

    @property
    def enabled(self) -> bool:
        """Whether any provider applies (without one, tokens are not even looked at)."""
        return bool(self._providers)

    def validate(self, headers: HeaderSource) -> JwtResult:
        """The request's authentication; raises ``JwtError`` for a token that is not valid."""
        found: list[tuple[_Location, str]] = []
        for location in self._locations:
            for value in header_values(headers, location.header):
                extracted = location.token_in(value)
                if extracted is not None:
                    found.append((location, extracted))
        if not found:
            return NO_TOKEN
        distinct = {extracted for _, extracted in found}
        if len(distinct) > 1:
            names = sorted({location.header for location, _ in found})
            raise JwtError(
                JwtErrorKind.MULTIPLE_TOKENS,
                f"the request carries {len(distinct)} different tokens (in {', '.join(names)}); "
                "send exactly one",
            )
        token = _parse(found[0][1])
        where = frozenset(location for location, _ in found)

        algorithm = token.header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise JwtError(
                JwtErrorKind.UNSUPPORTED_ALGORITHM,
                f"token algorithm {algorithm!r} is not accepted "
                f"(only {', '.join(ALLOWED_ALGORITHMS)})",
            )
        issuer = token.payload.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise JwtError(JwtErrorKind.UNKNOWN_ISSUER, "token has no iss claim")
        candidates = [entry for entry in self._providers if entry.provider.issuer == issuer]
        if not candidates:
            raise JwtError(JwtErrorKind.UNKNOWN_ISSUER, f"token issuer {issuer!r} is not trusted")
        candidates = [entry for entry in candidates if entry.locations & where]
        if not candidates:
            headers_seen = ", ".join(sorted({location.header for location in where}))
            raise JwtError(
                JwtErrorKind.UNKNOWN_ISSUER,
                f"tokens of issuer {issuer!r} are not accepted in {headers_seen}",
            )
        errors: list[JwtError] = []
        for entry in candidates:
            try:
                return self._accept(entry, token, algorithm, where)
            except JwtError as error:
                errors.append(error)
        raise errors[0]

    def _accept(
        self, entry: _Provider, token: _Token, algorithm: str, where: frozenset[_Location]
    ) -> JwtResult:
        _verify_signature(entry, token, algorithm)
        payload = token.payload
        self._check_times(payload)
        _check_audience(entry.provider, payload)
        subject = payload.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise JwtError(JwtErrorKind.MALFORMED, "token sub claim is not a string")
        provider = entry.provider
        remove: tuple[str, ...] = ()
        if not provider.forward_original_token:
            remove = tuple(sorted({loc.header for loc in where if loc in entry.locations}))
        return JwtResult(
            principal=f"{payload['iss']}/{subject}" if subject else None,
            claims=payload,
            provider=provider,
            policy=entry.policy,
            headers_to_remove=remove,
            headers_to_add=_claim_headers(provider, payload),
        )

    def _check_times(self, payload: Mapping[str, Any]) -> None:
        now = self._clock()
        expires = _numeric_claim(payload, "exp")
        if expires is not None and now > expires + self._leeway:
            raise JwtError(JwtErrorKind.EXPIRED, "token is expired")
        not_before = _numeric_claim(payload, "nbf")
        if not_before is not None and now + self._leeway < not_before:
            raise JwtError(JwtErrorKind.NOT_YET_VALID, "token is not yet valid (nbf)")


def _parse(raw: str) -> _Token:
    if not raw:
        raise JwtError(JwtErrorKind.MALFORMED, "empty token")
    parts = raw.split(".")
    if len(parts) != 3:
        raise JwtError(
            JwtErrorKind.MALFORMED, "token is not of the form header.payload.signature"
        )
    header = _json_part(parts[0], "header")
    _check_critical(header)
    payload = _json_part(parts[1], "payload")
    signature = _b64decode(parts[2], "signature")
    return _Token(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


# Header parameters RFC 7515 and RFC 7519 define; "crit" may not list them (s4.1.11).
_REGISTERED_HEADERS = frozenset({
    "alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit",
})
# Extensions this validator implements, which a token may mark critical: none yet.
UNDERSTOOD_CRITICAL_HEADERS: frozenset[str] = frozenset()


def _check_critical(header: dict[str, Any]) -> None:
    """RFC 7515 s4.1.11: a token whose ``crit`` names an extension the recipient does not
    understand must be rejected, and so must a ``crit`` that is not a non-empty list of
    extension names present in the header."""
    if "crit" not in header:
        return
    names = header["crit"]
    if not isinstance(names, list) or not names or not all(
        isinstance(name, str) and name for name in names
    ):
        raise JwtError(JwtErrorKind.MALFORMED,
                       "token header crit is not a non-empty list of header names")
    for name in names:
        if name in _REGISTERED_HEADERS or name not in header:
            raise JwtError(JwtErrorKind.MALFORMED,
                           f"token header crit lists {name!r}, which is registered or absent")
    unknown = sorted(set(names) - UNDERSTOOD_CRITICAL_HEADERS)
    if unknown:
        raise JwtError(
            JwtErrorKind.CRITICAL_HEADER,
            f"token header marks {', '.join(map(repr, unknown))} critical, which this proxy "
            "does not understand (RFC 7515 section 4.1.11)",
        )


def _b64decode(part: str, what: str) -> bytes:
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as error:
        raise JwtError(JwtErrorKind.MALFORMED, f"token {what} is not base64url") from error


def _json_part(part: str, what: str) -> dict[str, Any]:
    data = _b64decode(part, what)
    try:
        value = json.loads(data)
    except ValueError as error:
        raise JwtError(JwtErrorKind.MALFORMED, f"token {what} is not JSON") from error
    if not isinstance(value, dict):
        raise JwtError(JwtErrorKind.MALFORMED, f"token {what} is not a JSON object")
    return value


def _verify_signature(entry: _Provider, token: _Token, algorithm: str) -> None:
    kid = token.header.get("kid")
    keys = [key for key in entry.keys if _key_fits(key, algorithm, kid)]
    if not keys:
        which = f"kid {kid!r}" if isinstance(kid, str) else f"type {algorithm}"
        raise JwtError(
            JwtErrorKind.NO_KEY,
            f"no key of {which} for issuer {entry.provider.issuer!r}",
        )
    verifier = _VERIFIERS[algorithm]
    for key in keys:
        if verifier.verify(token.signing_input, key.key, token.signature):  # type: ignore[arg-type]
            return
    raise JwtError(JwtErrorKind.BAD_SIGNATURE, "token signature does not verify")


def _key_fits(key: JwksKey, algorithm: str, kid: object) -> bool:
    if isinstance(kid, str) and key.key_id is not None and key.key_id != kid:
        return False
    if key.algorithm is not None and key.algorithm != algorithm:
        return False
    if algorithm == "RS256":
        return isinstance(key.key, RSAPublicKey)
    return isinstance(key.key, EllipticCurvePublicKey) and isinstance(key.key.curve, SECP256R1)


def _numeric_claim(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtError(JwtErrorKind.MALFORMED, f"token {name} claim is not a number")
    return float(value)


def _check_audience(provider: JwtProvider, payload: Mapping[str, Any]) -> None:
    if not provider.audiences:
        return
    claim = payload.get("aud")
    token_audiences = [claim] if isinstance(claim, str) else claim
    if not isinstance(token_audiences, list):
        raise JwtError(JwtErrorKind.AUDIENCE, "token has no aud claim")
    allowed = {_sanitize_audience(a) for a in provider.audiences}
    if not any(isinstance(a, str) and _sanitize_audience(a) in allowed for a in token_audiences):
        raise JwtError(JwtErrorKind.AUDIENCE, "token audiences are not allowed")


def _sanitize_audience(audience: str) -> str:
    """Envoy compares audiences without scheme and trailing slash."""
    for scheme in ("http://", "https://"):
        if audience.startswith(scheme):
            audience = audience[len(scheme):]
            break
    return audience.removesuffix("/")


def _claim_headers(
    provider: JwtProvider, payload: Mapping[str, Any]
) -> tuple[tuple[str, str], ...]:
    """``output_claim_to_headers``: string, number and boolean claims (a nested one as
    ``a.b`` when no claim has that literal name); a value that could break the header
    (control characters) is left out."""
    edits: list[tuple[str, str]] = []
    for header, claim in provider.output_claim_to_headers:
        value = _claim(payload, claim)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            continue
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
            continue
        edits.append((header.lower(), text))
    return tuple(edits)


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    if name in payload:
        return payload[name]
    value: Any = payload
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
