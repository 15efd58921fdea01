"""The capture rules as rendered text (sans-IO): the key rules for each option, their order,
and the cleanup computed from ``iptables-save`` output."""

from __future__ import annotations

import re

import pytest

from ztunnel.capture.rules import (
    BYPASS_MARK,
    BYPASS_MASK,
    INBOUND_CHAIN,
    OUTBOUND_CHAIN,
    PodCapture,
    iptables_commands,
    our_lines,
    render_cleanup,
    render_rules,
)

POD_IP = "10.250.7.1"


def _rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def _index(lines: list[str], fragment: str) -> int:
    matches = [i for i, line in enumerate(lines) if fragment in line]
    assert len(matches) == 1, (fragment, lines)
    return matches[0]


def test_default_rules_shape() -> None:
    text = render_rules(PodCapture(POD_IP))
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert f":{OUTBOUND_CHAIN} - [0:0]" in lines and f":{INBOUND_CHAIN} - [0:0]" in lines
    # One jump each, inserted first so capture runs before other rules of the namespace.
    assert [line for line in lines if line.startswith("-I ")] == [
        f'-I OUTPUT 1 -p tcp -m comment --comment "ambient-lite: outbound TCP capture for this '
        f'pod" -j {OUTBOUND_CHAIN}',
        f'-I PREROUTING 1 -p tcp -m comment --comment "ambient-lite: inbound TCP capture for '
        f'this pod" -j {INBOUND_CHAIN}',
    ]
    # Every rule explains itself.
    for line in lines:
        if line.startswith(("-A ", "-I ")):
            assert re.search(r'-m comment --comment "ambient-lite: [^"]+"', line), line


def test_outbound_exclusions_come_before_the_redirect() -> None:
    out = _rules(render_rules(PodCapture(POD_IP)), OUTBOUND_CHAIN)
    redirect = _index(out, "-j REDIRECT")
    assert redirect == len(out) - 1
    assert out[redirect].startswith(f"-A {OUTBOUND_CHAIN} -p tcp ")
    assert out[redirect].endswith("-j REDIRECT --to-ports 15001")
    assert out[_index(out, "-o lo ")].endswith("-j RETURN")
    mark = out[_index(out, "-m mark ")]
    assert f"--mark {BYPASS_MARK:#x}/{BYPASS_MASK:#x} " in mark and mark.endswith("-j RETURN")
    for port in (15001, 15006, 15008, 53):
        assert out[_index(out, f"--dport {port} ")].endswith("-j RETURN")


def test_inbound_rules() -> None:
    inbound = _rules(render_rules(PodCapture(POD_IP)), INBOUND_CHAIN)
    assert inbound[_index(inbound, "-i lo ")].endswith("-j RETURN")
    assert inbound[_index(inbound, f"! -d {POD_IP}/32 ")].endswith("-j RETURN")
    assert inbound[_index(inbound, "--dport 15008 ")].endswith("-j RETURN")
    assert inbound[-1].endswith("-j REDIRECT --to-ports 15006")
    assert not any("--dport 15006 " in line for line in inbound)


def test_capture_dns_removes_the_dns_exclusion() -> None:
    assert "--dport 53 " in render_rules(PodCapture(POD_IP))
    assert "--dport 53 " not in render_rules(PodCapture(POD_IP, capture_dns=True))


def test_excluded_ports_are_sorted_deduplicated_and_per_direction() -> None:
    capture = PodCapture(
        POD_IP, exclude_outbound_ports=(9000, 22, 9000), exclude_inbound_ports=(3306,)
    )
    assert capture.exclude_outbound_ports == (22, 9000)
    text = render_rules(capture)
    out, inbound = _rules(text, OUTBOUND_CHAIN), _rules(text, INBOUND_CHAIN)
    assert _index(out, "--dport 22 ") < _index(out, "--dport 9000 ") < len(out) - 1
    assert not any("--dport 3306 " in line for line in out)
    assert inbound[_index(inbound, "--dport 3306 ")].endswith("-j RETURN")
    assert _index(inbound, "--dport 3306 ") < len(inbound) - 1
    assert not any("--dport 9000 " in line for line in inbound)


def test_custom_proxy_ports() -> None:
    capture = PodCapture(
        POD_IP, outbound_port=25001, inbound_plaintext_port=25006, hbone_port=25008
    )
    text = render_rules(capture)
    assert "--to-ports 25001" in text and "--to-ports 25006" in text
    for port in (25001, 25006, 25008):
        assert f"--dport {port} " in text
    assert "15001" not in text and "15006" not in text and "15008" not in text
    assert capture.proxy_ports == (25001, 25006, 25008)


def test_ipv6_pod() -> None:
    capture = PodCapture("fd00:250::1")
    assert capture.ipv6
    assert "! -d fd00:250::1/128 " in render_rules(capture)
    assert iptables_commands(ipv6=True) == ("ip6tables-save", "ip6tables-restore")
    assert iptables_commands(ipv6=False, backend="iptables-legacy") == (
        "iptables-legacy-save",
        "iptables-legacy-restore",
    )
    with pytest.raises(ValueError, match="backend"):
        iptables_commands(ipv6=False, backend="nft")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pod_ip": "not-an-ip"}, "pod_ip"),
        ({"pod_ip": POD_IP, "outbound_port": 0}, "outbound_port"),
        ({"pod_ip": POD_IP, "hbone_port": 15001}, "must differ"),
        ({"pod_ip": POD_IP, "exclude_outbound_ports": (70000,)}, "exclude_outbound_ports"),
        ({"pod_ip": POD_IP, "exclude_inbound_ports": "22"}, "exclude_inbound_ports"),
        ({"pod_ip": POD_IP, "exclude_inbound_ports": (True,)}, "exclude_inbound_ports"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PodCapture(**kwargs)  # type: ignore[arg-type]


SAVED = f"""# Generated by iptables-save v1.8.9 (nf_tables) on a day
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 7777 -j {OUTBOUND_CHAIN}
COMMIT
*nat
:PREROUTING ACCEPT [3:180]
:OUTPUT ACCEPT [0:0]
:{OUTBOUND_CHAIN} - [0:0]
:{INBOUND_CHAIN} - [0:0]
:CNI_CHAIN - [0:0]
-A PREROUTING -p tcp -m comment --comment "ambient-lite: inbound TCP capture for this pod" -j {INBOUND_CHAIN}
-A OUTPUT -p tcp -m comment --comment "ambient-lite: outbound TCP capture for this pod" -j {OUTBOUND_CHAIN}
-A OUTPUT -p tcp -m tcp --dport 7777 -j CNI_CHAIN
-A {OUTBOUND_CHAIN} -p tcp -m comment --comment "x" -j REDIRECT --to-ports 15001
COMMIT
"""  # noqa: E501


def test_our_lines_finds_only_ours_in_the_nat_table() -> None:
    lines = our_lines(SAVED)
    assert len(lines) == 5
    assert not any("CNI_CHAIN" in line or "7777" in line for line in lines)


def test_cleanup_from_saved_state_deletes_exactly_our_jumps_and_chains() -> None:
    script = render_cleanup(SAVED).splitlines()
    assert script == [
        "*nat",
        f'-D PREROUTING -p tcp -m comment --comment "ambient-lite: inbound TCP capture for '
        f'this pod" -j {INBOUND_CHAIN}',
        f'-D OUTPUT -p tcp -m comment --comment "ambient-lite: outbound TCP capture for this '
        f'pod" -j {OUTBOUND_CHAIN}',
        f":{OUTBOUND_CHAIN} - [0:0]",
        f":{INBOUND_CHAIN} - [0:0]",
        f"-X {OUTBOUND_CHAIN}",
        f"-X {INBOUND_CHAIN}",
        "COMMIT",
    ]


def test_cleanup_of_nothing_is_empty_and_blind_cleanup_matches_the_installed_jumps() -> None:
    assert render_cleanup("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") == ""
    assert render_cleanup("") == ""
    (jump,) = [
        line.removeprefix("-I OUTPUT 1 ")
        for line in render_rules(PodCapture(POD_IP)).splitlines()
        if line.startswith("-I OUTPUT 1 ")
    ]
    blind = render_cleanup()
    assert f"-D OUTPUT {jump}" in blind.splitlines()
    assert f"-X {OUTBOUND_CHAIN}" in blind and f"-X {INBOUND_CHAIN}" in blind


def test_reapply_deletes_the_old_jumps_before_inserting_new_ones() -> None:
    text = render_rules(PodCapture(POD_IP), saved_nat=SAVED).splitlines()
    deletions = [i for i, line in enumerate(text) if line.startswith("-D ")]
    inserts = [i for i, line in enumerate(text) if line.startswith("-I ")]
    assert len(deletions) == 2 and len(inserts) == 2
    assert max(deletions) < min(inserts)
    assert not any("CNI_CHAIN" in line for line in text)
    # Nothing of ours yet: same as a fresh install.
    assert render_rules(PodCapture(POD_IP), saved_nat="") == render_rules(PodCapture(POD_IP))
