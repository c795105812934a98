"""Rate limits per client: so many events a minute, counted over a sliding window.

Like Postfix's anvil, the counts live in this process: several gateways
behind one MTA each count on their own, which is what a limit on abuse of
one gateway needs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW = 60.0
# Above this many clients tracked, those with nothing in the window are dropped.
SWEEP_ABOVE = 10_000


class RateLimiter:
    """At most `limit` events per `window` seconds for each key; 0 is no limit."""

    def __init__(self, limit: int, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        """Count one event for `key` unless that would pass the limit."""
        if self.limit <= 0:
            return True
        now = self.clock()
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= SWEEP_ABOVE:
                self._sweep(now)
            events = self._events[key] = deque()
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def _sweep(self, now: float) -> None:
        for key in [k for k, events in self._events.items()
                    if not events or events[-1] <= now - self.window]:
            del self._events[key]
