"""The HBONE layer's errors: one base, each with the status that best answers it."""

from __future__ import annotations

from ambient_dataplane.hbone import (
    HboneConnectError,
    HboneError,
    HboneProtocolError,
    HboneRejection,
    MalformedHeaders,
)


def test_every_error_is_an_hbone_error_with_a_reason_and_a_status_hint() -> None:
    errors: list[HboneError] = [
        HboneRejection(401, "denied by policy"),
        MalformedHeaders("X-Upper", "header name 'X-Upper' is not a lower-case token"),
        HboneConnectError(403, "forbidden"),
        HboneConnectError(None, "connection is draining (GOAWAY)", retryable=True),
        HboneProtocolError("GOAWAY payload needs 8 bytes, got 3"),
    ]
    assert [error.status_hint for error in errors] == [401, 400, 503, 503, 400]
    assert [error.reason for error in errors] == [
        "denied by policy", "header name 'X-Upper' is not a lower-case token", "forbidden",
        "connection is draining (GOAWAY)", "GOAWAY payload needs 8 bytes, got 3",
    ]


def test_rejection_and_connect_error_keep_their_fields_and_messages() -> None:
    rejection = HboneRejection(400, "missing :authority")
    assert (rejection.status, str(rejection)) == (400, "400: missing :authority")
    malformed = MalformedHeaders("te", "connection-specific header 'te' is not allowed in HTTP/2")
    assert isinstance(malformed, HboneRejection) and malformed.status == 400
    refused = HboneConnectError(None, "refused", retryable=True)
    assert (refused.status, refused.retryable, str(refused)) == (None, True, "refused")
    assert str(HboneConnectError(503, "no upstream")) == "503: no upstream"
