"""The sliding-minute counter behind the relay's rate limits."""

from __future__ import annotations

import pytest

from atsmail.gateway import limits
from atsmail.gateway.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_its_limit_each_minute_and_refusals_do_not_count() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("b")
    clock.now += 30
    assert not limiter.allow("a")
    # A minute after the first three, room again: the refused tries took none.
    clock.now += 30
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]


def test_the_window_slides_rather_than_resetting() -> None:
    clock = Clock()
    limiter = RateLimiter(2, clock=clock)
    assert limiter.allow("a")
    clock.now += 40
    assert limiter.allow("a")
    clock.now += 25  # the first event has left the window, the second has not
    assert limiter.allow("a")
    assert not limiter.allow("a")


def test_zero_is_no_limit() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.allow("a") for _ in range(10_000))


def test_quiet_clients_are_forgotten_so_memory_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "SWEEP_ABOVE", 100)
    clock = Clock()
    limiter = RateLimiter(1, clock=clock)
    for i in range(100):
        limiter.allow(f"10.0.0.{i}")
    clock.now += 61
    limiter.allow("10.0.1.1")
    assert len(limiter._events) == 1
