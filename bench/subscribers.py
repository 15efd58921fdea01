"""Simulated proxies for the control-plane benchmark: real clients of istiod_lite's
discovery endpoint (HTTP/2 over TLS, bearer token per node), many per process.

``python -m bench.subscribers ARGS.json`` opens one discovery stream per node, and prints a
JSON line per event with wall-clock times (``time.time()``, comparable across processes):
``{"started": t}`` once the process starts connecting, ``{"synced": node, "at": t, "bytes":
b}`` for each first (full) update and ``{"probe": name, "node": node, "at": t}`` when an
update carries a probe pod. The probe check is a byte search, so the simulated client's own
decode cost stays out of istiod's numbers; one subscriber per process fully decodes its first
update as a sanity check (``{"decoded": node, "resources": n}``), once every subscriber of
the process has synced, so that its decoding does not delay the others' clocks. Bounded by
``max_seconds``.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ambient_api import codec
from ambient_api.discovery import DISCOVERY_PATH, DeltaUpdate, DiscoveryRequest

PROBE = re.compile(rb"bench-probe-\d+")


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


@dataclass
class Process:
    """What the subscribers of one process share: how many have yet to sync."""

    pending: int
    all_synced: trio.Event = field(default_factory=trio.Event)

    def synced(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.all_synced.set()


async def subscribe(client: httpx.AsyncClient, node: str, token: str, process: Process, *,
                    decode: bool) -> None:
    request = codec.to_jsonable(DiscoveryRequest(node=node, initial_resource_versions={}))
    seen: set[bytes] = set()
    first = True
    async with client.stream(
        "POST", DISCOVERY_PATH, json=request, headers={"authorization": f"Bearer {token}"},
    ) as response:
        if response.status_code != 200:
            emit({"error": f"{node}: HTTP {response.status_code}"})
            return
        parts: list[bytes] = []  # the line being received, in chunks (no quadratic joins)
        async for chunk in response.aiter_bytes():
            lines = chunk.split(b"\n")
            parts.append(lines[0])
            for rest in lines[1:]:
                line, parts = b"".join(parts), [rest]
                if not line or line.isspace():
                    continue
                now = time.time()
                if first:
                    first = False
                    emit({"synced": node, "at": now, "bytes": len(line)})
                    process.synced()
                    if decode:
                        await process.all_synced.wait()
                        update = codec.from_jsonable(DeltaUpdate, json.loads(line))
                        emit({"decoded": node, "resources": len(update.resources)})
                    continue  # probes are written after every subscriber synced
                for probe in set(PROBE.findall(line)) - seen:
                    seen.add(probe)
                    emit({"probe": probe.decode(), "node": node, "at": now})


async def run(args: dict[str, Any]) -> None:
    context = ssl.create_default_context(cafile=args["root_cert"])
    context.check_hostname = False  # istiod's serving cert is checked against the mesh root
    limits = httpx.Limits(max_connections=1)
    process = Process(pending=len(args["nodes"]))
    # The clock of "time to full sync" starts here, not at process start: interpreter
    # start-up and imports are the load generator's cost, not istiod's.
    emit({"started": time.time()})
    with trio.move_on_after(float(args["max_seconds"])):
        async with trio.open_nursery() as nursery:
            for index, (node, token) in enumerate(args["nodes"]):
                client = httpx.AsyncClient(
                    base_url=args["url"], http2=True, verify=context, limits=limits,
                    timeout=httpx.Timeout(30.0, read=None), trust_env=False,
                )
                nursery.start_soon(_subscribe_and_close, client, node, token, process,
                                   index == 0)


async def _subscribe_and_close(
    client: httpx.AsyncClient, node: str, token: str, process: Process, decode: bool
) -> None:
    async with client:
        try:
            await subscribe(client, node, token, process, decode=decode)
        except httpx.HTTPError as exc:
            emit({"error": f"{node}: {exc!r}"})


def main(argv: list[str]) -> int:
    trio.run(run, json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
