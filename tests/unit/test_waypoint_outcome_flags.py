"""Response flags of one request come out in Envoy's fixed order, so the
``response_flags`` label matches what dashboards written for Istio query."""

from __future__ import annotations

from ambient_dataplane.labels import ResponseFlag, format_response_flags
from waypoint.pipeline import Outcome

UT, URX = ResponseFlag.UPSTREAM_TIMEOUT, ResponseFlag.RETRY_LIMIT_EXCEEDED
DI, FI = ResponseFlag.DELAY_INJECTED, ResponseFlag.FAULT_INJECTED


def test_flags_follow_envoys_order_not_the_order_they_happened() -> None:
    assert Outcome().flags == "-"
    assert Outcome(response_flags=(URX, UT)).flags == "UT,URX"
    assert Outcome(response_flags=(FI, DI, DI)).flags == "DI,FI"


def test_flags_envoy_does_not_know_go_last_in_their_order() -> None:
    flags = (ResponseFlag.RBAC_DENIED, ResponseFlag.UNAUTHORIZED, ResponseFlag.NO_ROUTE)
    assert format_response_flags(flags) == "NR,UAEX,RBAC"


def test_every_flag_is_envoys_code_and_the_label_lists_them_in_envoys_order() -> None:
    envoy_order = ["UH", "UT", "UR", "UF", "UO", "NR", "DI", "FI", "RL", "UAEX", "URX"]
    assert [flag.value for flag in ResponseFlag] == [*envoy_order, "RBAC"]
    assert format_response_flags(reversed(list(ResponseFlag))) == ",".join(
        [*envoy_order, "RBAC"]
    )
