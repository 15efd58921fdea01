"""Time as the resilience rules read it: an injected monotonic ``Clock`` (``trio.current_time``
in the proxy, a fake under test), and the slack that makes boundaries exact.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]

# Floating-point slack when a clock reading lands exactly on a fill/sweep boundary
# (0.1 + 0.2 is not 0.3): a boundary reached within a nanosecond counts as reached.
BOUNDARY_SLACK = 1e-9
