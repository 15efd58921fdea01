"""Response flags of one request come out in Envoy's fixed order, so the
``response_flags`` label matches what dashboards written for Istio query."""

from __future__ import annotations

from waypoint.pipeline import Outcome


def test_flags_follow_envoys_order_not_the_order_they_happened() -> None:
    outcome = Outcome()
    assert outcome.flags == "-"
    outcome.response_flags += ["URX", "UT"]
    assert outcome.flags == "UT,URX"
    outcome = Outcome(response_flags=["FI", "DI", "DI"])
    assert outcome.flags == "DI,FI"


def test_flags_envoy_does_not_know_go_last_in_their_order() -> None:
    assert Outcome(response_flags=["RBAC", "UAEX", "NR"]).flags == "NR,UAEX,RBAC"
