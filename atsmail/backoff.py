"""The one back-off schedule for everything retried: outbox mail, webhook deliveries."""

from __future__ import annotations


def backoff(attempts: int, first: float, last: float) -> float:
    """Seconds before the next try after `attempts` failed ones: doubling from
    `first`, at most `last`, so a peer that is down is not hammered."""
    return float(min(last, first * 2.0 ** max(0, attempts - 1)))
