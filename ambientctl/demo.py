"""``ambientctl demo``: the L4 mesh, shown and checked.

Starts the embedded mesh from ``examples/demo`` (shipped in the wheel, see
``ambientctl.bundled``): istiod_lite, one ztunnel per node and the sample apps, each its own
process. Drives traffic through it and prints what the mesh itself reports: the ztunnels'
metrics say who talked to whom with which SPIFFE ids, their access logs say why a connection
was refused, their admin endpoints list the certificates. Every act is checked; the demo exits
1 if any did not hold.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from ambient_common.errors import describe
from ambientctl.apps import Socks5ConnectError, http_get, socks5_connect
from ambientctl.demo_mesh import PORTS, DemoMesh, DemoReport, Pod
from ambientctl.demo_waypoint import run_waypoint_act
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.mesh import EmbeddedMesh, run_embedded
from ambientctl.ztunnelconfig import certificate_rows
from ztunnel.proxyproto import build_v1_header

HTTPBIN_HOST = "httpbin.demo.svc.cluster.local"
ECHO_HOST = "echo.demo.svc.cluster.local"
HTTP_PORT, ECHO_PORT = 8000, 9000
REQUESTS = 20
SOCKS_PORT, PLAINTEXT_PORT = PORTS.socks5, PORTS.inbound_plaintext


async def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.1)
        return True
    return False


async def act_mtls(demo: DemoMesh, report: DemoReport, sleep: Pod) -> None:
    report.section(
        f"1. {sleep.namespace}/{sleep.name} calls {HTTPBIN_HOST}:{HTTP_PORT} "
        f"{REQUESTS} times through the mesh"
    )
    served: Counter[str] = Counter()
    errors: list[str] = []
    for _ in range(REQUESTS):
        try:
            stream = await socks5_connect(
                sleep.node_address, SOCKS_PORT, HTTPBIN_HOST, HTTP_PORT, source_address=sleep.ip
            )
            async with stream:
                status, _headers, body = await http_get(stream, HTTPBIN_HOST, "/get")
            served[f"{json.loads(body)['pod']} ({status})"] += 1
        except (OSError, ValueError) as exc:
            errors.append(str(exc))
    report.table(
        [{"served_by": k, "requests": v} for k, v in sorted(served.items())],
        ["served_by", "requests"],
    )
    report.check(
        not errors and sum(served.values()) == REQUESTS,
        f"all {REQUESTS} requests answered 200" + (f" ({errors[0]})" if errors else ""),
    )
    report.check(len(served) == 2, "both httpbin endpoints served (v1 and v2)")


async def act_half_close(demo: DemoMesh, report: DemoReport, sleep: Pod) -> None:
    report.section(f"2. raw TCP with half-close: {sleep.name} -> {ECHO_HOST}:{ECHO_PORT}")
    payload = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()
    try:
        stream = await socks5_connect(
            sleep.node_address, SOCKS_PORT, ECHO_HOST, ECHO_PORT, source_address=sleep.ip
        )
        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with stream, trio.open_nursery() as nursery:
            # Read while sending, as any echo client must, or both ends' buffers fill up.
            nursery.start_soon(send)
            while chunk := await stream.receive_some(65536):
                received += chunk
    except OSError as exc:
        report.line(f"  error: {exc}")
    report.line(
        f"  sent {len(payload)} bytes, half-closed, received {len(received)} bytes "
        "and the server's EOF"
    )
    report.check(bytes(received) == payload, "the echo came back whole after the half-close")


async def act_denied(demo: DemoMesh, report: DemoReport, notsleep: Pod, node: str) -> None:
    report.section(
        f"3. {notsleep.namespace}/{notsleep.name} calls {HTTPBIN_HOST}: the "
        "AuthorizationPolicy allows only sa/sleep"
    )
    refused_code: int | None = None
    try:
        stream = await socks5_connect(
            notsleep.node_address, SOCKS_PORT, HTTPBIN_HOST, HTTP_PORT, source_address=notsleep.ip
        )
        await stream.aclose()
    except Socks5ConnectError as exc:
        refused_code = exc.reply_code
    report.check(
        refused_code is not None,
        f"the client's connection was refused (SOCKS5 reply {refused_code})",
    )

    def denial() -> list[dict[str, Any]]:
        return [
            e
            for e in demo.access_log(node, "connection refused")
            if "notsleep" in str(e.get("src.identity"))
        ]

    await _wait_for(lambda: bool(denial()))
    entries = denial()
    report.table(
        [
            {
                "reporter": node,
                "source": e.get("src.identity"),
                "destination": e.get("dst.identity") or e.get("dst.addr"),
                "flags": e.get("response_flags"),
                "reason": e.get("reason"),
            }
            for e in entries[-1:]
        ],
        ["reporter", "source", "destination", "flags", "reason"],
    )
    report.check(
        bool(entries)
        and "DENY" not in str(entries[-1].get("reason"))
        and "ALLOW" in str(entries[-1].get("reason")),
        "the destination ztunnel logged the denial and its reason",
    )


async def act_plaintext(demo: DemoMesh, report: DemoReport, legacy: Pod, target: Pod) -> None:
    report.section(
        f"4. {legacy.namespace}/{legacy.name} (namespace not enrolled) sends "
        f"plaintext to {target.name}: PeerAuthentication STRICT refuses it"
    )
    got = b""
    try:
        stream = await trio.open_tcp_stream(target.ip, PLAINTEXT_PORT, local_address=legacy.ip)
        async with stream:
            await stream.send_all(
                build_v1_header((legacy.ip, 40000), (target.ip, HTTP_PORT))
                + b"GET /get HTTP/1.1\r\nhost: httpbin\r\n\r\n"
            )
            with trio.move_on_after(5):
                got = await stream.receive_some(1024)
    except OSError as exc:
        report.line(f"  connection error: {exc}")
    report.check(got == b"", "the plaintext connection was closed without an answer")

    def refusals() -> list[dict[str, Any]]:
        return [
            e
            for e in demo.access_log(target.node, "connection refused")
            if str(e.get("src.addr", "")).startswith(f"{legacy.ip}:")
        ]

    await _wait_for(lambda: bool(refusals()))
    entries = refusals()
    report.table(
        [
            {
                "source": e.get("src.addr"),
                "destination": e.get("dst.addr"),
                "protocol": e.get("protocol"),
                "reason": e.get("reason"),
            }
            for e in entries[-1:]
        ],
        ["source", "destination", "protocol", "reason"],
    )
    report.check(
        bool(entries) and "peer-authentication" in str(entries[-1].get("reason")),
        "the refusal names the converted STRICT PeerAuthentication",
    )


async def act_who_talked(demo: DemoMesh, report: DemoReport, node: str) -> None:
    report.section(
        f"5. who talked to whom, as {node}'s ztunnel reports it "
        "(istio_tcp_connections_opened_total, reporter=destination)"
    )
    rows: list[dict[str, Any]] = [
        {
            "source_principal": labels.get("source_principal"),
            "destination_service": labels.get("destination_service"),
            "destination_workload": labels.get("destination_workload"),
            "destination_principal": labels.get("destination_principal"),
            "security": labels.get("connection_security_policy"),
            "flags": labels.get("response_flags"),
            "connections": int(value),
        }
        for name, labels, value in await demo.metrics(node)
        if name == "istio_tcp_connections_opened_total"
        and labels.get("reporter") == "destination"
        and value > 0
    ]
    report.table(
        rows,
        [
            "source_principal",
            "destination_service",
            "destination_workload",
            "destination_principal",
            "security",
            "flags",
            "connections",
        ],
    )
    mtls_from_sleep = sum(
        r["connections"]
        for r in rows
        if r["source_principal"] == "spiffe://cluster.local/ns/demo/sa/sleep"
        and r["security"] == "mutual_tls"
        and r["flags"] == "-"
    )
    report.check(
        mtls_from_sleep >= REQUESTS + 1,
        f"{mtls_from_sleep} mutual-TLS connections from sa/sleep were accepted",
    )
    report.check(
        any("notsleep" in str(r["source_principal"]) and r["flags"] == "UAEX" for r in rows),
        "the denied sa/notsleep connection is counted with UAEX",
    )


async def act_certificates(demo: DemoMesh, report: DemoReport) -> None:
    report.section("6. certificates held by each ztunnel (issued by istiod_lite's CA)")
    all_rows = []
    for node in demo.mesh.nodes:
        rows = certificate_rows(await demo.config_dump(node))
        for row in rows:
            row["node"] = node
        all_rows.extend(rows)
    report.table(
        all_rows,
        ["node", "certificate_name", "type", "status", "valid_cert", "serial_number", "not_after"],
    )
    leaves = [r for r in all_rows if r["type"] == "Leaf"]
    report.check(
        bool(leaves)
        and all(r["status"] == "Available" and r["valid_cert"] is True for r in leaves),
        f"{len(leaves)} workload certificates, all valid",
    )


EXCERPT_METRICS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
)
EXCERPT_LABELS = (
    "reporter",
    "source_workload",
    "destination_workload",
    "destination_service",
    "connection_security_policy",
)


def exposition_line(name: str, labels: dict[str, str], value: float) -> str:
    """A sample as the Prometheus text format writes it: ``name{key="value",...} value``."""
    pairs = ",".join(f'{key}="{escape_label(labels[key])}"' for key in EXCERPT_LABELS
                     if key in labels)  # fmt: skip
    number = f"{value:.0f}" if float(value).is_integer() else repr(float(value))
    return f"{name}{{{pairs}}} {number}"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def act_metrics_excerpt(demo: DemoMesh, report: DemoReport, node: str) -> None:
    url = f"http://{demo.mesh.nodes[node]}:{PORTS.metrics}/metrics"
    report.section(f"7. metrics excerpt from {node} ({url})")
    samples = [
        (n, labels, v)
        for n, labels, v in await demo.metrics(node)
        if n.startswith("istio_tcp_") and v > 0 and labels.get("response_flags") == "-"
    ]
    # One sample of each counter, of the busiest source (sleep's connections to httpbin).
    for metric in EXCERPT_METRICS:
        of_metric = [(labels, v) for n, labels, v in samples if n == metric]
        if of_metric:
            labels, value = max(of_metric, key=lambda sample: sample[1])
            report.line(f"  {exposition_line(metric, labels, value)}")
    sent = sum(v for n, _l, v in samples if n == "istio_tcp_sent_bytes_total")
    received = sum(v for n, _l, v in samples if n == "istio_tcp_received_bytes_total")
    report.check(
        sent > 0 and received > 0,
        f"byte counters are reported: {sent:,.0f} bytes sent and {received:,.0f} received "
        f"by {node}'s ztunnel",
    )


async def _run(config_dir: Path, state_dir: Path, out: TextIO) -> int:
    report = DemoReport(out)
    report.line(f"Starting the embedded mesh from {config_dir} (state and logs in {state_dir})")
    async with trio.open_nursery() as nursery:
        mesh: EmbeddedMesh = await nursery.start(run_embedded, config_dir, state_dir)
        report.line(
            f"istiod_lite at {mesh.istiod_address}; ztunnels: "
            + ", ".join(f"{n} at {a}" for n, a in mesh.nodes.items())
        )
        demo = DemoMesh(mesh)
        async with demo.http:
            sleep = await demo.pod("demo", "sleep")
            notsleep = await demo.pod("demo", "notsleep")
            legacy = await demo.pod("legacy", "legacy-client")
            httpbin = await demo.pod("demo", "httpbin-v1")
            await act_mtls(demo, report, sleep)
            await act_half_close(demo, report, sleep)
            await act_denied(demo, report, notsleep, httpbin.node)
            await act_plaintext(demo, report, legacy, httpbin)
            await act_who_talked(demo, report, httpbin.node)
            await act_certificates(demo, report)
            await act_metrics_excerpt(demo, report, httpbin.node)
            await demo.learn_nodes()
            await run_waypoint_act(demo, report, sleep, config_dir)
        nursery.cancel_scope.cancel()
    report.section("result")
    if report.failures:
        report.line(f"{len(report.failures)} check(s) FAILED:")
        for failure in report.failures:
            report.line(f"  - {failure}")
        report.line(f"Logs of every process are in {state_dir / 'logs'}")
        return 1
    report.line(
        "every check held. Explore: `ambientctl up` (the same mesh, to play with) and "
        "`ambientctl ztunnel-config workloads --node node-1`."
    )
    return 0


def run_demo(config_dir: Path, state_dir: Path, out: TextIO = sys.stdout) -> int:
    try:
        return trio.run(_run, config_dir, state_dir, out)
    except BaseExceptionGroup as group:
        startup, rest = group.split(EmbeddedError)
        if startup is None or rest is not None:
            raise
        out.write(f"ambientctl demo: the mesh did not start: {describe(startup)}\n")
        return 1
    except EmbeddedError as exc:
        out.write(f"ambientctl demo: the mesh did not start: {exc}\n")
        return 1
