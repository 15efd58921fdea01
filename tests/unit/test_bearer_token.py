"""The control-plane bearer token follows its file (rotated projected ServiceAccount tokens)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from ambient_dataplane.controlplane import BearerToken


def header(token: BearerToken) -> str:
    request = httpx.Request("POST", "https://istiod/v1/certificate")
    flow = token.auth_flow(request)
    return next(flow).headers["authorization"]


def test_a_fixed_token_is_sent_as_is() -> None:
    assert header(BearerToken("abc")) == "Bearer abc"


def test_a_rotated_token_file_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "istio-token"
    path.write_text("first\n")
    token = BearerToken("first", path)
    assert header(token) == "Bearer first"
    path.write_text("second-token\n")
    os.utime(path, ns=(1, 2))  # a different mtime, as a kubelet rotation gives
    assert header(token) == "Bearer second-token"


def test_an_unreadable_or_empty_file_keeps_the_last_good_token(tmp_path: Path) -> None:
    path = tmp_path / "istio-token"
    path.write_text("good")
    token = BearerToken("good", path)
    path.write_text("")
    os.utime(path, ns=(3, 4))
    assert header(token) == "Bearer good"
    path.unlink()
    assert header(token) == "Bearer good"
