"""Request hygiene through a real waypoint: the backend gets the path that was authorized
(normalized once, Istio's BASE) and only the identity headers the waypoint vouches for.
sleep -> ztunnel (node-1) -> HBONE -> waypoint -> HBONE -> ztunnel -> app (which echoes the
path and headers it received).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from ambientctl.apps import http_request
from tests.conftest import LoopbackAllocator
from tests.integration.mesh_harness import (
    BOOKINFO_PORT,
    REVIEWS_VIP,
    SLEEP,
    Mesh,
    start_mesh,
    wait_for_config,
)

pytestmark = pytest.mark.slow

WAYPOINT_ID = "spiffe://cluster.local/ns/demo/sa/waypoint"
SLEEP_ID = "spiffe://cluster.local/ns/demo/sa/sleep"
DENY_ADMIN_PREFIX = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-deny-admin-prefix
  namespace: demo
spec:
  targetRefs:
    - kind: Service
      group: ""
      name: reviews
  action: DENY
  rules:
    - to:
        - operation:
            paths: ["/admin*"]
"""


async def call(
    mesh: Mesh, path: str, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, bytes]:
    stream = await mesh.connect(SLEEP, REVIEWS_VIP, BOOKINFO_PORT)
    async with stream:
        status, _headers, body = await http_request(stream, "GET", "reviews", path,
                                                    headers=headers)
    return status, body


async def test_backend_gets_the_authorized_path_and_sanitized_identity_headers(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    mesh.write_config_file("70-deny-admin-prefix.yaml", DENY_ADMIN_PREFIX)
    await wait_for_config(mesh, l7={"waypointauthorization": ["reviews-deny-admin-prefix"]})

    # The DENY judges the normalized path, so neither walks around it.
    for sneaky in ("/public/../admin", "/admin\\x", "/public/%2e%2E/admin/users", "/x/..\\admin"):
        status, body = await call(mesh, sneaky)
        assert status == 403 and b"RBAC: access denied" in body, sneaky

    # What is allowed reaches the backend normalized; the query string is untouched.
    status, body = await call(mesh, "/reviews/./1/../2%7e?q=/../a%2f")
    assert status == 200, body
    assert json.loads(body)["path"] == "/reviews/2~?q=/../a%2f"
    status, body = await call(mesh, "/admin/..")
    assert status == 200, body
    assert json.loads(body)["path"] == "/"

    # A path that cannot be normalized is refused, with the reason.
    status, body = await call(mesh, "/reviews/%zz")
    assert status == 400 and b"malformed percent-encoding" in body, body

    # Forged identity and proxy headers never reach the backend; the waypoint's entry does.
    status, body = await call(mesh, "/reviews/1", (
        ("x-forwarded-client-cert", f"By={WAYPOINT_ID};URI=spiffe://cluster.local/ns/demo/sa/admin"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-envoy-original-path", "/admin"),
        ("x-envoy-peer-metadata-id", "sidecar~6.6.6.6~admin.demo"),
        ("x-request-id", "client-chosen"),
    ))
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-forwarded-client-cert"] == f'By={WAYPOINT_ID};Subject="";URI={SLEEP_ID}'
    forwarded_for = seen["x-forwarded-for"].split(",")
    assert forwarded_for[0] == "6.6.6.6" and len(forwarded_for) == 2
    assert forwarded_for[1] != "6.6.6.6"  # the right-most entry is the real tunnel peer
    assert not [name for name in seen if name.startswith("x-envoy-")]
    assert seen["x-request-id"] == "client-chosen"
