"""The readiness prober the lab runs inside its control namespace: targets and polling."""

from __future__ import annotations

import pytest

from ambientctl.lab.probe import Target, parse_target, wait_all


def test_targets_parse_and_print() -> None:
    assert parse_target("tcp://10.0.0.1:15012") == Target("tcp", "10.0.0.1", 15012)
    http = parse_target("http://10.0.0.2:15021/healthz/ready")
    assert http == Target("http", "10.0.0.2", 15021, "/healthz/ready")
    assert str(http) == "http://10.0.0.2:15021/healthz/ready"
    assert str(parse_target("tcp://h:1")) == "tcp://h:1"


@pytest.mark.parametrize("text", ["10.0.0.1:80", "udp://h:1", "tcp://h", "http://:80/"])
def test_bad_targets_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="probe target"):
        parse_target(text)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_polls_until_each_target_succeeded_once() -> None:
    a, b = Target("tcp", "a", 1), Target("tcp", "b", 1)
    answers: dict[Target, list[str | None]] = {a: [None], b: ["refused", "refused", None]}
    calls: list[Target] = []

    def attempt(target: Target) -> str | None:
        calls.append(target)
        return answers[target].pop(0)

    time = FakeTime()
    assert wait_all([a, b], 5.0, attempt=attempt, clock=time.clock, sleep=time.sleep) == {}
    assert calls == [a, b, b, b]  # a is not probed again once ready


def test_gives_up_with_the_last_reason() -> None:
    target = Target("http", "n", 15021, "/healthz/ready")
    time = FakeTime()
    failing = wait_all(
        [target], 1.0, attempt=lambda t: "answered 503: not synced",
        clock=time.clock, sleep=time.sleep,
    )  # fmt: skip
    assert failing == {target: "answered 503: not synced"}
    assert 1.0 <= time.now < 1.3
