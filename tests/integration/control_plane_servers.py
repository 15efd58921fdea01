"""Servers on the istiod side for ztunnel's control-plane client tests.

- ``start_real_istiod``: istiod_lite's own ASGI app (``IstiodApp``) over TLS, with a store of
  the given workloads and one bootstrap token per node.
- ``ScriptedIstiod``: a test double of the remote peer whose discovery answers are scripted
  per connection (good, bad, broken streams, error statuses) and which records every
  request and ACK, for the failure paths a real istiod does not produce on demand.

Both serve HTTP/2 over TLS with a serving certificate from ``tests.pki``.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import trio
from hypercorn.trio import serve as hypercorn_serve

from ambient_api import codec
from ambient_api.discovery import (
    ACK_PATH,
    DISCOVERY_PATH,
    Ack,
    DeltaUpdate,
    DiscoveryRequest,
)
from ambient_api.model import Workload
from istiod_lite.auth import BootstrapTokenAuthenticator
from istiod_lite.discovery import ResourceStore
from istiod_lite.server import IstiodApp, hypercorn_config, serve
from tests.pki import TestPki

PORT = 15012


def workload(name: str, node: str, *, namespace: str = "default", sa: str | None = None,
             address: str = "127.0.20.1") -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(address,),
        service_account=sa or name,
        node=node,
    )


def ndjson(update: DeltaUpdate) -> str:
    return json.dumps(codec.to_jsonable(update)) + "\n"


def write_serving_cert(pki: TestPki, directory: Path, address: str) -> tuple[Path, Path]:
    key_pem, chain = pki.ca.issue_serving_certificate(["istiod.istio-system.svc"], [address])
    certfile, keyfile = directory / f"istiod-{address}.pem", directory / f"istiod-{address}.key"
    certfile.write_text("".join(chain))
    keyfile.write_text(key_pem)
    return certfile, keyfile


def client_ssl_context(pki: TestPki) -> ssl.SSLContext:
    """What a ztunnel uses to reach istiod: verify against the mesh root (IP SAN match)."""
    return ssl.create_default_context(cadata="".join(pki.trust_bundle))


@dataclass
class RealIstiod:
    url: str
    app: IstiodApp
    store: ResourceStore
    pki: TestPki


async def start_real_istiod(
    nursery: trio.Nursery,
    tmp_path: Path,
    address: str,
    pki: TestPki,
    workloads: list[Workload],
    tokens: dict[str, str],
    *,
    max_cert_ttl: timedelta | None = None,
) -> RealIstiod:
    store = ResourceStore()
    store.replace_all(workloads)
    app = IstiodApp(store, pki.ca, BootstrapTokenAuthenticator(tokens), max_cert_ttl=max_cert_ttl)
    certfile, keyfile = write_serving_cert(pki, tmp_path, address)
    config = hypercorn_config(address, PORT, certfile, keyfile, graceful_timeout=0.2)
    await nursery.start(serve, app, config)
    return RealIstiod(f"https://{address}:{PORT}", app, store, pki)


# A connection's script: an HTTP status other than 200 refuses the stream; otherwise the
# lines are sent and then the stream either ends ("close") or stays open ("hang").
@dataclass
class StreamScript:
    lines: list[str] = field(default_factory=list)
    status: int = 200
    then: str = "hang"  # "hang" | "close"


@dataclass
class ScriptedIstiod:
    scripts: list[StreamScript]
    requests: list[DiscoveryRequest] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    ack_received: trio.Event = field(default_factory=trio.Event)

    async def wait_for_acks(self, count: int) -> None:
        while len(self.acks) < count:
            await self.ack_received.wait()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        self.authorizations.append(headers.get(b"authorization", b"").decode())
        if scope["path"] == ACK_PATH:
            self.acks.append(codec.from_jsonable(Ack, json.loads(body)))
            self.ack_received.set()
            self.ack_received = trio.Event()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        assert scope["path"] == DISCOVERY_PATH
        self.requests.append(codec.from_jsonable(DiscoveryRequest, json.loads(body)))
        script = self.scripts.pop(0) if self.scripts else StreamScript()
        if script.status != 200:
            await send({"type": "http.response.start", "status": script.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body",
                        "body": json.dumps({"error": "scripted refusal"}).encode()})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        for line in script.lines:
            await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
        if script.then == "close":
            await send({"type": "http.response.body", "body": b""})
            return
        while (await receive())["type"] != "http.disconnect":
            pass


async def start_scripted_istiod(
    nursery: trio.Nursery, tmp_path: Path, address: str, pki: TestPki, app: ScriptedIstiod
) -> str:
    certfile, keyfile = write_serving_cert(pki, tmp_path, address)
    config = hypercorn_config(address, PORT, certfile, keyfile, graceful_timeout=0.2)
    await nursery.start(hypercorn_serve, app, config)
    return f"https://{address}:{PORT}"
