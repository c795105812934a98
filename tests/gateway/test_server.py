"""The running gateway's own duties: the daily purge of mail past its retention."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import pytest

from atsmail.config import Upstream
from atsmail.gateway import server
from atsmail.gateway.server import Gateway
from atsmail.storage import Store
from atsmail.storage.access import Access
from atsmail.storage.retention import apply_retention
from atsmail.storage.store import PurgeResult
from tests.conftest import GatewayFactory, Sink, eventually, make_mail, relay_config
from tests.storage.test_retention import captured_days_ago
from tests.storage.test_store import RECRUITER, capture

ADA = "ada@applicant.test"


# Generous: the test machine is shared.
WAIT = 20.0


@pytest.fixture
def quick_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "RETENTION_FIRST_RUN", 0.05)
    monkeypatch.setattr(server, "RETENTION_INTERVAL", 0.3)


async def purges(store: Store) -> list[dict[str, object]]:
    return [e.detail for e in reversed(await Access(store.db).audit())
            if e.action == "retention.purge" and e.actor == "retention"]


async def test_serve_purges_old_mail_every_interval_and_retries_a_failure(
        team: Store, gateway_factory: GatewayFactory, quick_retention: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    async def failing_once(store: Store, retention_days: int, actor: str,
                           now: datetime | None = None) -> PurgeResult:
        calls.append(actor)
        if len(calls) == 1:
            raise OSError("disk on fire")
        return await apply_retention(store, retention_days, actor, now)

    monkeypatch.setattr(server, "apply_retention", failing_once)
    await capture(team, make_mail(RECRUITER, ADA, "Old"))
    await captured_days_ago(team, 40, "Old")
    await capture(team, make_mail(RECRUITER, ADA, "New"))

    await gateway_factory(retention_days=30)

    async def purged_once() -> bool:
        return bool(await purges(team))

    await eventually(purged_once, WAIT)
    assert calls[:2] == ["retention", "retention"]
    assert "the retention purge failed" in caplog.text and "disk on fire" in caplog.text
    assert (await purges(team))[0]["messages"] == 1
    assert (await purges(team))[0]["retention_days"] == 30
    assert [t.subject for t in await team.threads()] == ["New"]

    # A later run finds what has grown old since.
    await captured_days_ago(team, 31, "New")

    async def all_purged() -> bool:
        return sum(int(str(d["messages"])) for d in await purges(team)) == 2

    await eventually(all_purged, WAIT)
    assert await team.threads() == []


async def test_the_purge_task_runs_only_with_retention_and_stops_with_the_gateway(
        team: Store, store_url: str, sink: Sink, quick_retention: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="atsmail.gateway.server")
    upstream = Upstream("smtp", "127.0.0.1", sink.port)
    for days in (0, 30):
        gateway = Gateway(relay_config(store_url, upstream, retention_days=days))
        await gateway.start()
        try:
            running = [t for t in asyncio.all_tasks() if t.get_name() == "retention"]
            assert len(running) == (1 if days else 0)
            if days:
                async def logged() -> bool:
                    return "retention: purged" in caplog.text

                await eventually(logged, WAIT)
        finally:
            await gateway.stop(grace=1)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "retention"]
    assert "Traceback" not in caplog.text
