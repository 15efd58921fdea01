"""Readiness probes run INSIDE a lab namespace (``ip netns exec <ns> python -m ...``).

The host cannot reach lab addresses (they exist only inside the lab's namespaces), so
``ambientctl lab up`` runs this small prober in the control namespace, which routes to every
node and pod. Targets are ``tcp://HOST:PORT`` (something accepts connections) or
``http://HOST:PORT/PATH`` (answers 200). It polls them all until each has succeeded once or the
timeout passes, then exits 0, or 1 with one line per target still failing on stderr.
Standard library only: it must start fast, in a fresh interpreter, many times.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

POLL_INTERVAL = 0.1
CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Target:
    scheme: str  # "tcp" | "http"
    host: str
    port: int
    path: str = "/"

    def __str__(self) -> str:
        suffix = self.path if self.scheme == "http" else ""
        return f"{self.scheme}://{self.host}:{self.port}{suffix}"


def parse_target(text: str) -> Target:
    """``tcp://h:p`` or ``http://h:p/path``; ValueError naming the target otherwise."""
    parts = urlsplit(text)
    if parts.scheme not in ("tcp", "http") or not parts.hostname or parts.port is None:
        raise ValueError(f"probe target {text!r} is not tcp://HOST:PORT or http://HOST:PORT/PATH")
    return Target(parts.scheme, parts.hostname, parts.port, parts.path or "/")


def probe(target: Target) -> str | None:
    """One attempt: None when ready, else why not."""
    if target.scheme == "tcp":
        try:
            with socket.create_connection((target.host, target.port), CONNECT_TIMEOUT):
                return None
        except OSError as exc:
            return str(exc)
    connection = http.client.HTTPConnection(target.host, target.port, timeout=CONNECT_TIMEOUT)
    try:
        connection.request("GET", target.path)
        response = connection.getresponse()
        body = response.read(200).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return str(exc) or type(exc).__name__
    finally:
        connection.close()
    return None if response.status == 200 else f"answered {response.status}: {body}"


def wait_all(
    targets: Sequence[Target],
    timeout: float,
    *,
    attempt: Callable[[Target], str | None] = probe,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[Target, str]:
    """Poll until every target succeeded once; returns the failing ones with their last
    reason (empty: all ready)."""
    deadline = clock() + timeout
    pending = {target: "no attempt" for target in targets}
    while True:
        for target in list(pending):
            reason = attempt(target)
            if reason is None:
                del pending[target]
            else:
                pending[target] = reason
        if not pending or clock() >= deadline:
            return pending
        sleep(POLL_INTERVAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambientctl.lab.probe")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    args = parser.parse_args(argv)
    try:
        targets = [parse_target(t) for t in args.targets]
    except ValueError as exc:
        parser.error(str(exc))
    failing = wait_all(targets, args.timeout)
    for target, reason in failing.items():
        sys.stderr.write(f"{target}: {reason}\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
