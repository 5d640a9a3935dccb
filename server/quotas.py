"""Per-caller rate limits, as token buckets (one per caller identity, per worker process).

    >>> buckets = TokenBuckets(rate=1000.0)         # 1,000 a second, a second's worth at once
    >>> buckets.take("metro_gateway", 800), buckets.take("metro_gateway", 800)
    (True, False)

A station gateway's batch checks are the volume one caller can push through the audit log:
each token of a batch is a disclosure written to disk. The bucket bounds it per identity
without a lock per call beyond the dict's (the GIL serialises the arithmetic; every check
runs on the worker's one event loop). A request bigger than the whole bucket passes when the
bucket is full, so the largest batch the contract allows always gets through eventually.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be > 0 (no limit: do not make buckets)")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)

    def take(self, key: str, n: int) -> bool:
        """Take ``n`` from ``key``'s bucket if it holds them (or is full): True; else False and
        nothing is taken."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if n <= tokens or tokens >= self.burst:
            self._buckets[key] = (tokens - n, now)
            return True
        self._buckets[key] = (tokens, now)
        return False
