"""Capture rules and namespace sockets against real network namespaces (root only).

Each test builds two throwaway namespaces, ``app`` (the pod, 10.250.X.1) and ``peer``
(10.250.X.2), joined by a veth pair, with addresses only inside them; the host namespace's
links, routes and rules are never touched. The namespaces are deleted even when a test fails.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.integration.netns_helpers import in_netns, ip, netns_unusable, network_namespaces
from ztunnel.capture import netns, rules
from ztunnel.capture.netns import (
    NetnsError,
    connect_in,
    entered,
    open_tcp_listeners_in,
    original_destination,
)
from ztunnel.capture.rules import BYPASS_MARK, PodCapture

_REASON = netns_unusable("nsenter", "iptables", "iptables-save", "iptables-restore")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

_COUNTER = itertools.count(1)
_TIMEOUT = 5.0


@dataclass
class Pair:
    app: str
    peer: str
    app_ip: str
    peer_ip: str

    @property
    def app_path(self) -> Path:
        return netns.netns_path(self.app)

    @property
    def peer_path(self) -> Path:
        return netns.netns_path(self.peer)


@pytest.fixture
def pair() -> Iterator[Pair]:
    n = next(_COUNTER)
    pid = os.getpid()
    app, peer = f"altest-{pid}-{n}-app", f"altest-{pid}-{n}-peer"
    octet = 1 + (pid + n) % 250
    pair = Pair(app, peer, f"10.250.{octet}.1", f"10.250.{octet}.2")
    veth_app, veth_peer = f"alv{pid % 100000}{n}a", f"alv{pid % 100000}{n}b"
    with network_namespaces((app, peer)):
        # The veth is made inside `app` and its other end sent to `peer`: never in the host.
        ip("-n", app, "link", "add", veth_app, "type", "veth", "peer", "name", veth_peer,
           "netns", peer)
        for name, veth, address in ((app, veth_app, pair.app_ip), (peer, veth_peer, pair.peer_ip)):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", veth)
            ip("-n", name, "link", "set", veth, "up")
        yield pair


async def _accept(listener: trio.SocketListener) -> trio.SocketStream:
    with trio.fail_after(_TIMEOUT):
        stream = await listener.accept()
    assert isinstance(stream, trio.SocketStream)
    return stream


async def _roundtrip(client: trio.SocketStream, server: trio.SocketStream) -> None:
    """Bytes sent by the client arrive at this server socket: it is the same connection."""
    await client.send_all(b"ping")
    with trio.fail_after(_TIMEOUT):
        assert await server.receive_some(4) == b"ping"


async def test_outbound_is_redirected_to_15001_with_original_destination(pair: Pair) -> None:
    await rules.apply(pair.app_path, PodCapture(pair.app_ip))
    # REDIRECT in OUTPUT rewrites the destination to 127.0.0.1: the listener takes any address.
    (outbound,) = await open_tcp_listeners_in(pair.app_path, 15001, "0.0.0.0")
    async with outbound:
        # Nothing listens on the peer's 8080: the connect succeeds only because it is captured.
        client = await connect_in(pair.app_path, pair.peer_ip, 8080, timeout=_TIMEOUT)
        server = await _accept(outbound)
        async with client, server:
            assert original_destination(server) == (pair.peer_ip, 8080)
            await _roundtrip(client, server)


async def test_bypass_mark_loop_guard_and_excluded_port_are_not_redirected(pair: Pair) -> None:
    await rules.apply(pair.app_path, PodCapture(pair.app_ip, exclude_outbound_ports=(9000,)))
    (outbound,) = await open_tcp_listeners_in(pair.app_path, 15001, "0.0.0.0")
    peer_listeners = {
        port: (await open_tcp_listeners_in(pair.peer_path, port, pair.peer_ip))[0]
        for port in (8080, 15008, 9000)
    }
    try:
        cases = [(8080, BYPASS_MARK), (15008, None), (9000, None)]
        for port, mark in cases:
            client = await connect_in(
                pair.app_path, pair.peer_ip, port, mark=mark, timeout=_TIMEOUT
            )
            server = await _accept(peer_listeners[port])
            async with client, server:
                assert server.socket.getpeername()[0] == pair.app_ip
                await _roundtrip(client, server)
        # A mark that is not the bypass mark is captured like any app traffic.
        client = await connect_in(pair.app_path, pair.peer_ip, 8080, mark=0x1, timeout=_TIMEOUT)
        server = await _accept(outbound)
        async with client, server:
            assert original_destination(server) == (pair.peer_ip, 8080)
    finally:
        await outbound.aclose()
        for listener in peer_listeners.values():
            await listener.aclose()


async def test_inbound_goes_to_15006_and_hbone_reaches_15008_directly(pair: Pair) -> None:
    await rules.apply(pair.app_path, PodCapture(pair.app_ip))
    (inbound,) = await open_tcp_listeners_in(pair.app_path, 15006, pair.app_ip)
    (hbone,) = await open_tcp_listeners_in(pair.app_path, 15008, pair.app_ip)
    async with inbound, hbone:
        client = await connect_in(pair.peer_path, pair.app_ip, 8080, timeout=_TIMEOUT)
        server = await _accept(inbound)
        async with client, server:
            assert original_destination(server) == (pair.app_ip, 8080)
            assert server.socket.getpeername()[0] == pair.peer_ip
            await _roundtrip(client, server)

        client = await connect_in(pair.peer_path, pair.app_ip, 15008, timeout=_TIMEOUT)
        server = await _accept(hbone)
        async with client, server:
            await _roundtrip(client, server)

        # ztunnel reaching the local app from inside the pod (with the bypass mark), and the
        # pod talking to itself (loopback, no mark), are not sent to 15001 or 15006.
        (app_listener,) = await open_tcp_listeners_in(pair.app_path, 8080, pair.app_ip)
        async with app_listener:
            for mark in (BYPASS_MARK, None):
                client = await connect_in(
                    pair.app_path, pair.app_ip, 8080, mark=mark, timeout=_TIMEOUT
                )
                server = await _accept(app_listener)
                async with client, server:
                    await _roundtrip(client, server)


def _normalized_save(ns: str) -> str:
    """``iptables-save`` without its timestamp comments and packet counters."""
    text = in_netns(ns, "iptables-save")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in lines)


async def test_cleanup_restores_iptables_save_and_apply_is_idempotent(pair: Pair) -> None:
    # The pod namespace already has rules of its own (a CNI's, say); they must survive.
    in_netns(pair.app, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777",
             "-m", "comment", "--comment", "foreign", "-j", "RETURN")
    in_netns(pair.app, "iptables", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7777",
             "-j", "ACCEPT")
    before = _normalized_save(pair.app)
    assert not await rules.installed(pair.app_path)

    capture = PodCapture(pair.app_ip, exclude_inbound_ports=(22,))
    await rules.apply(pair.app_path, capture)
    once = _normalized_save(pair.app)
    assert await rules.installed(pair.app_path)
    assert once != before
    await rules.apply(pair.app_path, capture)
    assert _normalized_save(pair.app) == once
    assert once.count("-j AMBLITE_OUTPUT") == 1

    # Re-applying with other settings replaces the rules, it does not add to them.
    await rules.apply(pair.app_path, PodCapture(pair.app_ip))
    changed = _normalized_save(pair.app)
    assert "--dport 22 " not in changed
    assert changed.count("-j AMBLITE_PREROUTING") == 1

    await rules.remove(pair.app_path)
    assert _normalized_save(pair.app) == before
    assert not await rules.installed(pair.app_path)
    await rules.remove(pair.app_path)  # nothing left to remove: still fine
    assert _normalized_save(pair.app) == before


async def test_cleanup_in_a_fresh_namespace_leaves_no_rule(pair: Pair) -> None:
    await rules.apply(pair.peer_path, PodCapture(pair.peer_ip))
    await rules.remove(pair.peer_path)
    rule_lines = [
        line for line in _normalized_save(pair.peer).splitlines() if line.startswith("-A")
    ]
    # With the nf_tables backend the (empty) nat table stays: see ztunnel/capture/rules.py.
    assert rule_lines == []
    assert "AMBLITE" not in _normalized_save(pair.peer)


def _thread_netns_inode() -> int:
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


async def test_entered_restores_the_thread_namespace_even_when_the_body_raises(
    pair: Pair,
) -> None:
    target_inode = os.stat(pair.app_path).st_ino

    def body() -> tuple[int, int, int]:
        original = _thread_netns_inode()
        inside = -1
        with pytest.raises(RuntimeError, match="boom"), entered(pair.app_path):
            inside = _thread_netns_inode()
            raise RuntimeError("boom")
        return original, inside, _thread_netns_inode()

    original, inside, after = await trio.to_thread.run_sync(body)
    assert inside == target_inode != original
    assert after == original
    # The Trio thread was never moved.
    assert _thread_netns_inode() == original


async def test_entered_refuses_the_trio_thread_and_bad_paths(pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(NetnsError, match="worker thread"), entered(pair.app_path):
        pass  # pragma: no cover

    not_a_namespace = tmp_path / "plain-file"
    not_a_namespace.write_text("")

    def try_enter(path: Path) -> int:
        with entered(path):
            pass  # pragma: no cover
        return 0  # pragma: no cover

    before = _thread_netns_inode()
    for path, message in ((tmp_path / "missing", "cannot open"), (not_a_namespace, "setns")):
        with pytest.raises(NetnsError, match=message):
            await trio.to_thread.run_sync(try_enter, path)
    assert _thread_netns_inode() == before
    with pytest.raises(NetnsError):
        await connect_in(tmp_path / "missing", pair.peer_ip, 8080)


async def test_listener_bind_failure_names_the_namespace(pair: Pair) -> None:
    # The peer's address does not exist inside the app namespace.
    with pytest.raises(OSError, match=re.escape(str(pair.app_path))):
        await open_tcp_listeners_in(pair.app_path, 15001, pair.peer_ip)


async def test_ipv6_pod_outbound_and_inbound(pair: Pair) -> None:
    if shutil.which("ip6tables-restore") is None:
        pytest.skip("ip6tables is not installed: capture is IPv4-only here")
    octet = pair.app_ip.split(".")[2]
    app_ip6, peer_ip6 = f"fd00:250:{octet}::1", f"fd00:250:{octet}::2"
    for name, address in ((pair.app, app_ip6), (pair.peer, peer_ip6)):
        device = in_netns(name, "ip", "-o", "link", "show", "type", "veth").split(":")[1].strip()
        ip("-n", name, "addr", "add", f"{address}/64", "dev", device.split("@")[0], "nodad")
    await rules.apply(pair.app_path, PodCapture(app_ip6))
    assert "AMBLITE_OUTPUT" in in_netns(pair.app, "ip6tables-save", "-t", "nat")
    (outbound,) = await open_tcp_listeners_in(pair.app_path, 15001, "::")
    (inbound,) = await open_tcp_listeners_in(pair.app_path, 15006, app_ip6)
    async with outbound, inbound:
        client = await connect_in(pair.app_path, peer_ip6, 8080, timeout=_TIMEOUT)
        server = await _accept(outbound)
        async with client, server:
            assert original_destination(server) == (peer_ip6, 8080)
        client = await connect_in(pair.peer_path, app_ip6, 8080, timeout=_TIMEOUT)
        server = await _accept(inbound)
        async with client, server:
            assert original_destination(server) == (app_ip6, 8080)
            await _roundtrip(client, server)
    await rules.remove(pair.app_path)
    assert not await rules.installed(pair.app_path)
    assert "AMBLITE" not in in_netns(pair.app, "ip6tables-save")


async def test_rules_on_a_missing_namespace_fail_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-netns"
    with pytest.raises(rules.RulesError, match=re.escape(str(missing))):
        await rules.apply(missing, PodCapture("10.250.0.1"))
    with pytest.raises(rules.RulesError, match=re.escape(str(missing))):
        await rules.remove(missing)
