"""The benchmark's own processes: backends (sink, 1 KB HTTP, echo) and load generators.

Each runs as ``python -m bench.workers <role> '<json args>'`` in a process of its own, so its
CPU never counts against a proxy's. They use plain blocking sockets and threads (the kernel
does the copying; the GIL is released in every socket call), print one JSON object on
stdout and stop by themselves: every loop is bounded in count and time. Only loopback.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ambientctl.apps import (
    SOCKS5_GREETING,
    check_method_selection,
    socks5_connect_request,
    socks5_reply_remaining,
)

CHUNK = 1 << 20
RESPONSE_BODY = b"x" * 1024
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
    b"content-length: 1024\r\n\r\n" + RESPONSE_BODY
)


# Linux's IP_BIND_ADDRESS_NO_PORT (not exported by the socket module).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class WorkerError(RuntimeError):
    """A load generator could not do its job (connect or protocol failure)."""


def require_loopback(host: str) -> str:
    """The benchmark never targets anything but loopback."""
    if not host.startswith("127."):
        raise WorkerError(f"refusing non-loopback address {host!r}")
    return host


@dataclass(frozen=True)
class Route:
    """How a load generator reaches its target: straight (no mesh, or an Envoy client
    listener that knows its target) or through a ztunnel's SOCKS5 port from a pod IP."""

    kind: str  # "direct" | "socks"
    host: str
    port: int
    source: str = ""
    dest_host: str = ""
    dest_port: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        route = cls(**data)
        if route.kind not in ("direct", "socks"):
            raise WorkerError(f"unknown route kind {route.kind!r}")
        for host in (route.host, route.source, route.dest_host):
            if host:
                require_loopback(host)
        return route

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if self.source:
                # Pick the source port at connect(), not bind(): a bind to port 0 scans every
                # port in use, TIME-WAIT included, and churn leaves tens of thousands of them
                # (connecting took ~3 ms then, for every system alike).
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.kind == "socks":
                socks5_handshake(sock, self.dest_host, self.dest_port)
        except BaseException:
            sock.close()
            raise
        return sock


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise WorkerError(f"peer closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def socks5_handshake(sock: socket.socket, host: str, port: int) -> None:
    """SOCKS5 no-auth CONNECT (what ztunnel's port 15080 speaks), with the sans-IO pieces of
    ``ambientctl.apps``' client; a refusal raises ``Socks5ConnectError`` (an OSError)."""
    sock.sendall(SOCKS5_GREETING)
    check_method_selection(receive_exactly(sock, 2))
    sock.sendall(socks5_connect_request(host, port))
    receive_exactly(sock, socks5_reply_remaining(receive_exactly(sock, 5)))


# -- backends ---------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((require_loopback(host), port))
    listener.listen(4096)
    return listener


def _serve(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    def guarded(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            handler(conn)

    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=guarded, args=(conn,), daemon=True).start()


def handle_sink(conn: socket.socket) -> None:
    """Read everything until EOF, then answer one byte: the sender's clock stops on it."""
    buffer = bytearray(CHUNK)
    while conn.recv_into(buffer):
        pass
    conn.sendall(b"k")


def handle_echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def handle_http(conn: socket.socket) -> None:
    """HTTP/1.1 keep-alive: read a request (headers + content-length body), answer 1 KB."""
    pending = b""
    while True:
        while b"\r\n\r\n" not in pending:
            chunk = conn.recv(65536)
            if not chunk:
                return
            pending += chunk
        head, _, pending = pending.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(pending) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            pending += chunk
        pending = pending[length:]
        conn.sendall(HTTP_RESPONSE)


def run_backend(args: dict[str, Any]) -> None:
    """Sink, HTTP and echo servers on the server pod's address; runs until killed."""
    host = args["host"]
    servers = [
        (_listen(host, args["sink_port"]), handle_sink),
        (_listen(host, args["http_port"]), handle_http),
        (_listen(host, args["echo_port"]), handle_echo),
    ]
    for listener, handler in servers:
        threading.Thread(target=_serve, args=(listener, handler), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + float(args.get("max_seconds", 3600))
    while time.monotonic() < deadline:
        time.sleep(1.0)


# -- load generators --------------------------------------------------------------------------


def run_bulk(args: dict[str, Any]) -> dict[str, Any]:
    """``streams`` parallel uploads of ``bytes_per_stream`` each to the sink; the time from
    the first connect to the last sink acknowledgement."""
    route = Route.from_json(args["route"])
    streams, per_stream = int(args["streams"]), int(args["bytes_per_stream"])
    timeout = float(args.get("timeout", 60.0))
    payload = memoryview(b"\x5a" * CHUNK)
    errors: list[str] = []
    barrier = threading.Barrier(streams + 1)

    def upload() -> None:
        try:
            sock = route.connect(timeout)
        except OSError as exc:
            errors.append(repr(exc))
            barrier.abort()
            return
        with sock:
            try:
                barrier.wait(timeout)
                remaining = per_stream
                while remaining > 0:
                    size = min(remaining, CHUNK)
                    sock.sendall(payload[:size])
                    remaining -= size
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1) != b"k":
                    errors.append("sink did not acknowledge")
            except (OSError, threading.BrokenBarrierError) as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=upload) for _ in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout)
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout)
    seconds = time.perf_counter() - started
    if errors:
        raise WorkerError(f"bulk upload failed: {errors[:3]}")
    return {"bytes": streams * per_stream, "seconds": seconds}


HTTP_REQUEST = (
    b"POST /bench HTTP/1.1\r\nhost: bench\r\ncontent-length: 1024\r\n\r\n" + b"y" * 1024
)


class HttpClient:
    """One blocking keep-alive HTTP/1.1 connection that reads whole responses (status line,
    headers, content-length body), so a proxy may add or rewrite headers (an L7 proxy does);
    anything but a 200 with a 1 KB body is a ``WorkerError``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def exchange(self, request: bytes) -> None:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.pending:
            self._receive()
        head, _, self.pending = self.pending.partition(b"\r\n\r\n")
        status, length = parse_response_head(head)
        while len(self.pending) < length:
            self._receive()
        self.pending = self.pending[length:]
        if status != 200 or length != len(RESPONSE_BODY):
            raise WorkerError(f"expected 200 with {len(RESPONSE_BODY)} bytes, got {status} "
                              f"with {length}")

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise WorkerError("peer closed the connection mid-response")
        self.pending += chunk

    def close(self) -> None:
        self.sock.close()


def parse_response_head(head: bytes) -> tuple[int, int]:
    """(status, content-length) of an HTTP/1.1 response head; a response without a
    content-length (chunked, or close-delimited) is a ``WorkerError``: the backend never
    sends one, so a proxy that does changed the response."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise WorkerError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(parts[1]), int(value)
    raise WorkerError(f"response {int(parts[1])} without a content-length")


def open_clients(route: Route, connections: int) -> list[HttpClient]:
    """``connections`` keep-alive connections, each warmed by one exchange (outside any
    measurement: the tunnel and the proxies' upstream connections are set up here)."""
    clients: list[HttpClient] = []
    try:
        for _ in range(connections):
            clients.append(HttpClient(route.connect()))
            clients[-1].exchange(HTTP_REQUEST)
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def latency_summary(latencies: list[list[float]]) -> dict[str, float]:
    merged = sorted(value for values in latencies for value in values)
    return {"requests": len(merged), "p50_ms": percentile(merged, 50) * 1e3,
            "p90_ms": percentile(merged, 90) * 1e3, "p99_ms": percentile(merged, 99) * 1e3}


def run_rate(args: dict[str, Any]) -> dict[str, Any]:
    """Open loop: ``rps`` 1 KB requests per second spread over ``connections`` keep-alive
    connections for ``duration`` seconds. Latency is measured from each request's scheduled
    send time, so a stall counts against the system (no coordinated omission)."""
    route = Route.from_json(args["route"])
    rps, connections = float(args["rps"]), int(args["connections"])
    duration = float(args["duration"])
    interval = connections / rps
    per_connection = int(duration / interval)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[str] = []
    clients = open_clients(route, connections)
    start = time.perf_counter() + 0.05

    def client(index: int) -> None:
        offset = start + index * interval / connections
        try:
            for n in range(per_connection):
                scheduled = offset + n * interval
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                clients[index].exchange(HTTP_REQUEST)
                latencies[index].append(time.perf_counter() - scheduled)
        except (OSError, WorkerError) as exc:
            errors.append(repr(exc))

    run_clients(client, clients, duration)
    elapsed = time.perf_counter() - start
    if errors:
        raise WorkerError(f"rate load failed: {errors[:3]}")
    return {**latency_summary(latencies), "seconds": elapsed}


def run_clients(client: Callable[[int], None], clients: list[HttpClient], duration: float
                ) -> None:
    """``client(i)`` for every connection, each in a thread, waited for (bounded), then every
    connection closed."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    for each in clients:
        each.close()


def run_closed(args: dict[str, Any]) -> dict[str, Any]:
    """Closed loop (saturation): ``connections`` keep-alive connections each send the next
    1 KB request as soon as the previous response is in, for ``duration`` seconds. The rate
    achieved is what the path sustains; latency is per exchange. A failed exchange ends its
    connection and is counted (an L7 proxy refusing under load is a finding, not a crash)."""
    route = Route.from_json(args["route"])
    connections, duration = int(args["connections"]), float(args["duration"])
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[str] = []
    clients = open_clients(route, connections)
    started = time.perf_counter()
    deadline = started + duration

    def client(index: int) -> None:
        own = latencies[index]
        try:
            while (sent := time.perf_counter()) < deadline:
                clients[index].exchange(HTTP_REQUEST)
                own.append(time.perf_counter() - sent)
        except (OSError, WorkerError) as exc:
            errors.append(repr(exc))

    run_clients(client, clients, duration)
    elapsed = time.perf_counter() - started
    summary = latency_summary(latencies)
    return {**summary, "seconds": elapsed, "rps": summary["requests"] / elapsed,
            "errors": len(errors), "first_errors": errors[:3]}


def run_churn(args: dict[str, Any]) -> dict[str, Any]:
    """As many new connections as ``concurrency`` closed-loop clients can make in
    ``duration`` seconds: connect (tunnel), one echoed byte, close."""
    route = Route.from_json(args["route"])
    concurrency, duration = int(args["concurrency"]), float(args["duration"])
    counts = [0] * concurrency
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                with route.connect() as sock:
                    sock.sendall(b"!")
                    receive_exactly(sock, 1)
                counts[index] += 1
            except (OSError, WorkerError) as exc:
                errors.append(repr(exc))
                if len(errors) > 100:
                    return

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    seconds = time.perf_counter() - started
    return {"connections": sum(counts), "seconds": seconds, "errors": len(errors),
            "first_errors": errors[:3]}


def run_idle(args: dict[str, Any]) -> None:
    """Open ``count`` tunnels (each proven by an echoed byte), report, hold them until
    stdin closes (or ``hold_seconds``), then close them."""
    route = Route.from_json(args["route"])
    count = int(args["count"])
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = route.connect()
            opened.append(sock)
            sock.sendall(b"!")
            receive_exactly(sock, 1)
        print(json.dumps({"open": len(opened)}), flush=True)
        sys.stdin.read()  # the orchestrator closes our stdin when it has measured
    finally:
        for sock in opened:
            sock.close()


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


ROLES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "backend": run_backend, "bulk": run_bulk, "rate": run_rate, "closed": run_closed,
    "churn": run_churn, "idle": run_idle,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ROLES:
        print(f"usage: python -m bench.workers {{{'|'.join(ROLES)}}} '<json>'", file=sys.stderr)
        return 2
    result = ROLES[argv[0]](json.loads(argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
