"""Issue 5's proofs in a three-node lab (root only): unmodified clients in real network
namespaces get mutual TLS without knowing it.

One lab serves the whole module (it takes a few seconds to build): a background thread runs
``run_lab`` under its own Trio loop, the tests drive it with ``ip netns exec`` subprocesses
(curl, nc, Python's ``http.client`` and sockets: none knows about the mesh) and change the
mesh's configuration live by editing the YAML copy istiod_lite reads
(``lab.paths.config_dir``). Packet captures run ``tcpdump`` on the destination node's link
inside the lab's wire namespace; nothing here touches the host's network.

Each test puts the live configuration it needs in place first, so they do not depend on
their order, except that enrolment and the ztunnel restart leave the lab changed (they run
last in file order).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ambient_common.files import write_atomically
from ambientctl.lab.mesh import Lab, run_lab
from ambientctl.lab.netns import in_netns
from ambientctl.lab.network import take_down
from ambientctl.lab.plan import LabPlan
from ambientctl.lab.state import LabPaths
from tests.integration.netns_helpers import netns_unusable

# ---------------------------------------------------------------------------------------------
# Can the lab run here?


REASON = netns_unusable("iptables-restore", "tcpdump", "nc", "curl", nat_table=True)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

# ---------------------------------------------------------------------------------------------
# The cluster

NAMESPACES_FILE = "namespaces.yaml"
STRICT_FILE = "strict.yaml"
DENY_FILE = "deny.yaml"

DEMO_NAMESPACE = "apiVersion: v1\nkind: Namespace\n" \
    "metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"  # fmt: skip
LEGACY_UNENROLLED = "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n"
LEGACY_ENROLLED = "apiVersion: v1\nkind: Namespace\n" \
    "metadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n"  # fmt: skip

CLUSTER = """\
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 127.0.10.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 127.0.10.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3}
status: {addresses: [{type: InternalIP, address: 127.0.10.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, image: curl}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo, labels: {app: server}}
spec:
  nodeName: node-2
  containers:
  - name: s
    image: echo
    ports: [{name: http, containerPort: 8080}, {name: tcp-echo, containerPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: server}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-echo, port: 9000, targetPort: 9000}
---
apiVersion: v1
kind: Pod
metadata: {name: old-client, namespace: legacy, labels: {app: old-client}}
spec: {nodeName: node-3, containers: [{name: c, image: curl}]}
"""

STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"""

# L4 only (principals and ports), so the destination ztunnel enforces it.
DENY_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/default]}}]
    to: [{operation: {ports: ["8080", "9000"]}}]
"""

CLIENT = "demo/client"
SERVER = "demo/server"
LEGACY = "legacy/old-client"
DEMO_IDENTITY = "spiffe://cluster.local/ns/demo/sa/default"
LEGACY_IDENTITY = "spiffe://cluster.local/ns/legacy/sa/default"
PROPAGATION_TIMEOUT = 10.0
DRAIN_TIMEOUT = 8.0

# ---------------------------------------------------------------------------------------------
# Unmodified clients (standard library only; run with `ip netns exec <pod> python -c`)

# Connect, send, half-close, read until the server closes: prints what came back as JSON.
HALF_CLOSE_CLIENT = textwrap.dedent("""\
    import json, socket, sys
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = (sys.argv[4].encode() * (size // len(sys.argv[4]) + 1))[:size]
    try:
        conn = socket.create_connection((host, port), timeout=5)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := conn.recv(65536):
            received += chunk
        print(json.dumps({"ok": bytes(received) == payload, "received": len(received)}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": repr(exc)}))
""")

# One long-lived process: each stdin line "HOST PORT MARKER" opens a connection, sends the
# marker, half-closes and reports the echo. The same process (the "pod" is never restarted)
# is used before and after its namespace is enrolled.
DRIVER = textwrap.dedent("""\
    import json, socket, sys
    for line in sys.stdin:
        host, port, marker = line.split()
        try:
            conn = socket.create_connection((host, int(port)), timeout=3)
            conn.settimeout(3)
            conn.sendall(marker.encode())
            conn.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := conn.recv(4096):
                received += chunk
            result = {"ok": received == marker.encode(), "received": received.decode()}
        except OSError as exc:
            result = {"ok": False, "error": repr(exc)}
        print(json.dumps(result), flush=True)
""")

# A connection that keeps flowing: one chunk echoed every INTERVAL seconds for DURATION, then
# half-close and read to the end. Says "flowing" after the first echo, so the test can change
# things while it is open; stdin lines make it say where it is ("at N").
LONG_LIVED = textwrap.dedent("""\
    import json, socket, sys, time
    host, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    conn = socket.create_connection((host, port), timeout=5)
    chunks = 0
    deadline = time.monotonic() + duration
    try:
        while True:
            chunk = b"chunk-%06d;" % chunks
            conn.sendall(chunk)
            echoed = b""
            while len(echoed) < len(chunk):
                part = conn.recv(len(chunk) - len(echoed))
                if not part:
                    raise ConnectionError("closed by the peer mid-stream")
                echoed += part
            if echoed != chunk:
                raise ConnectionError(f"corrupted echo {echoed!r}")
            chunks += 1
            if chunks == 1:
                print("flowing", flush=True)
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        conn.shutdown(socket.SHUT_WR)
        rest = conn.recv(100)
        print(json.dumps({"ok": rest == b"", "chunks": chunks}), flush=True)
    except OSError as exc:
        print(json.dumps({"ok": False, "chunks": chunks, "error": repr(exc)}), flush=True)
""")

HTTP_CLIENT = textwrap.dedent("""\
    import http.client, json, sys
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
    conn.request("POST", "/submit", body=sys.argv[3].encode(),
                 headers={"x-marker": sys.argv[3]})
    response = conn.getresponse()
    print(json.dumps({"status": response.status, "body": json.loads(response.read())}))
""")

FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3)" \
    ".read().decode())"  # fmt: skip

# ---------------------------------------------------------------------------------------------
# The lab, once per module


@dataclass
class RunningLab:
    """The lab and a handle on the Trio loop that runs it (for the supervisor)."""

    lab: Lab
    token: trio.lowlevel.TrioToken
    config_dir: Path

    @property
    def plan(self) -> LabPlan:
        return self.lab.plan

    def ip(self, pod: str) -> str:
        return self.lab.pod(pod).address

    @property
    def vip(self) -> str:
        return self.plan.service_addresses["demo/server"]

    def node_address(self, node: str) -> str:
        return self.plan.node(node).address

    def exec_argv(self, pod: str, argv: Sequence[str]) -> list[str]:
        return self.lab.exec_argv(pod, argv)

    def run(self, pod: str, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 15.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(self.exec_argv(pod, argv), input=stdin, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def python(self, pod: str, script: str, *args: object) -> Any:
        """Run a client script in the pod; its one JSON line."""
        done = self.run(pod, [sys.executable, "-c", script, *map(str, args)])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def metrics(self, node: str) -> str:
        """The node's ztunnel /metrics, read from the control namespace (the host has no
        route to lab addresses)."""
        url = f"http://{self.node_address(node)}:15020/metrics"
        done = subprocess.run(in_netns(self.plan.control_netns, [sys.executable, "-c", FETCH,
                                                                 url]),
                              capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def log(self, process: str) -> list[dict[str, Any]]:
        assert self.lab.supervisor is not None
        entries = []
        for line in self.lab.supervisor.log_path(process).read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def write_config(self, name: str, content: str | None) -> None:
        """Change istiod_lite's live input: write (or, with None, remove) one YAML file."""
        path = self.config_dir / name
        if content is None:
            path.unlink(missing_ok=True)
        else:
            write_atomically(path, content, 0o644)

    def restart(self, process: str) -> None:
        assert self.lab.supervisor is not None
        trio.from_thread.run(self.lab.supervisor.restart, process, trio_token=self.token)


def _lab_thread(config_dir: Path, state_dir: Path, name: str,
                started: queue.Queue[Any], stop: threading.Event) -> None:  # fmt: skip
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            lab: Lab = await nursery.start(partial(
                run_lab, config_dir, state_dir, name=name, ready_timeout=20.0,
                drain_timeout=DRAIN_TIMEOUT,
            ))  # fmt: skip
            started.put((lab, trio.lowlevel.current_trio_token()))
            while not stop.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # reported to the fixture, which fails with it
        started.put(exc)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    root = tmp_path_factory.mktemp("capture-lab")
    config_dir = root / "yaml"
    config_dir.mkdir()
    (config_dir / NAMESPACES_FILE).write_text(DEMO_NAMESPACE + "---\n" + LEGACY_UNENROLLED)
    (config_dir / "cluster.yaml").write_text(CLUSTER)
    (config_dir / STRICT_FILE).write_text(STRICT)
    state_dir = root / "lab"
    name = f"cap{os.getpid() % 100000}x{secrets.token_hex(2)}"
    started: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_lab_thread, args=(config_dir, state_dir, name, started,
                                                        stop), daemon=True)  # fmt: skip
    thread.start()
    try:
        result = started.get(timeout=60)
        if isinstance(result, BaseException):
            raise result
        running_lab, token = result
        yield RunningLab(running_lab, token, running_lab.paths.config_dir)
    finally:
        stop.set()
        thread.join(timeout=30)
        # Whatever went wrong, the lab's own down removes what is left.
        if (state_dir / "lab.json").exists():
            take_down(LabPaths(state_dir), timeout=2.0)
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert f"{name}-" not in leftover.stdout


def eventually(attempt: Callable[[], Any], *, timeout: float = PROPAGATION_TIMEOUT,
               what: str) -> Any:  # fmt: skip
    """Retry ``attempt`` until it returns something truthy: config changes propagate
    (file poll -> istiod -> ztunnel -> rules) within a second or two."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {result!r})")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Packet capture on a node's link, and a minimal pcap reader


@dataclass(frozen=True)
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    syn: bool
    payload: bytes


def read_pcap(path: Path) -> list[Segment]:
    """TCP/IPv4 segments of an Ethernet pcap (the classic format tcpdump -w writes)."""
    data = path.read_bytes()
    if len(data) < 24:
        raise AssertionError(f"{path}: not a pcap file ({len(data)} bytes)")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError(f"{path}: unknown pcap magic {magic.hex()}")
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    assert linktype == 1, f"expected an Ethernet capture, got link type {linktype}"
    segments = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, captured, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header_length = (ip[0] & 0x0F) * 4
        (total_length,) = struct.unpack("!H", ip[2:4])
        if ip[9] != 6:
            continue
        tcp = ip[header_length:total_length]  # total_length drops Ethernet padding
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        data_offset = (tcp[12] >> 4) * 4
        segments.append(Segment(
            src=".".join(map(str, ip[12:16])), sport=sport,
            dst=".".join(map(str, ip[16:20])), dport=dport, seq=seq,
            syn=bool(tcp[13] & 0x02), payload=bytes(tcp[data_offset:]),
        ))  # fmt: skip
    return segments


MAX_TLS_RECORD = 5 + 2**14 + 256  # header + the largest ciphertext TLS allows


def tls_records(stream: bytes, *, from_start: bool = True) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record of a byte stream; AssertionError when the
    bytes are not TLS framing (plaintext would not be). A stream whose start was not
    captured (a pooled connection opened earlier) may begin inside a record: the first
    offset from which the rest parses as whole records is taken (plaintext has none)."""
    if from_start:
        records = _parse_records(stream)
        assert records is not None, f"not TLS records: {stream[:32]!r}"
        return records
    for offset in range(min(len(stream), MAX_TLS_RECORD)):
        records = _parse_records(stream[offset:])
        if records:
            return records
    raise AssertionError(f"no TLS record framing in a captured stream: {stream[:32]!r}")


def _parse_records(stream: bytes) -> list[tuple[int, int]] | None:
    """The records when ``stream`` is exactly a sequence of whole TLS records, else None."""
    records = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < 5:
            return None
        content_type, version, length = struct.unpack("!BHH", stream[offset : offset + 5])
        if content_type not in (20, 21, 22, 23) or version not in (0x0301, 0x0303):
            return None
        if length > MAX_TLS_RECORD - 5 or offset + 5 + length > len(stream):
            return None
        records.append((content_type, length))
        offset += 5 + length
    return records


FlowKey = tuple[str, int, str, int]


@dataclass(frozen=True)
class Flow:
    data: bytes
    from_start: bool  # the SYN was captured: ``data`` starts at the first byte


def flows(segments: Sequence[Segment]) -> dict[FlowKey, Flow]:
    """Each direction's bytes in sequence order (retransmissions counted once), from its
    first byte when the SYN was captured, else from the first segment seen."""
    base: dict[FlowKey, int] = {}
    from_start: set[FlowKey] = set()
    for segment in segments:
        key = (segment.src, segment.sport, segment.dst, segment.dport)
        if segment.syn:
            base[key] = segment.seq + 1
            from_start.add(key)
        elif segment.payload:
            base.setdefault(key, segment.seq)
    pieces: dict[FlowKey, dict[int, bytes]] = {}
    for segment in segments:
        key = (segment.src, segment.sport, segment.dst, segment.dport)
        if segment.payload:
            relative = (segment.seq - base[key]) % 2**32
            pieces.setdefault(key, {})[relative] = segment.payload
    result = {}
    for key, by_offset in pieces.items():
        stream = bytearray()
        for relative, payload in sorted(by_offset.items()):
            assert relative <= len(stream), f"{key}: a gap in the capture at {len(stream)}"
            if relative + len(payload) > len(stream):
                stream += payload[len(stream) - relative :]
        result[key] = Flow(bytes(stream), key in from_start)
    return result


@contextmanager
def capture_node_link(lab: RunningLab, node: str, path: Path) -> Iterator[Path]:
    """tcpdump on ``node``'s link to the bridge (its veth end in the lab's wire namespace):
    everything that node sends or receives from other nodes, control plane excluded."""
    interface = lab.plan.node(node).wire_ifname
    argv = in_netns(lab.plan.wire_netns, [
        "tcpdump", "--immediate-mode", "-Z", "root", "-i", interface, "-n", "-U", "-s", "0",
        "-w", str(path),
        f"tcp and net {lab.plan.subnet} and not host {lab.plan.control_address}",
    ])  # fmt: skip
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # "listening on vnode2, link-type EN10MB ..."
        assert "listening on" in line, f"tcpdump did not start: {line}{process.stderr.read()}"
        yield path
        time.sleep(0.2)  # the last segments (FIN/ACK) reach the file
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric_lines(text: str, name: str, **labels: str) -> list[str]:
    """Samples of ``name`` having every given label value."""
    return [
        line for line in text.splitlines()
        if line.startswith(name + "{")
        and all(f'{key}="{value}"' in line for key, value in labels.items())
    ]  # fmt: skip


def metric_total(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric_lines(text, name, **labels))


# ---------------------------------------------------------------------------------------------
# 1. Unmodified HTTP and TCP clients, mutual TLS on the wire


def test_unmodified_clients_get_mutual_tls_between_nodes(lab: RunningLab, tmp_path: Path) -> None:
    marker = f"plaintext-marker-{secrets.token_hex(8)}"
    with capture_node_link(lab, "node-2", tmp_path / "mtls.pcap") as pcap:
        curl = lab.run(CLIENT, ["curl", "-sS", "-m", "5", "-H", f"x-marker: {marker}",
                                f"http://{lab.vip}/{marker}"])  # fmt: skip
        http_answer = lab.python(CLIENT, HTTP_CLIENT, lab.vip, 80, marker)
        nc = lab.run(CLIENT, ["nc", "-N", "-w", "5", lab.vip, "9000"], stdin=marker + "\n")
    assert curl.returncode == 0, curl.stderr
    echoed = json.loads(curl.stdout)
    assert echoed["pod"] == "server" and echoed["path"] == f"/{marker}"
    assert echoed["headers"]["x-marker"] == marker
    # The app was reached from inside its own namespace (ztunnel's in-pod socket on 15008
    # delivers locally); unlike Istio's ztunnel, the client's address is not preserved.
    assert echoed["peer"].startswith(lab.ip(SERVER) + ":")
    assert http_answer["status"] == 200
    assert http_answer["body"]["body_length"] == len(marker)
    assert nc.returncode == 0, nc.stderr
    assert nc.stdout == marker + "\n"

    segments = read_pcap(pcap)
    carrying = [s for s in segments if s.payload]
    assert carrying, "the capture saw no traffic at all"
    # No byte of the requests or answers crossed the node link in the clear...
    assert not any(marker.encode() in s.payload for s in segments)
    # ...and everything between the pods' nodes went to or came from HBONE's port, as TLS.
    assert all(15008 in (s.sport, s.dport) for s in carrying), sorted(
        {(s.src, s.sport, s.dst, s.dport) for s in carrying if 15008 not in (s.sport, s.dport)}
    )
    assert {s.src for s in carrying if s.dport == 15008} == {lab.ip(CLIENT)}
    assert {s.dst for s in carrying if s.dport == 15008} == {lab.ip(SERVER)}
    # Each direction of each connection is a sequence of TLS records carrying application
    # data (a connection opened in this capture starts with the ClientHello / ServerHello;
    # one the pool opened earlier is picked up mid-stream).
    streams = flows(segments)
    for key, flow in streams.items():
        records = tls_records(flow.data, from_start=flow.from_start)
        assert 23 in {kind for kind, _ in records}, f"{key}: no TLS application data"
        if flow.from_start:
            assert records[0][0] == 22 and flow.data[5] in (1, 2), f"{key}: no TLS handshake"
    assert any(key[3] == 15008 for key in streams), "no TLS towards 15008"

    # The destination ztunnel saw the client's SPIFFE id, authenticated by mTLS.
    inbound = [e for e in lab.log("ztunnel-node-2")
               if e.get("direction") == "inbound" and e.get("event") == "connection complete"
               and str(e.get("src.addr", "")).startswith(lab.ip(CLIENT) + ":")]  # fmt: skip
    assert inbound, "no inbound access-log line on node-2"
    assert all(e["protocol"] == "HBONE" and e["src.identity"] == DEMO_IDENTITY for e in inbound)
    destination = lab.metrics("node-2")
    assert metric_total(destination, "istio_tcp_connections_opened_total",
                        reporter="destination", source_principal=DEMO_IDENTITY,
                        destination_principal="spiffe://cluster.local/ns/demo/sa/default",
                        destination_workload="server",
                        connection_security_policy="mutual_tls") >= 3  # fmt: skip
    source = lab.metrics("node-1")
    assert metric_total(source, "istio_tcp_connections_opened_total", reporter="source",
                        source_workload="client", destination_service_name="server",
                        connection_security_policy="mutual_tls") >= 3  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. An L4 DENY policy, added and removed live


def test_an_l4_deny_policy_blocks_the_client_live(lab: RunningLab) -> None:
    lab.write_config(DENY_FILE, None)

    def through() -> bool:
        return bool(lab.python(CLIENT, HALF_CLOSE_CLIENT, lab.vip, 9000, 16, "d")["ok"])

    eventually(through, what="the client reaches the server before the policy")
    try:
        lab.write_config(DENY_FILE, DENY_CLIENT)
        eventually(lambda: not through(), what="the DENY policy blocks the client")
        curl = lab.run(CLIENT, ["curl", "-sS", "-m", "5", f"http://{lab.vip}/"])
        assert curl.returncode != 0 and curl.stdout == ""
        denied = [e for e in lab.log("ztunnel-node-2")
                  if e.get("event") == "connection refused" and e.get("direction") == "inbound"
                  and e.get("src.identity") == DEMO_IDENTITY]  # fmt: skip
        assert denied and "deny-client" in json.dumps(denied[-1])
        assert metric_total(lab.metrics("node-2"), "istio_tcp_connections_opened_total",
                            reporter="destination", source_principal=DEMO_IDENTITY,
                            response_flags="UAEX") >= 1  # fmt: skip
    finally:
        lab.write_config(DENY_FILE, None)
    eventually(through, what="removing the policy lets the client through again")


# ---------------------------------------------------------------------------------------------
# 3 + 4. An un-enrolled pod: refused by STRICT, plaintext without it, mTLS once enrolled


@contextmanager
def driver(lab: RunningLab, pod: str) -> Iterator[Callable[[str], dict[str, Any]]]:
    """A long-lived client process in ``pod``; calling the result makes one connection to
    the server pod's TCP echo and returns its outcome."""
    process = subprocess.Popen(
        lab.exec_argv(pod, [sys.executable, "-u", "-c", DRIVER]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def connect(marker: str) -> dict[str, Any]:
        stdin.write(f"{lab.ip(SERVER)} 9000 {marker}\n")
        stdin.flush()
        result: dict[str, Any] = json.loads(stdout.readline())
        return result

    try:
        yield connect
    finally:
        stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_strict_refuses_an_unenrolled_pod_and_enrolling_it_live_switches_it_to_mtls(
    lab: RunningLab, tmp_path: Path
) -> None:
    lab.write_config(NAMESPACES_FILE, DEMO_NAMESPACE + "---\n" + LEGACY_UNENROLLED)
    lab.write_config(STRICT_FILE, STRICT)
    with driver(lab, LEGACY) as connect:
        # STRICT: the legacy pod's plaintext reaches node-2, is captured into ztunnel's 15006
        # inside the server pod's namespace and refused there.
        marker = f"refused-{secrets.token_hex(6)}"
        with capture_node_link(lab, "node-2", tmp_path / "strict.pcap") as pcap:
            refused = eventually(lambda: (r := connect(marker)) and not r["ok"] and r,
                                 what="STRICT refuses the un-enrolled pod")  # fmt: skip
        assert refused.get("received", "") == ""
        plain = [s for s in read_pcap(pcap) if marker.encode() in s.payload]
        assert plain and all((s.src, s.dst, s.dport) == (lab.ip(LEGACY), lab.ip(SERVER), 9000)
                             for s in plain)  # fmt: skip
        rejected = [e for e in lab.log("ztunnel-node-2")
                    if e.get("event") == "connection refused"
                    and str(e.get("src.addr", "")).startswith(lab.ip(LEGACY) + ":")]  # fmt: skip
        assert rejected and rejected[-1]["protocol"] == "TCP"
        assert "converted-peer-authentication-strict" in json.dumps(rejected[-1])

        # Without STRICT the same pod gets through, in plaintext (the capture sees it: this
        # is what the mTLS assertions would catch).
        lab.write_config(STRICT_FILE, None)
        marker = f"plaintext-{secrets.token_hex(6)}"
        with capture_node_link(lab, "node-2", tmp_path / "permissive.pcap") as pcap:
            accepted = eventually(
                lambda: (r := connect(marker))["ok"] and r,
                what="without STRICT the plaintext connection is accepted",
            )
        assert accepted["received"] == marker
        plaintext = read_pcap(pcap)
        assert any(marker.encode() in s.payload and s.dport == 9000 for s in plaintext)
        # ...and the TLS check of the first test rejects such a stream.
        to_app = [f for key, f in flows(plaintext).items() if key[3] == 9000]
        assert to_app
        for flow in to_app:
            with pytest.raises(AssertionError):
                tls_records(flow.data, from_start=flow.from_start)
        assert metric_total(lab.metrics("node-2"), "istio_tcp_connections_opened_total",
                            reporter="destination", destination_workload="server",
                            source_workload="old-client",
                            connection_security_policy="unknown") >= 1  # fmt: skip

        # STRICT again, and the legacy namespace enrolled live: the same process in the same
        # (never restarted) pod now goes through its node's ztunnel over mTLS.
        lab.write_config(STRICT_FILE, STRICT)
        eventually(lambda: not connect(f"strict-again-{secrets.token_hex(4)}")["ok"],
                   what="STRICT is back")  # fmt: skip
        before = metric_total(lab.metrics("node-2"), "istio_tcp_connections_opened_total",
                              reporter="destination", source_principal=LEGACY_IDENTITY,
                              connection_security_policy="mutual_tls")  # fmt: skip
        lab.write_config(NAMESPACES_FILE, DEMO_NAMESPACE + "---\n" + LEGACY_ENROLLED)
        with capture_node_link(lab, "node-2", tmp_path / "enrolled.pcap") as pcap:
            # A fresh marker per attempt: attempts made before node-3's ztunnel captured the
            # pod went out in plaintext (and were refused); the one that passed must not.
            enrolled = eventually(
                lambda: (r := connect(f"enrolled-{secrets.token_hex(6)}"))["ok"] and r,
                what="the enrolled pod gets through STRICT",
            )
        marker = enrolled["received"]
        segments = read_pcap(pcap)
        assert not any(marker.encode() in s.payload for s in segments)
        assert any(s.dport == 15008 and s.src == lab.ip(LEGACY) and s.payload for s in segments)
        after = metric_total(lab.metrics("node-2"), "istio_tcp_connections_opened_total",
                             reporter="destination", source_principal=LEGACY_IDENTITY,
                             source_workload="old-client",
                             connection_security_policy="mutual_tls")  # fmt: skip
        assert after > before
    # Enrolment made node-3's ztunnel capture the pod: its rules are in the pod's namespace.
    rules = lab.run(LEGACY, ["iptables-save", "-t", "nat"])
    assert "AMBLITE" in rules.stdout, rules.stdout + rules.stderr


# ---------------------------------------------------------------------------------------------
# 5. Half-close and a connection kept open across a config change


def test_half_close_and_a_long_lived_connection_across_a_config_change(
    lab: RunningLab,
) -> None:
    # 1 MiB, then SHUT_WR: the echo sees the end of the stream through both ztunnels and
    # HBONE, finishes sending, and closes; every byte comes back.
    answer = lab.python(CLIENT, HALF_CLOSE_CLIENT, lab.vip, 9000, 1 << 20, "half-close;")
    assert answer == {"ok": True, "received": 1 << 20}
    nc = lab.run(CLIENT, ["nc", "-N", "-w", "5", lab.ip(SERVER), "9000"], stdin="via nc\n")
    assert (nc.returncode, nc.stdout) == (0, "via nc\n"), nc.stderr

    long_lived = subprocess.Popen(
        lab.exec_argv(CLIENT, [sys.executable, "-u", "-c", LONG_LIVED, lab.vip, "9000", "3"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert long_lived.stdout is not None
        assert long_lived.stdout.readline() == "flowing\n"
        # A config change pushed to every ztunnel while the connection flows (a policy that
        # does not concern it).
        lab.write_config("unrelated.yaml", DENY_CLIENT.replace("deny-client", "deny-nobody")
                         .replace("cluster.local/ns/demo/sa/default",
                                  "cluster.local/ns/nowhere/sa/nobody"))  # fmt: skip
        result = json.loads(long_lived.stdout.readline())
        assert long_lived.wait(timeout=10) == 0
    finally:
        lab.write_config("unrelated.yaml", None)
        if long_lived.poll() is None:
            long_lived.kill()
            long_lived.wait()
    assert result["ok"], result
    assert result["chunks"] > 20


# ---------------------------------------------------------------------------------------------
# 6. Restarting the destination node's ztunnel drains its connections


def test_a_ztunnel_restart_drains_connections_instead_of_resetting_them(
    lab: RunningLab,
) -> None:
    assert lab.python(CLIENT, HALF_CLOSE_CLIENT, lab.vip, 9000, 64, "x")["ok"]
    flow_seconds = 2.5
    long_lived = subprocess.Popen(
        lab.exec_argv(CLIENT, [sys.executable, "-u", "-c", LONG_LIVED, lab.vip, "9000",
                               str(flow_seconds)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert long_lived.stdout is not None
        assert long_lived.stdout.readline() == "flowing\n"
        log_lines_before = len(lab.log("ztunnel-node-2"))
        # Returns once the old ztunnel has exited (after draining) and the new one started.
        lab.restart("ztunnel-node-2")
        result = json.loads(long_lived.stdout.readline())
        assert long_lived.wait(timeout=10) == 0
    finally:
        if long_lived.poll() is None:
            long_lived.kill()
            long_lived.wait()
    # The connection's data all came back and it ended with a clean close, not a reset.
    assert result["ok"], result
    # The old ztunnel waited for it (its log shows the drain and the connection completing)
    # and did not give up at the drain timeout.
    old_run = lab.log("ztunnel-node-2")[log_lines_before:]
    events = [e.get("event") for e in old_run]
    assert "draining" in events
    assert not any("drain timeout" in str(e) for e in events)
    completed = [e for e in old_run if e.get("event") == "connection complete"
                 and e.get("direction") == "inbound"]  # fmt: skip
    assert completed, events

    # New connections work once the new ztunnel has taken the pod over.
    eventually(lambda: lab.python(CLIENT, HALF_CLOSE_CLIENT, lab.vip, 9000, 4096, "new")["ok"],
               what="a new connection after the restart")  # fmt: skip
    curl = lab.run(CLIENT, ["curl", "-sS", "-m", "5", f"http://{lab.vip}/after-restart"])
    assert curl.returncode == 0 and json.loads(curl.stdout)["path"] == "/after-restart"
