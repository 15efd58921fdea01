"""istiod_lite's debug and metrics endpoints on a real server (TLS + HTTP/2): ``/debug/syncz``
needs a caller and shows it only its own streams (issue 11); ``/metrics`` counts the policy
parts that failed closed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from ambient_api import kinds
from ambient_api.discovery import DISCOVERY_PATH
from ambient_api.model import Authorization
from istiod_lite.__main__ import RunningIstiod
from tests.integration.test_istiod_server import (  # noqa: F401  (fixtures used by name)
    OPERATOR_PRINCIPAL,
    WAYPOINT_PRINCIPAL,
    auth,
    client,
    client_for,
    istiod,
    istiod_config,
    next_update,
    syncz,
)


@asynccontextmanager
async def open_stream(running: RunningIstiod, caller: str) -> AsyncIterator[None]:
    """A discovery stream of ``caller``, open (first update read) until the block ends."""
    request: dict[str, Any] = {"node": caller}
    if caller == WAYPOINT_PRINCIPAL:
        request["kinds"] = sorted(kinds.ALL_KINDS)
    async with client_for(running) as streaming, streaming.stream(
        "POST", DISCOVERY_PATH, json=request, headers=auth(caller)
    ) as response:
        assert response.status_code == 200
        await next_update(response.aiter_lines())
        yield


async def test_syncz_needs_an_authenticated_caller(
    client: httpx.AsyncClient,  # noqa: F811
) -> None:
    missing = await client.get("/debug/syncz")
    assert missing.status_code == 401
    assert "missing authorization header" in missing.json()["error"]
    wrong = await client.get(
        "/debug/syncz", headers={"authorization": "Bearer not-a-token-0123456789"}
    )
    assert wrong.status_code == 401


async def test_syncz_shows_a_caller_only_its_own_streams(
    istiod: RunningIstiod, client: httpx.AsyncClient  # noqa: F811
) -> None:
    async with AsyncExitStack() as streams:
        for caller in ("node-1", WAYPOINT_PRINCIPAL):
            await streams.enter_async_context(open_stream(istiod, caller))
        assert [s["node"] for s in await syncz(client, "node-1")] == ["node-1"]
        assert await syncz(client, "node-2") == []
        assert [s["node"] for s in await syncz(client, WAYPOINT_PRINCIPAL)] == [
            WAYPOINT_PRINCIPAL
        ]
        # A service account of the root namespace sees every stream.
        assert sorted(s["node"] for s in await syncz(client, OPERATOR_PRINCIPAL)) == [
            "node-1", WAYPOINT_PRINCIPAL,
        ]
        own = (await client.get("/debug/syncz", headers=auth("node-2"))).json()
        assert (own["caller"], own["scope"], own["subscribers"]) == ("node-2", "own", [])
        everything = (await client.get("/debug/syncz", headers=auth(OPERATOR_PRINCIPAL))).json()
        assert (everything["caller"], everything["scope"]) == (OPERATOR_PRINCIPAL, "all")


BROKEN_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
    - from: [{source: {namespaces: [default], notIpBlocks: [10.0.0.0/33]}}]
"""


def policy_errors(text: str) -> float:
    [family] = [
        f for f in text_string_to_metric_families(text)
        if f.name == "istiod_lite_policy_translation_errors"
    ]
    [sample] = family.samples
    return sample.value


async def test_metrics_count_the_policy_parts_that_failed_closed(
    istiod: RunningIstiod, client: httpx.AsyncClient  # noqa: F811
) -> None:
    response = await client.get("/metrics")  # counts only: no token, as istiod's monitoring
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert policy_errors(response.text) == 0

    assert istiod.config.config_dir is not None
    policy_file = istiod.config.config_dir / "policy.yaml"
    policy_file.write_text(BROKEN_POLICY)
    with trio.fail_after(5):
        while policy_errors((await client.get("/metrics")).text) != 1:
            await trio.sleep(0.02)
    # It was translated to fail closed: an ALLOW policy without its broken rule.
    [broken] = [
        r for r in istiod.store.resources() if isinstance(r, Authorization) and r.name == "broken"
    ]
    assert broken.rules == ()

    policy_file.unlink()
    with trio.fail_after(5):
        while policy_errors((await client.get("/metrics")).text) != 0:
            await trio.sleep(0.02)
