"""Webhooks against a real HTTP receiver on loopback.

The receiver is a small HTTP/1.1 server that records every request, checks
nothing itself (the tests verify the signatures independently), and can be
told to answer 500 or to go away altogether, port closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.util import await_only

from atsmail.config import ConfigError, WebhookConfig, load_config
from atsmail.gateway.server import Gateway
from atsmail.gateway.webhooks import Endpoint, Webhooks
from atsmail.secrets import Secrets
from atsmail.storage import Store
from atsmail.storage.events import MAILBOX_ERROR, Due, WebhookQueue, event_row
from atsmail.storage.mailboxes import Account, Mailboxes
from atsmail.storage.models import WebhookDelivery, WebhookEvent, utcnow
from tests.conftest import GatewayFactory, make_mail, relay_config, smtp_send
from tests.dovecot import Dovecot
from tests.gateway.test_mirror import FAST, eventually
from tests.gateway.test_sender import free_port
from tests.storage.test_store import capture

ADA = "ada@applicant.test"
RECRUITER = "recruiter@example.com"
SECRET = "s3cret-for-the-ats"
SECRET_ENV = "ATSMAIL_TEST_WEBHOOK_SECRET"


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


@dataclass
class Receiver:
    """The ATS's webhook endpoint: records requests, answers `status`."""

    status: int = 200
    # Seconds to sit on a request before answering it.
    delay: float = 0.0
    # Seconds between the bytes of an answer that never ends, when set.
    drip: float = 0.0
    requests: list[Request] = field(default_factory=list)
    # Requests read in full, answered or not yet.
    read: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/atsmail"

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """The events it took (answered 2xx), in the order they came."""
        return [r.event for r in self.requests if r.answered == 200]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Go down: the port closed, open connections cut."""
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.read += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.drip:
                    self.requests.append(Request(headers, body, 0))
                    writer.write(b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while self.drip:
                        writer.write(b"1\r\nx\r\n")
                        await writer.drain()
                        await asyncio.sleep(self.drip)
                    return
                status = self.status
                self.requests.append(Request(headers, body, status))
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries looked at often and retried soon, so that tests take seconds."""
    monkeypatch.setattr("atsmail.gateway.webhooks.POLL", 0.05)
    monkeypatch.setattr("atsmail.gateway.webhooks.TIMEOUT", 2.0)
    monkeypatch.setattr("atsmail.storage.events.FIRST_RETRY", 0.1)
    monkeypatch.setattr("atsmail.storage.events.LAST_RETRY", 0.4)
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def second_store(store_url: str) -> AsyncIterator[Store]:
    """A second gateway on the same store: its own engine and connections."""
    opened = Store.open(store_url)
    yield opened
    await opened.close()


def hook(receiver: Receiver) -> tuple[WebhookConfig, ...]:
    return (WebhookConfig(receiver.url, SECRET_ENV),)


def verified(request: Request, secret: str = SECRET) -> dict[str, Any]:
    """The event, after checking its signature the way the README tells receivers to."""
    timestamp = request.headers["x-atsmail-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + request.body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["x-atsmail-signature"], "sha256=" + expected)
    event = request.event
    assert request.headers["x-atsmail-event"] == event["type"]
    assert request.headers["x-atsmail-event-id"] == event["id"]
    assert request.headers["content-type"] == "application/json"
    return event


def received(receiver: Receiver, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(receiver.delivered) >= count
    return check


async def queued(store: Store) -> tuple[int, int]:
    """(events, deliveries) still in the store."""
    async with store.db.read() as session:
        events = await session.scalar(select(func.count()).select_from(WebhookEvent))
        deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
    return events or 0, deliveries or 0


async def emptied(store: Store) -> bool:
    return await queued(store) == (0, 0)


@contextlib.asynccontextmanager
async def delivering(store: Store, *receivers: Receiver) -> AsyncIterator[Webhooks]:
    """The webhook worker on its own, for events recorded without the relay."""
    worker = Webhooks(tuple(Endpoint(r.url, SECRET.encode()) for r in receivers), store.db)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def relay_mail(gateway: Gateway, subject: str, message_id: str) -> None:
    raw = make_mail(RECRUITER, ADA, subject, message_id=message_id)
    result = await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])
    assert result.code == 250, result


@pytest.mark.usefixtures("fast")
async def test_captured_mail_is_announced_once_signed_without_its_body(
        gateway_factory: GatewayFactory, team: Store, receiver: Receiver) -> None:
    gateway = await gateway_factory(webhooks=hook(receiver))
    await relay_mail(gateway, "Your interview", "<interview-1@example.com>")
    await eventually(received(receiver, 1))
    event = verified(receiver.requests[0])
    assert event["type"] == "message.captured"
    assert receiver.requests[0].headers["x-atsmail-attempt"] == "1"
    data = event["data"]
    assert data["candidates"] == ["C-1"]
    message = data["message"]
    assert message["message_id"] == "interview-1@example.com"
    assert message["direction"] == "outbound"
    assert message["sources"] == ["relay"]
    assert message["subject"] == "Your interview"
    assert message["date"].startswith("2026-11-27T10:00:00")
    assert [t.id for t in await team.threads("C-1")] == [message["thread_id"]]
    assert "Hi." not in receiver.requests[0].body.decode()

    # The same message relayed again is stored once and announced once: the
    # next message's event is the next one the receiver gets.
    await relay_mail(gateway, "Your interview", "<interview-1@example.com>")
    await relay_mail(gateway, "Directions", "<directions-1@example.com>")
    await eventually(received(receiver, 2))
    assert [e["data"]["message"]["message_id"] for e in receiver.delivered] == [
        "interview-1@example.com", "directions-1@example.com"]
    assert len({e["id"] for e in receiver.delivered}) == 2
    # Delivered events leave the store.
    await eventually(lambda: emptied(team))
    assert len(receiver.requests) == 2


@pytest.mark.usefixtures("fast")
async def test_a_receiver_that_is_down_gets_every_event_in_order_when_back(
        gateway_factory: GatewayFactory, team: Store, receiver: Receiver) -> None:
    receiver.status = 500
    gateway = await gateway_factory(webhooks=hook(receiver))
    for i in range(3):
        await relay_mail(gateway, f"Mail {i}", f"<down-{i}@example.com>")

    async def retried() -> bool:
        return len(receiver.requests) >= 3

    await eventually(retried)
    # Only the oldest event is tried while the receiver fails, with back-off.
    assert len({r.event["id"] for r in receiver.requests}) == 1
    assert [r.headers["x-atsmail-attempt"] for r in receiver.requests[:3]] == ["1", "2", "3"]

    # Then it is gone altogether (port closed) while more mail is captured.
    await receiver.stop()
    for i in range(3, 5):
        await relay_mail(gateway, f"Mail {i}", f"<down-{i}@example.com>")

    async def refused() -> bool:
        return any("Connect" in (error or "") for _, _, _, error in
                   await WebhookQueue(team.db).pending())

    await eventually(refused)
    assert (await queued(team))[0] == 5

    receiver.status = 200
    await receiver.start()
    await eventually(received(receiver, 5))
    assert [e["data"]["message"]["message_id"] for e in receiver.delivered] == [
        f"down-{i}@example.com" for i in range(5)]
    assert len({e["id"] for e in receiver.delivered}) == 5
    await eventually(lambda: emptied(team))


@pytest.mark.usefixtures("fast")
async def test_removing_an_internal_address_from_a_candidate_is_announced(
        team: Store, receiver: Receiver) -> None:
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    await team.add_team_member("sam@home.test", "Sam")
    async with delivering(team, receiver):
        await eventually(received(receiver, 1))
        await eventually(lambda: emptied(team))
    event = verified(receiver.requests[0])
    assert event["type"] == "candidate.address_removed"
    assert event["data"]["candidate"] == "C-5"
    assert event["data"]["address"] == "sam@home.test"
    assert "team member sam@home.test" in event["data"]["reason"]
    assert event["data"]["notice"] == (await team.candidate("C-5")).notices[0][0]


async def connect_box(store: Store, address: str, port: int, secrets: Any) -> None:
    await Mailboxes(store.db).connect(Account(
        address=address, provider="imap", owner=RECRUITER, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=port, smtp_host="", smtp_port=0, security="none",
        username=address, sealed_secret=Secrets.load(secrets).seal("pw")))


@pytest.mark.usefixtures("fast")
async def test_a_mailbox_going_into_error_and_back_is_announced_once_each_way(
        team: Store, receiver: Receiver, secrets_config: Any) -> None:
    await connect_box(team, RECRUITER, 1, secrets_config)
    boxes = Mailboxes(team.db)
    # A watcher retrying: each retry passes through connecting and fails again.
    await boxes.set_state(RECRUITER, "connecting")
    await boxes.set_error(RECRUITER, "connection refused")
    for _ in range(2):
        await boxes.set_state(RECRUITER, "connecting")
        await boxes.set_error(RECRUITER, "connection refused again")
    await boxes.set_state(RECRUITER, "syncing")
    await boxes.set_synced(RECRUITER)
    await boxes.set_synced(RECRUITER)
    async with delivering(team, receiver):
        await eventually(received(receiver, 2))
        await eventually(lambda: emptied(team))
    events = [verified(r) for r in receiver.requests]
    assert [(e["type"], e["data"]) for e in events] == [
        ("mailbox.error", {"mailbox": RECRUITER, "error": "connection refused"}),
        ("mailbox.recovered", {"mailbox": RECRUITER, "last_error": "connection refused again"}),
    ]


@pytest.mark.usefixtures("fast")
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_the_mirror_reports_a_mailbox_it_cannot_reach_and_its_recovery(
        gateway_factory: GatewayFactory, team: Store, receiver: Receiver, dovecot: Dovecot,
        secrets_config: Any) -> None:
    address, password = dovecot.add_user("webhooked")
    port = free_port()  # nothing listens there yet: the mailbox's server is down
    await Mailboxes(team.db).connect(Account(
        address=address, provider="imap", owner=RECRUITER, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=port, smtp_host="", smtp_port=0,
        security="none", username=address,
        sealed_secret=Secrets.load(secrets_config).seal(password)))
    await gateway_factory(mirror=FAST, secrets=secrets_config, webhooks=hook(receiver))
    await eventually(received(receiver, 1))

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", dovecot.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    # The server comes back on that port (a forwarder to the test Dovecot).
    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        await eventually(received(receiver, 2))
    finally:
        server.close()
    assert [e["type"] for e in receiver.delivered] == ["mailbox.error", "mailbox.recovered"]
    assert all(e["data"]["mailbox"] == address for e in receiver.delivered)


async def test_erasing_a_candidate_erases_the_undelivered_events_about_them(
        team: Store) -> None:
    await capture(team, make_mail(RECRUITER, ADA, "Private subject"))
    await capture(team, make_mail(RECRUITER, "grace@candidates.test", "Grace's"))
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    await team.add_team_member("sam@home.test", "Sam")
    assert (await queued(team))[0] == 3
    await team.delete_candidate("C-1")
    await team.delete_candidate("C-5")
    async with team.db.read() as session:
        left = list(await session.scalars(select(WebhookEvent.data)))
    assert [d["message"]["subject"] for d in left] == ["Grace's"]


@pytest.mark.usefixtures("fast")
async def test_a_url_added_later_is_not_sent_the_past(
        team: Store, receiver: Receiver) -> None:
    async with delivering(team):  # no webhook configured: events are dropped as they come
        await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
        await team.add_team_member("sam@home.test", "Sam")
        await eventually(lambda: emptied(team))
    async with delivering(team, receiver):
        await team.add_candidate("C-6", "Ivan Internal", ["ivan@corp.test", "ivan@home.test"])
        await team.add_domain("corp.test")
        await eventually(received(receiver, 1))
        await eventually(lambda: emptied(team))
    assert [e["data"]["address"] for e in receiver.delivered] == ["ivan@corp.test"]


@pytest.mark.usefixtures("fast")
async def test_two_gateways_on_one_store_deliver_each_event_once_to_each_url(
        team: Store, store_url: str, receiver: Receiver) -> None:
    other = Receiver()
    await other.start()
    second = Store.open(store_url)
    try:
        for i in range(12):
            await team.add_candidate(f"X-{i}", "Moving", [f"x{i}@corp{i}.test", f"x{i}@keep.test"])
        async with delivering(team, receiver, other), delivering(second, receiver, other):
            for i in range(12):
                await team.add_domain(f"corp{i}.test")
            await eventually(received(receiver, 12))
            await eventually(received(other, 12))
            await eventually(lambda: emptied(team))
    finally:
        await second.close()
        await other.stop()
    # Each event once per URL, in order: the gateways' claims take turns.
    for r in (receiver, other):
        assert [e["data"]["address"] for e in r.delivered] == [
            f"x{i}@corp{i}.test" for i in range(12)]
        assert len(r.requests) == 12


async def record_numbered(store: Store, numbers: range) -> None:
    """Events numbered `n` in their data, oldest first."""
    async with store.db.write() as session:
        await session.execute(insert(WebhookEvent), [
            event_row(MAILBOX_ERROR, {"mailbox": "jobs@example.com", "n": n}) for n in numbers])


def numbered(dues: list[Due]) -> list[int]:
    return [due.payload()["data"]["n"] for due in dues]


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_a_claim_waits_for_another_gateways_claim_to_the_same_url(
        team: Store, second_store: Store) -> None:
    """Order per URL holds between gateways: while one gateway's claim of the
    oldest deliveries is not yet committed, another's claim must not take the
    next ones past them and send them first."""
    url = "https://ats.test/h"
    await record_numbered(team, range(6))
    first_claimed, second_claimed = asyncio.Event(), asyncio.Event()

    def claims(statement: str) -> bool:
        return "FOR UPDATE OF webhook_deliveries" in statement

    # The first gateway has read and locked its deliveries, and waits,
    # uncommitted, for the second's claim to be read (or for two seconds,
    # should the second's claim be waiting for the first's).
    @event.listens_for(team.db.writer.sync_engine, "after_cursor_execute")
    def first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if claims(statement) and not first_claimed.is_set():
            first_claimed.set()
            with contextlib.suppress(TimeoutError):
                await_only(asyncio.wait_for(second_claimed.wait(), 2))

    @event.listens_for(second_store.db.writer.sync_engine, "after_cursor_execute")
    def then(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if claims(statement):
            second_claimed.set()

    queue, second = WebhookQueue(team.db), WebhookQueue(second_store.db)
    assert await queue.fan_out([url]) == 6
    claiming = asyncio.create_task(queue.claim(url, lease=60, limit=3))
    await first_claimed.wait()
    taken = await second.claim(url, lease=60, limit=3)
    assert numbered(await claiming) == [0, 1, 2]
    assert numbered(taken) == []


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_no_claim_passes_events_another_gateway_is_still_fanning_out(
        team: Store, second_store: Store) -> None:
    url = "https://ats.test/h"
    await record_numbered(team, range(3))
    selected, go = asyncio.Event(), asyncio.Event()

    # The first gateway has taken the three events to fan out, uncommitted.
    @event.listens_for(team.db.writer.sync_engine, "after_cursor_execute")
    def first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if ("FROM webhook_events" in statement and "SKIP LOCKED" in statement
                and not selected.is_set()):
            selected.set()
            await_only(asyncio.wait_for(go.wait(), 10))

    queue, second = WebhookQueue(team.db), WebhookQueue(second_store.db)
    fanning = asyncio.create_task(queue.fan_out([url]))
    await selected.wait()
    # A fourth event; the second gateway fans it out and claims.
    await record_numbered(second_store, range(3, 4))
    assert await second.fan_out([url]) == 1
    taken = await second.claim(url, lease=60)
    go.set()
    assert await fanning == 3
    assert numbered(taken) == []
    assert numbered(await second.claim(url, lease=60)) == [0, 1, 2, 3]


@pytest.mark.usefixtures("fast")
async def test_an_answer_that_never_ends_is_given_up_within_the_timeout_and_sent_again(
        team: Store, receiver: Receiver) -> None:
    # A byte every half second keeps each read of the HTTP client alive:
    # only a bound on the whole request ends it, before its lease does.
    receiver.drip = 0.5
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    await team.add_team_member("sam@home.test", "Sam")
    async with delivering(team, receiver):
        await eventually(lambda: _tried(team, "no whole answer within 2 s"))
        receiver.drip = 0
        await eventually(received(receiver, 1))
        await eventually(lambda: emptied(team))
    assert receiver.requests[-1].headers["x-atsmail-attempt"] == "2"


async def _tried(store: Store, error: str) -> bool:
    return any(e == error for _, _, _, e in await WebhookQueue(store.db).pending())


@pytest.mark.usefixtures("fast")
async def test_an_event_in_flight_at_shutdown_is_sent_again_by_the_next_start(
        team: Store, receiver: Receiver) -> None:
    receiver.delay = 30  # the answer would come long after the stop
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    await team.add_team_member("sam@home.test", "Sam")

    async def arrived() -> bool:
        return receiver.read == 1

    async with delivering(team, receiver):
        await eventually(arrived)
    # Given back, not left held for the lease's length nor counted as tried.
    assert [a for _, _, a, _ in await WebhookQueue(team.db).pending()] == [0]
    receiver.delay = 0
    async with delivering(team, receiver):
        await eventually(received(receiver, 1))
    assert receiver.requests[-1].headers["x-atsmail-attempt"] == "1"
    await eventually(lambda: emptied(team))


async def test_deliveries_to_a_removed_url_and_those_failing_too_long_are_dropped(
        team: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = WebhookQueue(team.db)
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    await team.add_team_member("sam@home.test", "Sam")
    assert await queue.fan_out(["https://a.test/h", "https://b.test/h"]) == 1
    assert await queue.prune(["https://a.test/h"]) == (1, 0)
    assert [u for u, _, _, _ in await queue.pending()] == ["https://a.test/h"]
    monkeypatch.setattr("atsmail.storage.events.GIVE_UP_AFTER", timedelta(0))
    assert await queue.prune(["https://a.test/h"]) == (0, 1)
    assert await emptied(team)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_webhook_secret_that_is_not_set_stops_the_start(
        store_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    from atsmail.config import Upstream

    monkeypatch.delenv(SECRET_ENV, raising=False)
    config = relay_config(store_url, Upstream("smtp", "127.0.0.1", 1), webhooks=hook(receiver))
    with pytest.raises(ConfigError, match=f"webhook\\[0\\].secret_env: the variable {SECRET_ENV}"):
        Gateway(config)


@pytest.mark.parametrize(("table", "expected"), [
    ("url = 'https://ats.test/h'\n", "webhook[0].secret_env: missing"),
    ("secret_env = 'S'\n", "webhook[0].url: missing"),
    ("url = 'ftp://ats.test/h'\nsecret_env = 'S'\n", "webhook[0].url: expected an http"),
    ("url = 'https://ats.test/h'\nsecret_env = 'S'\nsecret = 'x'\n",
     "webhook[0].secret: unknown key"),
])
def test_bad_webhook_configuration_names_the_key(tmp_path: Path, table: str,
                                                 expected: str) -> None:
    path = tmp_path / "atsmail.toml"
    path.write_text("[[webhook]]\n" + table)
    with pytest.raises(ConfigError, match=str(path)) as error:
        load_config(path)
    assert expected in str(error.value)


def test_the_same_url_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "atsmail.toml"
    path.write_text("[[webhook]]\nurl = 'https://ats.test/h'\nsecret_env = 'A'\n" * 2)
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(path)


@pytest.mark.usefixtures("fast")
async def test_an_hours_worth_of_events_waits_out_a_receiver_that_is_down_and_all_arrive(
        store: Store, receiver: Receiver) -> None:
    # One event every five seconds for the hour the receiver was down.
    count = 720
    start = utcnow() - timedelta(hours=1)
    rows = [{**event_row(MAILBOX_ERROR, {"mailbox": "jobs@example.com", "n": n}),
             "created_at": start + timedelta(seconds=5 * n)} for n in range(count)]
    receiver.status = 503
    async with delivering(store, receiver):
        async with store.db.write() as session:
            await session.execute(insert(WebhookEvent), rows)

        async def failing_a_while() -> bool:
            return len(receiver.requests) >= 5

        await eventually(failing_a_while)
        assert await queued(store) == (count, count)
        receiver.status = 200
        await eventually(received(receiver, count), seconds=120)
        await eventually(lambda: emptied(store))
    assert [e["data"]["n"] for e in receiver.delivered] == list(range(count))
