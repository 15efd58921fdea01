"""RequestLabeler: a tunnel's requests reuse their labels while nothing that shapes them
changes, and get new ones (equal to request_labels') as soon as something does."""

from __future__ import annotations

import dataclasses

from tests.unit.test_waypoint_telemetry import REVIEWS, REVIEWS_V2, SLEEP, SLEEP_ID
from waypoint.telemetry import RequestLabeler, request_labels


def test_the_same_outcome_reuses_the_labels() -> None:
    labeler = RequestLabeler(SLEEP, SLEEP_ID)
    first = labeler.labels(REVIEWS_V2, REVIEWS, status=200)
    assert first == request_labels(SLEEP, SLEEP_ID, REVIEWS_V2, REVIEWS, status=200)
    assert labeler.labels(REVIEWS_V2, REVIEWS, status=200) is first


def test_any_change_gives_the_labels_request_labels_gives() -> None:
    labeler = RequestLabeler(SLEEP, SLEEP_ID)
    labeler.labels(REVIEWS_V2, REVIEWS, status=200)
    moved = dataclasses.replace(REVIEWS_V2, canonical_revision="v3")  # the state replaced it
    cases = [
        ((REVIEWS_V2, REVIEWS), {"status": 503, "response_flags": "UF"}),
        ((REVIEWS_V2, REVIEWS), {"status": 200, "protocol": "grpc"}),
        ((moved, REVIEWS), {"status": 200}),
        ((None, REVIEWS), {"status": 200}),
        ((None, None), {"status": 403, "response_flags": "RBAC"}),
    ]
    for (destination, service), outcome in cases:
        labels = labeler.labels(destination, service, **outcome)  # type: ignore[arg-type]
        assert labels == request_labels(SLEEP, SLEEP_ID, destination, service,
                                        **outcome)  # type: ignore[arg-type]
    assert labeler.labels(moved, REVIEWS, status=200).destination_version == "v3"
