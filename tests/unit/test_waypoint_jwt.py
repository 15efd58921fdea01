"""waypoint.jwt: RequestAuthentication (JWT) validation as Istio/Envoy do it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ambient_api.l7 import JwtPolicy, JwtProvider
from waypoint.authz import HeaderSource
from waypoint.jwt import (
    NO_TOKEN,
    JwtError,
    JwtErrorKind,
    JwtResult,
    JwtValidator,
    parse_jwks,
)

ISSUER = "https://issuer.example"
OTHER_ISSUER = "https://other.example"
NOW = 1_700_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_384 = ec.generate_private_key(ec.SECP384R1())


def jwk(public_key: Any, kid: str | None, **extra: str) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(public_key, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


DEFAULT_JWKS = jwks(
    jwk(RSA_KEY.public_key(), "rsa-1"),
    jwk(EC_KEY.public_key(), "ec-1"),
)


def provider(**overrides: Any) -> JwtProvider:
    fields: dict[str, Any] = {"issuer": ISSUER, "jwks": DEFAULT_JWKS}
    fields.update(overrides)
    return JwtProvider(**fields)


def validator(*providers: JwtProvider, leeway: float = 60.0) -> JwtValidator:
    policy = JwtPolicy(
        name="jwt",
        namespace="demo",
        targets=("demo/httpbin.demo.svc.cluster.local",),
        providers=providers or (provider(),),
    )
    return JwtValidator([policy], leeway=leeway, clock=lambda: NOW)


def claims(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 3600,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def token(
    payload: Mapping[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    algorithm: str = "RS256",
    kid: str | None = "rsa-1",
) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(
        dict(payload if payload is not None else claims()), key, algorithm=algorithm,
        headers=headers,
    )


def bearer(value: str) -> list[tuple[str, str]]:
    return [("host", "httpbin"), ("authorization", f"Bearer {value}")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rejected(check: JwtValidator, headers: HeaderSource) -> JwtErrorKind:
    with pytest.raises(JwtError) as caught:
        check.validate(headers)
    assert caught.value.reason
    return caught.value.kind


def test_valid_rs256() -> None:
    result = validator().validate(bearer(token()))
    assert result.authenticated
    assert result.principal == f"{ISSUER}/alice"
    assert result.claims is not None and result.claims["sub"] == "alice"
    assert result.provider == provider()
    assert result.policy == "demo/jwt"
    assert result.headers_to_remove == ("authorization",)
    assert result.headers_to_add == ()


def test_valid_es256() -> None:
    result = validator().validate(bearer(token(key=EC_KEY, algorithm="ES256", kid="ec-1")))
    assert result.principal == f"{ISSUER}/alice"


def test_without_kid_every_key_of_the_type_is_tried() -> None:
    check = validator(provider(jwks=jwks(jwk(RSA_KEY.public_key(), None),
                                         jwk(RSA_KEY_2.public_key(), None),
                                         jwk(EC_KEY.public_key(), None))))
    assert check.validate(bearer(token(key=RSA_KEY_2, kid=None))).authenticated
    assert check.validate(bearer(token(key=EC_KEY, algorithm="ES256", kid=None))).authenticated


def test_kid_selects_the_key() -> None:
    check = validator(provider(jwks=jwks(jwk(RSA_KEY.public_key(), "one"),
                                         jwk(RSA_KEY_2.public_key(), "two"))))
    assert check.validate(bearer(token(key=RSA_KEY_2, kid="two"))).authenticated
    assert rejected(check, bearer(token(key=RSA_KEY_2, kid="one"))) is JwtErrorKind.BAD_SIGNATURE
    assert rejected(check, bearer(token(kid="three"))) is JwtErrorKind.NO_KEY


def test_wrong_key() -> None:
    assert rejected(validator(), bearer(token(key=RSA_KEY_2))) is JwtErrorKind.BAD_SIGNATURE


def test_tampered_payload() -> None:
    header, _, signature = token().split(".")
    forged = b64(json.dumps(claims(sub="mallory")).encode())
    assert (rejected(validator(), bearer(f"{header}.{forged}.{signature}"))
            is JwtErrorKind.BAD_SIGNATURE)


def test_rs256_token_naming_an_ec_key() -> None:
    assert rejected(validator(), bearer(token(kid="ec-1"))) is JwtErrorKind.NO_KEY


def test_jwk_alg_must_agree_with_the_token() -> None:
    check = validator(provider(jwks=jwks(jwk(RSA_KEY.public_key(), "rsa-1", alg="RS512"))))
    assert rejected(check, bearer(token())) is JwtErrorKind.NO_KEY


def test_es256_needs_a_p256_key() -> None:
    check = validator(provider(jwks=jwks(jwk(EC_KEY_384.public_key(), "ec-384"))))
    forged = token(key=EC_KEY_384, algorithm="ES384", kid="ec-384")
    assert rejected(check, bearer(forged)) is JwtErrorKind.UNSUPPORTED_ALGORITHM
    header = b64(json.dumps({"alg": "ES256", "kid": "ec-384"}).encode())
    body = b64(json.dumps(claims()).encode())
    assert rejected(check, bearer(f"{header}.{body}.{b64(b'x' * 96)}")) is JwtErrorKind.NO_KEY


def test_expired() -> None:
    stale = token(claims(exp=int(NOW) - 120))
    assert rejected(validator(), bearer(stale)) is JwtErrorKind.EXPIRED


def test_expiry_within_leeway_is_accepted() -> None:
    assert validator().validate(bearer(token(claims(exp=int(NOW) - 30)))).authenticated
    assert (rejected(validator(leeway=0), bearer(token(claims(exp=int(NOW) - 30))))
            is JwtErrorKind.EXPIRED)


def test_not_yet_valid() -> None:
    early = token(claims(nbf=int(NOW) + 120))
    assert rejected(validator(), bearer(early)) is JwtErrorKind.NOT_YET_VALID
    assert validator().validate(bearer(token(claims(nbf=int(NOW) + 30)))).authenticated


def test_no_exp_is_accepted() -> None:
    """Envoy does not require exp by default."""
    assert validator().validate(bearer(token(claims(exp=None)))).authenticated


def test_non_numeric_exp_is_malformed() -> None:
    assert rejected(validator(), bearer(token(claims(exp="tomorrow")))) is JwtErrorKind.MALFORMED


def test_unknown_issuer() -> None:
    assert (rejected(validator(), bearer(token(claims(iss=OTHER_ISSUER))))
            is JwtErrorKind.UNKNOWN_ISSUER)
    assert rejected(validator(), bearer(token(claims(iss=None)))) is JwtErrorKind.UNKNOWN_ISSUER


def test_audience() -> None:
    check = validator(provider(audiences=("svc-a", "https://svc-c.example/")))
    assert check.validate(bearer(token(claims(aud="svc-a")))).authenticated
    assert check.validate(bearer(token(claims(aud=["x", "svc-a"])))).authenticated
    # Envoy compares without scheme and trailing slash.
    assert check.validate(bearer(token(claims(aud="http://svc-c.example")))).authenticated
    assert rejected(check, bearer(token(claims(aud="svc-b")))) is JwtErrorKind.AUDIENCE
    assert rejected(check, bearer(token(claims(aud=["svc-b"])))) is JwtErrorKind.AUDIENCE
    assert rejected(check, bearer(token())) is JwtErrorKind.AUDIENCE


def test_any_audience_when_none_configured() -> None:
    assert validator().validate(bearer(token(claims(aud="whatever")))).authenticated


def test_alg_none() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{header}.{b64(json.dumps(claims()).encode())}."

    assert rejected(validator(), bearer(unsigned)) is JwtErrorKind.UNSUPPORTED_ALGORITHM
    assert (rejected(validator(), bearer(unsigned.rstrip(".") + ".AAAA"))
            is JwtErrorKind.UNSUPPORTED_ALGORITHM)


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    """Algorithm confusion: an HMAC whose secret is the issuer's (public) key."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(claims()).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{body}.{b64(signature)}"
    assert rejected(validator(), bearer(forged)) is JwtErrorKind.UNSUPPORTED_ALGORITHM
    # Even claiming RS256, the HMAC is no RSA signature.
    header = b64(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert (rejected(validator(), bearer(f"{header}.{body}.{b64(signature)}"))
            is JwtErrorKind.BAD_SIGNATURE)


@pytest.mark.parametrize(
    "garbage",
    [
        "not-a-token",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'x')}",
        f"{b64(b'{}')}.{b64(b'not json')}.{b64(b'x')}",
        f"{b64(json.dumps({'alg': 'RS256'}).encode())}.{b64(b'42')}.{b64(b'x')}",
    ],
)
def test_garbage_token(garbage: str) -> None:
    assert rejected(validator(), bearer(garbage)) is JwtErrorKind.MALFORMED


def test_empty_bearer_is_malformed() -> None:
    assert rejected(validator(), [("authorization", "Bearer ")]) is JwtErrorKind.MALFORMED


def test_sub_must_be_a_string() -> None:
    assert rejected(validator(), bearer(token(claims(sub=42)))) is JwtErrorKind.MALFORMED


def test_token_without_sub_authenticates_without_principal() -> None:
    result = validator().validate(bearer(token(claims(sub=None))))
    assert result.authenticated
    assert result.principal is None


def test_no_token() -> None:
    assert validator().validate([("host", "httpbin")]) == NO_TOKEN
    assert not NO_TOKEN.authenticated
    assert validator().validate({"Authorization": "Basic dXNlcjpwYXNz"}) == NO_TOKEN


def test_tokens_are_not_read_without_providers() -> None:
    check = JwtValidator([])
    assert not check.enabled
    assert check.validate(bearer("garbage")) == NO_TOKEN


def test_two_different_tokens_are_refused() -> None:
    headers = [("authorization", f"Bearer {token()}"),
               ("authorization", f"Bearer {token(claims(sub='bob'))}")]
    assert rejected(validator(), headers) is JwtErrorKind.MULTIPLE_TOKENS


def test_same_token_in_two_configured_headers() -> None:
    check = validator(provider(from_headers=(("authorization", "Bearer "),
                                             ("x-jwt-assertion", ""))))
    value = token()
    result = check.validate([("Authorization", f"bearer {value}"), ("X-JWT-Assertion", value)])
    assert result.principal == f"{ISSUER}/alice"
    assert result.headers_to_remove == ("authorization", "x-jwt-assertion")
    other = token(claims(sub="bob"))
    assert (rejected(check, [("authorization", f"Bearer {value}"), ("x-jwt-assertion", other)])
            is JwtErrorKind.MULTIPLE_TOKENS)


def test_custom_header_without_prefix() -> None:
    check = validator(provider(from_headers=(("x-jwt-assertion", ""),)))
    assert check.validate([("x-jwt-assertion", token())]).authenticated
    # The default location is no longer read.
    assert check.validate(bearer("garbage")) == NO_TOKEN


def test_issuer_only_accepted_where_its_provider_reads() -> None:
    check = validator(
        provider(),
        provider(issuer=OTHER_ISSUER, from_headers=(("x-other", ""),)),
    )
    other = token(claims(iss=OTHER_ISSUER))
    assert check.validate([("x-other", other)]).principal == f"{OTHER_ISSUER}/alice"
    assert rejected(check, bearer(other)) is JwtErrorKind.UNKNOWN_ISSUER


def test_providers_of_one_issuer_are_tried_in_turn() -> None:
    check = validator(provider(audiences=("svc-a",)), provider(audiences=("svc-b",),
                                                                 forward_original_token=True))
    result = check.validate(bearer(token(claims(aud="svc-b"))))
    assert result.provider is not None and result.provider.audiences == ("svc-b",)
    assert result.headers_to_remove == ()
    assert rejected(check, bearer(token(claims(aud="svc-c")))) is JwtErrorKind.AUDIENCE


def test_forward_original_token_keeps_the_header() -> None:
    result = validator(provider(forward_original_token=True)).validate(bearer(token()))
    assert result.headers_to_remove == ()


def test_output_claim_to_headers() -> None:
    check = validator(provider(output_claim_to_headers=(
        ("X-Jwt-Sub", "sub"),
        ("x-jwt-team", "org.team"),
        ("x-jwt-admin", "admin"),
        ("x-jwt-level", "level"),
        ("x-jwt-groups", "groups"),  # a list: not copied
        ("x-jwt-evil", "evil"),  # would split the header: not copied
        ("x-jwt-missing", "missing"),
    )))
    payload = claims(org={"team": "payments"}, admin=True, level=3, groups=["a"],
                     evil="x\r\nx-injected: 1")
    result = check.validate(bearer(token(payload)))
    assert result.headers_to_add == (
        ("x-jwt-sub", "alice"),
        ("x-jwt-team", "payments"),
        ("x-jwt-admin", "true"),
        ("x-jwt-level", "3"),
    )


def test_bytes_headers() -> None:
    result = validator().validate([(b"authorization", f"Bearer {token()}".encode())])
    assert result.authenticated


def test_bad_jwks_is_reported_not_fatal() -> None:
    broken = validator(provider(jwks="{not json"))
    assert any("not JSON" in problem for problem in broken.problems)
    assert rejected(broken, bearer(token())) is JwtErrorKind.NO_KEY
    mixed = validator(provider(jwks=jwks({"kty": "oct", "k": "c2VjcmV0"}, {"kty": "RSA"},
                                         jwk(RSA_KEY.public_key(), "rsa-1"))))
    assert len(mixed.problems) == 2
    assert mixed.validate(bearer(token())).authenticated


def test_jwks_is_parsed_once_per_document() -> None:
    assert parse_jwks(DEFAULT_JWKS) is parse_jwks(DEFAULT_JWKS)
    assert len(parse_jwks(DEFAULT_JWKS).keys) == 2
    encryption_only = jwks(jwk(RSA_KEY.public_key(), "enc", use="enc"))
    assert parse_jwks(encryption_only).keys == ()
    assert parse_jwks(encryption_only).problems == ()


def test_private_jwk_is_used_by_its_public_half() -> None:
    private = json.loads(RSAAlgorithm.to_jwk(RSA_KEY))
    private["kid"] = "rsa-1"
    assert validator(provider(jwks=jwks(private))).validate(bearer(token())).authenticated


def test_www_authenticate() -> None:
    assert (JwtError.www_authenticate('http://httpbin/a"b')
            == 'Bearer realm="http://httpbin/a\\"b", error="invalid_token"')


def test_result_defaults() -> None:
    assert JwtResult() == NO_TOKEN


def signed_with_header(**header: Any) -> str:
    return jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1", **header})


def test_a_critical_extension_the_proxy_does_not_understand_is_rejected() -> None:
    """RFC 7515 s4.1.11: accepting it would ignore a constraint the issuer made binding."""
    assert validator().validate(bearer(signed_with_header(x="1"))).principal == f"{ISSUER}/alice"
    with pytest.raises(JwtError, match="'exp-policy' critical") as caught:
        validator().validate(bearer(signed_with_header(crit=["exp-policy"],
                                                       **{"exp-policy": "strict"})))
    assert caught.value.kind is JwtErrorKind.CRITICAL_HEADER


@pytest.mark.parametrize("crit", [[], "exp-policy", [""], [1], ["alg"], ["missing"]])
def test_a_malformed_crit_header_is_rejected(crit: Any) -> None:
    token_text = signed_with_header(crit=crit, **{"exp-policy": "strict"})
    assert rejected(validator(), bearer(token_text)) is JwtErrorKind.MALFORMED
