"""Outbox claims with several gateways on one store: each message is in one gateway's
hands at a time, and a dead gateway's claims run out rather than stay stuck."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from atsmail.gateway.sender import queue_message
from atsmail.storage import Store
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.outbox import Outbox

ADA = "ada@applicant.test"


@pytest.fixture
async def queued(team: Store) -> list[int]:
    await Mailboxes(team.db).set_hosted_identity("recruiter@example.com", "rita@hosted.example")
    items = [await queue_message(team.db, "recruiter@example.com", [ADA], f"Message {n}", "Hi.")
             for n in range(12)]
    return [item.id for item in items]


@pytest.fixture
async def other(store_url: str) -> AsyncIterator[Store]:
    """A second gateway's view of the same store: its own engines and connections."""
    opened = Store.open(store_url)
    yield opened
    await opened.close()


async def test_gateways_claiming_at_once_never_claim_the_same_message(
        team: Store, other: Store, queued: list[int]) -> None:
    outboxes = [Outbox(team.db), Outbox(other.db)] * 4
    rounds = await asyncio.gather(*(outbox.claim_due(limit=3) for outbox in outboxes))
    claimed = [item.id for batch in rounds for item in batch]
    assert sorted(claimed) == queued  # every message once, none twice
    assert all(item.status == "sending" and item.attempts == 1
               for batch in rounds for item in batch)
    assert await Outbox(team.db).claim_due() == []


async def test_a_claim_that_runs_out_is_taken_by_another_gateway(
        team: Store, other: Store, queued: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("atsmail.storage.outbox.CLAIM", timedelta(seconds=0.3))
    dead = await Outbox(team.db).claim_due(limit=2)
    monkeypatch.undo()
    assert await Outbox(other.db).claim_due(limit=len(queued)) != []  # the rest
    assert await Outbox(other.db).claim_due() == []
    await asyncio.sleep(0.4)
    survivor = await Outbox(other.db).claim_due(limit=len(queued))
    assert [i.id for i in survivor] == [i.id for i in dead]
    assert [i.attempts for i in survivor] == [2, 2]
    # The first gateway coming back to life gives back only what is still its own.
    await Outbox(team.db).release(dead)
    states = {i.id: (i.status, i.next_attempt) for i in await Outbox(team.db).all()}
    assert [states[i.id] for i in dead] == [("sending", i.next_attempt) for i in survivor]


async def test_released_claims_are_due_again_at_once(
        team: Store, other: Store, queued: list[int]) -> None:
    claimed = await Outbox(team.db).claim_due(limit=2)
    await Outbox(team.db).release(claimed)
    again = {i.id: i for i in await Outbox(other.db).claim_due(limit=len(queued))}
    assert sorted(again) == queued
    # A claim given back is no attempt.
    assert [again[i.id].attempts for i in claimed] == [1, 1]
