"""The iptables rules that capture a pod's TCP traffic inside its network namespace.

Sans-IO rendering (``render_rules``, ``render_cleanup``, ``our_lines``) plus thin Trio drivers
(``apply``, ``remove``, ``installed``) that feed the rendered text to ``iptables-restore
--noflush`` inside the pod's namespace (``nsenter --net=<path>``). Whatever ``iptables`` is on
the machine is used (the nf_tables or the legacy backend; both read the same restore format).

Everything lives in the ``nat`` table in two chains of our own, entered by one jump each:

* ``AMBLITE_OUTPUT`` (from ``OUTPUT``): TCP the pod itself sends. Loopback, connections
  carrying ``BYPASS_MARK`` (ztunnel's own, made with ``SO_MARK`` from inside the pod), the
  proxy ports (loop guard), DNS (unless ``capture_dns``) and excluded ports return untouched;
  the rest is REDIRECTed to ztunnel's outbound listener (15001). REDIRECT in OUTPUT rewrites
  the destination to 127.0.0.1, so that listener must accept on 127.0.0.1 (or 0.0.0.0); the
  real destination is read back with ``SO_ORIGINAL_DST``.
* ``AMBLITE_PREROUTING`` (from ``PREROUTING``): TCP arriving from outside. Loopback and
  packets not addressed to the pod IP return; HBONE (15008) and excluded ports return (15008 is
  served directly by ztunnel's mTLS listener); the rest is REDIRECTed to the plaintext inbound
  listener (15006), again with ``SO_ORIGINAL_DST`` telling the port that was meant.

Only TCP is captured: UDP (including DNS over UDP) is never touched. A connection whose
original destination port is one of the proxy ports (someone dialled podIP:15006 directly)
still reaches a proxy listener, which must refuse it (``PodCapture.proxy_ports``).

The rules are for the pod IP's family: an IPv4 pod gets ``iptables`` rules, an IPv6 pod
``ip6tables`` rules. Dual-stack pods are not supported: traffic of the other family is not
captured (the lab is IPv4-only).

Removing takes out exactly our jumps and chains, found in ``iptables-save``; other rules in
the namespace are left as they were. The ``nat`` table itself stays (with the nf_tables
backend, installing creates it in a fresh namespace): deleting it would stop the kernel from
translating replies of connections that are still open through the redirect.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

__all__ = [
    "BYPASS_MARK",
    "BYPASS_MASK",
    "INBOUND_CHAIN",
    "OUTBOUND_CHAIN",
    "OUR_CHAINS",
    "PodCapture",
    "RulesError",
    "apply",
    "installed",
    "iptables_commands",
    "our_lines",
    "remove",
    "render_cleanup",
    "render_rules",
]

BYPASS_MARK = 0x539
"""SO_MARK on ztunnel's own sockets inside a pod (Istio's in-pod value): never captured."""
BYPASS_MASK = 0xFFF
"""Only these bits of the packet mark are compared with ``BYPASS_MARK``; a TPROXY mark, if
one is ever added, must use bits outside ``BYPASS_MARK`` so the two cannot be confused."""

OUTBOUND_CHAIN = "AMBLITE_OUTPUT"
INBOUND_CHAIN = "AMBLITE_PREROUTING"
OUR_CHAINS = (OUTBOUND_CHAIN, INBOUND_CHAIN)
_PARENT_CHAINS = {OUTBOUND_CHAIN: "OUTPUT", INBOUND_CHAIN: "PREROUTING"}
_COMMENT_PREFIX = "ambient-lite: "
_DNS_PORT = 53


class RulesError(Exception):
    """Installing or removing the capture rules failed; the message has the command, the
    namespace and iptables' own complaint."""


def _port_tuple(ports: Iterable[int], what: str) -> tuple[int, ...]:
    if isinstance(ports, str | bytes):
        raise ValueError(f"{what} must be a list of port numbers, got {ports!r}")
    result: set[int] = set()
    for port in ports:
        _check_port(port, what)
        result.add(port)
    return tuple(sorted(result))


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: {port!r} is not a TCP port number (1-65535)")


@dataclass(frozen=True)
class PodCapture:
    """What to capture for one pod. Port lists are normalized to sorted tuples without
    duplicates, so equal settings render equal rules."""

    pod_ip: str
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    hbone_port: int = 15008
    exclude_outbound_ports: tuple[int, ...] = field(default=())
    exclude_inbound_ports: tuple[int, ...] = field(default=())
    capture_dns: bool = False

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.pod_ip)
        except ValueError as exc:
            raise ValueError(f"pod_ip must be an IP address, got {self.pod_ip!r}") from exc
        object.__setattr__(self, "pod_ip", str(address))
        for name in ("outbound_port", "inbound_plaintext_port", "hbone_port"):
            _check_port(getattr(self, name), name)
        if len(set(self.proxy_ports)) != 3:
            raise ValueError(f"the proxy ports must differ, got {self.proxy_ports}")
        for name in ("exclude_outbound_ports", "exclude_inbound_ports"):
            object.__setattr__(self, name, _port_tuple(getattr(self, name), name))

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_address(self.pod_ip).version == 6

    @property
    def proxy_ports(self) -> tuple[int, int, int]:
        """ztunnel's own ports in the pod: an original destination on one of them is a loop
        and must be refused by the listener that got it."""
        return (self.outbound_port, self.inbound_plaintext_port, self.hbone_port)


def _comment(text: str) -> str:
    if '"' in text or "\n" in text:
        raise ValueError(f"rule comment must not contain quotes or newlines: {text!r}")
    full = _COMMENT_PREFIX + text
    if len(full) > 255:
        raise ValueError(f"rule comment longer than iptables allows: {full!r}")
    return f'-m comment --comment "{full}"'


def _jump_spec(chain: str) -> str:
    direction = "outbound" if chain == OUTBOUND_CHAIN else "inbound"
    return f"-p tcp {_comment(f'{direction} TCP capture for this pod')} -j {chain}"


def _outbound_rules(capture: PodCapture) -> list[str]:
    c = OUTBOUND_CHAIN
    rules = [
        f"-A {c} -o lo "
        f"{_comment('loopback (the pod to itself, ztunnel to the local app) is not captured')} "
        f"-j RETURN",
        f"-A {c} -m mark --mark {BYPASS_MARK:#x}/{BYPASS_MASK:#x} "
        f"{_comment('connections of ztunnel itself carry the bypass mark')} -j RETURN",
    ]
    for port, role in zip(
        capture.proxy_ports, ("outbound", "inbound plaintext", "HBONE"), strict=True
    ):
        rules.append(
            f"-A {c} -p tcp --dport {port} "
            f"{_comment(f'loop guard: {role} proxy port {port} is not captured')} -j RETURN"
        )
    if not capture.capture_dns:
        rules.append(
            f"-A {c} -p tcp --dport {_DNS_PORT} "
            f"{_comment('DNS over TCP goes straight to the resolver (capture_dns off)')} -j RETURN"
        )
    for port in capture.exclude_outbound_ports:
        rules.append(
            f"-A {c} -p tcp --dport {port} "
            f"{_comment(f'outbound port {port} excluded from capture')} -j RETURN"
        )
    port = capture.outbound_port
    rules.append(
        f"-A {c} -p tcp "
        f"{_comment(f'all other outbound TCP goes to ztunnel outbound port {port}')} "
        f"-j REDIRECT --to-ports {port}"
    )
    return rules


def _inbound_rules(capture: PodCapture) -> list[str]:
    c = INBOUND_CHAIN
    prefix = 128 if capture.ipv6 else 32
    rules = [
        f"-A {c} -i lo {_comment('loopback is never captured')} -j RETURN",
        f"-A {c} ! -d {capture.pod_ip}/{prefix} "
        f"{_comment('only traffic addressed to the pod IP is inbound to this pod')} -j RETURN",
        f"-A {c} -p tcp --dport {capture.hbone_port} "
        f"{_comment(f'HBONE (mTLS) on {capture.hbone_port} is served by ztunnel directly')} "
        f"-j RETURN",
    ]
    for port in capture.exclude_inbound_ports:
        rules.append(
            f"-A {c} -p tcp --dport {port} "
            f"{_comment(f'inbound port {port} excluded from capture')} -j RETURN"
        )
    port = capture.inbound_plaintext_port
    rules.append(
        f"-A {c} -p tcp "
        f"{_comment(f'all other inbound TCP goes to ztunnel plaintext inbound port {port}')} "
        f"-j REDIRECT --to-ports {port}"
    )
    return rules


_RULE_LINE = re.compile(r"^-A (?P<chain>\S+) (?P<spec>.*)$")
_JUMP_TARGET = re.compile(r"(?:^|\s)-[jg] (?P<target>\S+)(?:\s|$)")
_CHAIN_DECL = re.compile(r"^:(?P<chain>\S+) ")


def _nat_section(saved: str) -> list[str]:
    """The lines of the ``*nat`` table in ``iptables-save`` output (empty if none)."""
    lines: list[str] = []
    inside = False
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line == "*nat"
            continue
        if inside:
            if line == "COMMIT":
                inside = False
            elif line and not line.startswith("#"):
                lines.append(line)
    return lines


def our_lines(saved: str) -> list[str]:
    """Our chains' declarations, rules and the jumps into them, from ``iptables-save``
    output (the nat table only): empty when nothing of ours is installed."""
    result = []
    for line in _nat_section(saved):
        declared = _CHAIN_DECL.match(line)
        if declared and declared.group("chain") in OUR_CHAINS:
            result.append(line)
            continue
        rule = _RULE_LINE.match(line)
        if rule is None:
            continue
        target = _JUMP_TARGET.search(rule.group("spec"))
        if rule.group("chain") in OUR_CHAINS or (target and target.group("target") in OUR_CHAINS):
            result.append(line)
    return result


def _removal_lines(saved_nat: str | None) -> tuple[list[str], list[str]]:
    """(deletions of the jumps into our chains, chains of ours that exist). ``None``: assume
    exactly what ``render_rules`` installs."""
    if saved_nat is None:
        return (
            [f"-D {_PARENT_CHAINS[c]} {_jump_spec(c)}" for c in OUR_CHAINS],
            list(OUR_CHAINS),
        )
    deletions: list[str] = []
    chains: list[str] = []
    for line in our_lines(saved_nat):
        declared = _CHAIN_DECL.match(line)
        if declared:
            chains.append(declared.group("chain"))
            continue
        rule = _RULE_LINE.match(line)
        if rule and rule.group("chain") not in OUR_CHAINS:
            deletions.append(f"-D {rule.group('chain')} {rule.group('spec')}")
    return deletions, chains


def render_rules(capture: PodCapture, *, saved_nat: str | None = None) -> str:
    """``iptables-restore --noflush`` input installing the capture for ``capture``.

    With ``saved_nat`` (the namespace's current ``iptables-save -t nat``), jumps into our
    chains that are already there are deleted first, so applying again replaces the rules
    instead of adding a second jump: one atomic restore, idempotent. Declaring a chain that
    exists empties it. Without ``saved_nat`` the text assumes nothing of ours is installed
    (the form docs/ explain)."""
    deletions = _removal_lines(saved_nat)[0] if saved_nat is not None else []
    lines = ["*nat"]
    lines += deletions
    lines += [f":{chain} - [0:0]" for chain in OUR_CHAINS]
    lines += _outbound_rules(capture)
    lines += _inbound_rules(capture)
    lines += [f"-I {_PARENT_CHAINS[c]} 1 {_jump_spec(c)}" for c in OUR_CHAINS]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_cleanup(saved_nat: str | None = None) -> str:
    """``iptables-restore --noflush`` input removing our jumps and chains and nothing else.

    With ``saved_nat`` (the current ``iptables-save -t nat``) it removes exactly what is
    there, so running it when nothing is installed is harmless: the result is ``""`` (nothing
    to run). Without it, it assumes the rules ``render_rules`` installs."""
    deletions, chains = _removal_lines(saved_nat)
    if not deletions and not chains:
        return ""
    lines = ["*nat", *deletions]
    lines += [f":{chain} - [0:0]" for chain in chains]  # empties the chain before deleting it
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_commands(*, ipv6: bool, backend: str = "iptables") -> tuple[str, str]:
    """(save, restore) commands for a family: ``backend`` is ``iptables`` (whatever the
    system's default is), ``iptables-nft`` or ``iptables-legacy``."""
    if backend not in ("iptables", "iptables-nft", "iptables-legacy"):
        raise ValueError(f"unknown iptables backend {backend!r}")
    base = ("ip6" + backend[2:]) if ipv6 else backend
    return f"{base}-save", f"{base}-restore"


async def _run_in_netns(
    path: str | os.PathLike[str], argv: Sequence[str], stdin: str | None = None
) -> str:
    command = ["nsenter", f"--net={os.fspath(path)}", *argv]
    try:
        result = await trio.run_process(
            command,
            stdin=stdin.encode() if stdin is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise RulesError(f"{command[0]} not found: install util-linux and iptables") from exc
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise RulesError(
            f"{' '.join(argv)} in network namespace {os.fspath(path)} failed "
            f"(exit {result.returncode}): {stderr}"
        )
    return result.stdout.decode(errors="replace")


async def _save_nat(path: str | os.PathLike[str], save: str) -> str:
    return await _run_in_netns(path, [save, "-t", "nat"])


async def apply(
    path: str | os.PathLike[str], capture: PodCapture, *, backend: str = "iptables"
) -> None:
    """Install (or replace) ``capture``'s rules in the namespace at ``path``, atomically."""
    save, restore = iptables_commands(ipv6=capture.ipv6, backend=backend)
    saved = await _save_nat(path, save)
    await _run_in_netns(
        path, [restore, "--noflush", "--wait"], render_rules(capture, saved_nat=saved)
    )


def _families(backend: str) -> list[bool]:
    """The families whose tools exist here (IPv4 always: its absence is an error later)."""
    families = [False]
    if shutil.which(iptables_commands(ipv6=True, backend=backend)[0]):
        families.append(True)
    return families


async def remove(path: str | os.PathLike[str], *, backend: str = "iptables") -> None:
    """Remove our jumps and chains (both families) from the namespace at ``path``; nothing
    else is touched, and removing what is not there is fine."""
    for ipv6 in _families(backend):
        save, restore = iptables_commands(ipv6=ipv6, backend=backend)
        script = render_cleanup(await _save_nat(path, save))
        if script:
            await _run_in_netns(path, [restore, "--noflush", "--wait"], script)


async def installed(path: str | os.PathLike[str], *, backend: str = "iptables") -> bool:
    """Whether any chain or jump of ours is in the namespace at ``path`` (either family)."""
    for ipv6 in _families(backend):
        save, _ = iptables_commands(ipv6=ipv6, backend=backend)
        if our_lines(await _save_nat(path, save)):
            return True
    return False
