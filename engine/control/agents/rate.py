"""Rate limiting of agent suggestions: a sliding window per agent."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimiter"]

RATE_WINDOW_S = 60.0


class RateLimiter:
    """At most `n` events per agent in any RATE_WINDOW_S (a sliding window). Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, agent_id: str, n: int) -> float:
        """0 when admitted (and counted); else the seconds until one would be."""
        now = self._clock()
        with self._lock:
            seen = self._seen.setdefault(agent_id, deque())
            while seen and seen[0] <= now - RATE_WINDOW_S:
                seen.popleft()
            if len(seen) >= n:
                return seen[0] + RATE_WINDOW_S - now
            seen.append(now)
            return 0.0
