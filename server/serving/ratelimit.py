"""A token bucket per API key, and per client address for requests without a valid key: ``rate`` requests a
second on average, bursts of up to ``burst``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

PRUNE_AT = 4096  # buckets held before the full ones are dropped (a full bucket is the same as a new one)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``take(key)`` spends one token of ``key``'s bucket: 0.0 when allowed, else the seconds until it would be.

    Buckets start full and refill continuously; the clock is injectable so tests need not sleep. A bucket that
    has refilled is dropped once ``PRUNE_AT`` buckets are held (again at every doubling), so that a client
    sending from many addresses cannot grow the table beyond the buckets drawn on within ``burst / rate``
    seconds.
    """

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate limit must be a finite number of requests per second > 0, got {rate}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._prune_at = PRUNE_AT
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        with self._lock:
            now = self._clock()
            if len(self._buckets) >= self._prune_at:
                self._drop_full(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _drop_full(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))

    def __len__(self) -> int:
        """Buckets held now."""
        return len(self._buckets)
