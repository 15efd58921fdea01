"""The local rate limit token bucket, as Envoy's local rate limit filter fills it (an empty
bucket is answered 429 ``RL``).
"""

from __future__ import annotations

import math

from ambient_api.l7 import RateLimit
from waypoint.resilience.clock import BOUNDARY_SLACK, Clock


class TokenBucket:
    """Envoy's local rate limit bucket: starts full with ``max_tokens``; every
    ``fill_interval`` (counted from creation) adds ``tokens_per_fill``, never above
    ``max_tokens``. A request that finds it empty is answered 429 with flag ``RL``."""

    def __init__(
        self, max_tokens: int, tokens_per_fill: int, fill_interval: float, clock: Clock
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"rate limit max_tokens must be >= 1, got {max_tokens}")
        if tokens_per_fill < 1:
            raise ValueError(f"rate limit tokens_per_fill must be >= 1, got {tokens_per_fill}")
        if fill_interval <= 0:
            raise ValueError(f"rate limit fill_interval must be > 0, got {fill_interval}")
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval = fill_interval
        self._clock = clock
        self._tokens = max_tokens
        self._last_fill = clock()

    @classmethod
    def from_rate_limit(cls, limit: RateLimit, clock: Clock) -> TokenBucket:
        try:
            return cls(limit.max_tokens, limit.tokens_per_fill, limit.fill_interval, clock)
        except ValueError as error:
            raise ValueError(f"rate limit {limit.key}: {error}") from None

    @property
    def tokens(self) -> int:
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token; False (answer 429) when there is none."""
        self._refill()
        if self._tokens <= 0:
            return False
        self._tokens -= 1
        return True

    def _refill(self) -> None:
        elapsed = self._clock() - self._last_fill
        fills = math.floor(elapsed / self.fill_interval + BOUNDARY_SLACK)
        if fills <= 0:
            return
        self._last_fill += fills * self.fill_interval
        self._tokens = min(self.max_tokens, self._tokens + fills * self.tokens_per_fill)
