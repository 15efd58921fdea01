"""Transparent capture (issue 5): iptables redirection inside each pod's network namespace
and the sockets ztunnel makes there, as Istio's in-pod mode does. Linux and root only.

``netns``: entering namespaces and making listeners / connections inside them, and reading
``SO_ORIGINAL_DST``. ``rules``: the nat rules (rendered sans-IO) and their install / removal.
"""

from ztunnel.capture.netns import (
    NetnsError,
    OriginalDestinationError,
    connect_in,
    entered,
    netns_path,
    open_tcp_listeners_in,
    original_destination,
    run_in,
)
from ztunnel.capture.rules import (
    BYPASS_MARK,
    BYPASS_MASK,
    PodCapture,
    RulesError,
    apply,
    installed,
    remove,
    render_cleanup,
    render_rules,
)

__all__ = [
    "BYPASS_MARK",
    "BYPASS_MASK",
    "NetnsError",
    "OriginalDestinationError",
    "PodCapture",
    "RulesError",
    "apply",
    "connect_in",
    "entered",
    "installed",
    "netns_path",
    "open_tcp_listeners_in",
    "original_destination",
    "remove",
    "render_cleanup",
    "render_rules",
    "run_in",
]
