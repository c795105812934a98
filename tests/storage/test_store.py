"""The store's service layer on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from atsmail.gateway.sender import queue_message
from atsmail.rules import Context, decide, read_message
from atsmail.storage import Capture, CaptureWriter, NotFound, Store, UserError
from atsmail.storage import db as db_module
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import Job
from atsmail.storage.outbox import Outbox
from tests.conftest import make_mail

RECRUITER = "recruiter@example.com"


async def capture(store: Store, raw: bytes, writer: CaptureWriter | None = None,
                  confirm: bool = True) -> Capture:
    facts = read_message(raw)
    decision = decide(facts, await store.context_for(facts, capture_forwards=True))
    assert decision.capture, decision.trace
    item = Capture(facts, decision, raw, "relay")
    own = writer is None
    writer = writer or CaptureWriter(store.db)
    await writer.start()
    try:
        prepared = await writer.prepare(item)
        if confirm:
            await writer.confirm(prepared)
    finally:
        if own:
            await writer.stop()
    return item


async def test_a_new_team_member_is_removed_from_candidates_with_a_notice(team: Store) -> None:
    await team.add_candidate("C-5", "Sam Switcher", ["sam@home.test", "sam@work.test"])
    removals = await team.add_team_member("SAM@home.test", "Sam", "recruiter")
    assert [(r.candidate_id, r.address) for r in removals] == [("C-5", "sam@home.test")]
    view = await team.candidate("C-5")
    assert view.emails == ["sam@work.test"]
    assert len(view.notices) == 1
    assert "sam@home.test was removed" in view.notices[0][0]
    assert "team member" in view.notices[0][0]


async def test_a_new_internal_domain_removes_its_addresses_and_subdomains(team: Store) -> None:
    await team.add_candidate("C-6", "Ivan Internal",
                             ["ivan@corp.test", "ivan@eu.corp.test", "ivan@notcorp.test"])
    removed = await team.add_domain("CORP.test")
    assert sorted(r.address for r in removed) == ["ivan@corp.test", "ivan@eu.corp.test"]
    view = await team.candidate("C-6")
    assert view.emails == ["ivan@notcorp.test"]
    assert all("corp.test is an internal domain" in text for text, _ in view.notices)


async def test_internal_addresses_are_refused_on_new_candidates(team: Store) -> None:
    refused = await team.add_candidate("C-7", "Mixed", ["mixed@example.com", "mixed@home.test"])
    assert len(refused) == 1 and "mixed@example.com was not added" in refused[0]
    assert (await team.candidate("C-7")).emails == ["mixed@home.test"]
    with pytest.raises(UserError, match="internal domain"):
        await team.add_candidate("C-8", "Only Internal", ["only@sub.example.com"])
    with pytest.raises(UserError, match="team member"):
        await team.add_candidate("C-8", "Recruiter", [RECRUITER])
    with pytest.raises(UserError, match="unknown candidate"):
        await team.candidate("C-8")


@pytest.mark.parametrize(("call", "message"), [
    (lambda s: s.add_candidate("C-1", "Again", ["x@y.test"]), "already exists"),
    (lambda s: s.add_candidate("C-X", "No job", ["x@y.test"], ["NOPE"]), "unknown job NOPE"),
    (lambda s: s.add_candidate("C-X", "Bad", ["not-an-address"]), "not a mail address"),
    (lambda s: s.add_candidate("bad id", "Bad", ["x@y.test"]), "bad candidate id"),
    (lambda s: s.add_team_member(RECRUITER), "already a team member"),
    (lambda s: s.add_team_member("new@example.com", role="owner"), "unknown role"),
    (lambda s: s.add_domain("example.com"), "already an internal domain"),
    (lambda s: s.add_domain("localhost"), "not a domain"),
    (lambda s: s.remove_domain("other.test"), "not an internal domain"),
    (lambda s: s.add_job("J1", "Dup"), "already exists"),
    (lambda s: s.set_job_archived("NOPE", True), "unknown job"),
    (lambda s: s.delete_candidate("NOPE"), "unknown candidate"),
    (lambda s: s.thread(999), "unknown thread"),
    (lambda s: s.threads("NOPE"), "unknown candidate"),
])
async def test_user_errors_are_clear(team: Store, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=message):
        await call(team)


async def test_idn_and_case_spellings_are_one_address(team: Store) -> None:
    await team.add_candidate("C-IDN", "Jürgen", ["Juergen@XN--MNCHEN-3YA.test"])
    assert (await team.candidate("C-IDN")).emails == ["juergen@münchen.test"]
    facts = read_message(make_mail(RECRUITER, "juergen@münchen.test"))
    context = await team.context_for(facts, capture_forwards=True)
    assert "C-IDN" in context.candidates


async def test_context_loads_only_what_the_message_points_at(team: Store) -> None:
    item = await capture(team, make_mail(RECRUITER, "ada@applicant.test",
                                         message_id="<ctx@example.com>"))
    reply = read_message(make_mail("stranger@else.test", RECRUITER,
                                   In_Reply_To="<ctx@example.com>"))
    context = await team.context_for(reply, capture_forwards=True)
    assert set(context.candidates) == {"C-1"}
    known = context.known_messages["ctx@example.com"]
    assert known.candidates == frozenset({"C-1"})
    assert item.facts.message_id == "ctx@example.com"
    assert context.team == frozenset({RECRUITER})
    assert context.internal_domains == frozenset({"example.com"})
    assert isinstance(context, Context)


async def test_deleting_a_candidate_keeps_mail_another_candidate_needs(team: Store) -> None:
    await capture(team, make_mail(RECRUITER, "ada@applicant.test", "Only Ada"))
    await capture(team, make_mail(RECRUITER, ["ada@applicant.test", "grace@candidates.test"],
                                  "Both"))
    assert await team.delete_candidate("C-1") == (1, True)
    assert await team.threads("C-2") == [
        t for t in await team.threads() if t.subject == "Both"]
    summaries = await team.threads()
    assert [(t.subject, t.candidates) for t in summaries] == [("Both", ["C-2"])]
    with pytest.raises(UserError):
        await team.candidate("C-1")


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_erased_text_is_gone_from_the_sqlite_files(team: Store, store_url: str) -> None:
    path = Path(store_url.partition(":///")[2])
    marker = "Zebrafinch-Secret-7731"
    await capture(team, make_mail(RECRUITER, "ada@applicant.test", f"About {marker}",
                                  f"The {marker} body.\n" * 50))
    # What the outbox holds for her goes too, sent or not.
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    await queue_message(team.db, RECRUITER, ["ada@applicant.test"], f"Re {marker}",
                        f"Outbox {marker}.\n" * 50)
    await queue_message(team.db, RECRUITER, ["someone@else.test"], f"Other {marker}",
                        "Not hers.\n", candidate_id="C-1")
    await team.db.checkpoint()
    assert marker.encode() in path.read_bytes()

    assert (await team.delete_candidate("C-1"))[1], "the files are scrubbed"
    assert await Outbox(team.db).all() == []
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    for file in files:
        assert marker.encode() not in file.read_bytes(), file.name


async def test_pending_captures_are_invisible_until_confirmed(team: Store) -> None:
    raw = make_mail(RECRUITER, "ada@applicant.test", "Pending")
    await capture(team, raw, confirm=False)
    assert await team.threads() == []
    await capture(team, raw)  # the retry finds the pending copy and confirms it
    assert [t.message_count for t in await team.threads()] == [1]


async def test_discard_never_removes_a_copy_it_did_not_create(team: Store) -> None:
    raw = make_mail(RECRUITER, "ada@applicant.test", "Kept")
    item = await capture(team, raw)
    writer = CaptureWriter(team.db)
    await writer.start()
    again = await writer.prepare(item)
    assert not again.created
    await writer.discard(again)
    await writer.stop()
    assert [t.message_count for t in await team.threads()] == [1]


async def test_grouped_commits_fail_one_operation_alone(team: Store) -> None:
    good = [make_mail(RECRUITER, "ada@applicant.test", f"Good {i}") for i in range(20)]
    doomed_raw = make_mail(RECRUITER, "grace@candidates.test", "Doomed")
    doomed_facts = read_message(doomed_raw)
    doomed = Capture(doomed_facts, decide(doomed_facts, await team.context_for(
        doomed_facts, capture_forwards=True)), doomed_raw, "relay")
    await team.delete_candidate("C-2")  # its capture now violates a foreign key

    writer = CaptureWriter(team.db)
    await writer.start()
    items = []
    for raw in good:
        facts = read_message(raw)
        items.append(Capture(facts, decide(facts, await team.context_for(facts, True)), raw,
                             "relay"))
    results = await asyncio.gather(*(writer.prepare(i) for i in [*items[:10], doomed,
                                                                 *items[10:]]),
                                   return_exceptions=True)
    assert sum(isinstance(r, Exception) for r in results) == 1
    assert isinstance(results[10], Exception)
    await asyncio.gather(*(writer.confirm(r) for r in results if not isinstance(r, Exception)))
    await writer.stop()
    assert len(await team.threads("C-1")) == 20


async def test_migrations_are_tracked(tmp_path: Path) -> None:
    store = Store.open(f"sqlite+aiosqlite:///{tmp_path}/fresh.db")
    try:
        with pytest.raises(UserError, match=r"no store at .*: run `atsmail init`"):
            await store.ensure_current()
        await store.migrate()
        await store.migrate()  # a second init is harmless
        assert (await store.schema()).condition == "current"
    finally:
        await store.close()


async def test_migrations_build_exactly_the_models(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from atsmail.storage.models import Base

    async with store.db.writer.connect() as conn:
        differences = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    assert differences == []


@pytest.mark.parametrize("order", ["confirm-then-discard", "discard-then-confirm"])
async def test_a_failed_attempt_never_takes_a_copy_another_attempt_delivered(
        team: Store, order: str) -> None:
    raw = make_mail(RECRUITER, "ada@applicant.test", "Raced")
    facts = read_message(raw)
    item = Capture(facts, decide(facts, await team.context_for(facts, True)), raw, "relay")
    writer = CaptureWriter(team.db)
    await writer.start()
    first = await writer.prepare(item)     # the attempt whose upstream will say 451
    second = await writer.prepare(item)    # the MTA's retry, which gets a 250
    assert (first.created, second.created, second.held) == (True, False, True)
    if order == "confirm-then-discard":
        await writer.confirm(second)
        await writer.discard(first)
    else:
        await writer.discard(first)
        await writer.confirm(second)
    await writer.stop()
    assert [t.message_count for t in await team.threads("C-1")] == [1]


async def test_a_message_split_over_transactions_is_linked_to_every_candidate(
        team: Store) -> None:
    raw = make_mail(RECRUITER, ["ada@applicant.test", "grace@candidates.test"], "Split")
    writer = CaptureWriter(team.db)
    await writer.start()
    for rcpt in ("grace@candidates.test", "ada@applicant.test"):
        # Each transaction names one candidate (the other is Bcc'd elsewhere).
        facts = read_message(raw.replace(b"To: ", b"X-Was-To: "), RECRUITER, [rcpt])
        decision = decide(facts, await team.context_for(facts, True))
        await writer.confirm(await writer.prepare(Capture(facts, decision, raw, "relay")))
    await writer.stop()
    assert len(await team.threads("C-1")) == 1 and len(await team.threads("C-2")) == 1


async def test_a_candidate_whose_every_address_went_internal_still_shows(team: Store) -> None:
    await team.add_candidate("E-1", "Employee Applicant", ["emp@corp.test"])
    await team.add_domain("corp.test")
    view = await team.candidate("E-1")
    assert view.emails == [] and "emp@corp.test was removed" in view.notices[0][0]
    assert "E-1" in [c.id for c in await team.candidates()]


async def test_hosted_identities_are_refused_on_candidates_like_team_addresses(
        team: Store) -> None:
    from atsmail.storage.mailboxes import Mailboxes
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    with pytest.raises(UserError, match="hosted identity"):
        await team.add_candidate("C-H", "Hosted", ["rita@hosted.example"])


async def test_a_commit_that_need_not_flush_leaves_later_commits_flushed(store: Store) -> None:
    def synchronous(conn: Connection) -> str:
        setting = "synchronous" if store.db.is_sqlite else "synchronous_commit"
        return str(conn.exec_driver_sql(
            f"PRAGMA {setting}" if store.db.is_sqlite else f"SHOW {setting}").scalar_one())

    # PostgreSQL: off, then on again. SQLite's hot path commits at NORMAL (1)
    # either way, and flushes the log itself after a commit that must be on
    # disk (tests/storage/test_durability.py).
    during, after = ("1", "1") if store.db.is_sqlite else ("off", "on")
    assert await store.db.run(synchronous, write=True, flush=False) == during
    assert await store.db.run(synchronous, write=True) == after
    await store.add_job("J9", "Kept")
    assert (await store.job("J9"))[0].title == "Kept"


async def test_a_failed_hot_path_transaction_leaves_the_next_one_a_clean_start(
        store: Store) -> None:
    def half_done(conn: Connection) -> None:
        conn.execute(insert(Job).values(id="J-half", title="Half"))
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    await store.db.run(lambda conn: None, write=True)
    held = store.db._held.get("writer")
    assert (held is not None) == store.db.is_sqlite
    for _ in range(2):
        with pytest.raises(DBAPIError):
            await store.db.run(half_done, write=True)
    # The connection it failed on is not used again (SQLite: a new one is made).
    assert store.db._held.get("writer") is None or store.db._held.get("writer") is not held
    with pytest.raises(NotFound):
        await store.job("J-half")
    await store.add_job("J-after", "After")
    assert (await store.job("J-after"))[0].title == "After"


async def test_sqlite_hot_path_commits_leave_folding_the_log_to_a_thread_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_module, "FOLD_EVERY", 0.0)
    path = tmp_path / "folded.db"
    store = Store.open(f"sqlite+aiosqlite:///{path}")
    await store.migrate()
    db = store.db

    def write(sql: str) -> Callable[[Connection], Any]:
        return lambda conn: conn.exec_driver_sql(sql).all() if sql.startswith("PRAGMA") else (
            conn.exec_driver_sql(sql))

    try:
        # The commits do not fold the log into the database file themselves
        # (that would make a message wait for it) but past a backstop...
        assert (await db.run(write("PRAGMA wal_autocheckpoint"), write=True)) == [
            (db_module.FOLD_BACKSTOP_PAGES,)]
        await db.run(write("CREATE TABLE scratch (n INTEGER)"), write=True)
        for n in range(50):
            await db.run(write(f"INSERT INTO scratch VALUES ({n})"), write=True)
        # ...and yet the file alone, without its log, soon holds every row.
        copy = tmp_path / "copy.db"
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            shutil.copyfile(path, copy)
            try:
                with contextlib.closing(sqlite3.connect(copy)) as alone:
                    if alone.execute("SELECT count(*) FROM scratch").fetchone() == (50,):
                        break
            except sqlite3.DatabaseError:
                pass  # not there yet, or copied mid-way through a fold
            assert asyncio.get_running_loop().time() < deadline, "the log was never folded"
            await db.run(write("SELECT 1"), write=True)
            await asyncio.sleep(0.05)
    finally:
        await store.close()


async def test_a_search_holding_a_nul_finds_nothing_rather_than_failing(store: Store) -> None:
    await store.add_candidate("C-N", "Nora", ["nora@x.test"])
    assert [c.id for c in await store.candidates("Nor")] == ["C-N"]
    assert await store.candidates("Nor\x00") == []


async def test_under_steady_writes_the_sqlite_log_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The log starts afresh only once all of it is folded in; with writes
    # landing while a fold runs, only the backstop keeps it from growing.
    # Folds come far oftener than in service, though not back to back:
    # SQLite runs one fold at a time, and the backstop's gives way to a
    # fold already running (with folds back to back, it gave way in about
    # one run in six, and the log reached 3.8 MB).
    monkeypatch.setattr(db_module, "FOLD_EVERY", 0.01)
    monkeypatch.setattr(db_module, "FOLD_BACKSTOP_PAGES", 100)
    path = tmp_path / "steady.db"
    store = Store.open(f"sqlite+aiosqlite:///{path}")
    await store.migrate()
    try:
        await store.db.run(lambda conn: conn.exec_driver_sql(
            "CREATE TABLE scratch (b BLOB)"), write=True)
        for _ in range(400):  # 4 MB, 10 KB a commit
            await store.db.run(lambda conn: conn.exec_driver_sql(
                "INSERT INTO scratch VALUES (randomblob(10240))"), write=True)
        # Unbounded, the log ends at about 8 MB; bounded, at about 0.5 MB, more
        # when the machine is busy and a fold is still running when the
        # backstop is due.
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size < 2 * 1024 * 1024, wal.stat().st_size
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_confirming_a_large_capture_writes_its_bytes_no_second_time(
        team: Store, store_url: str) -> None:
    # SQLite writes a whole row again to change one column of it: the
    # message's bytes live in a row of their own, which confirming leaves be.
    wal = Path(store_url.partition(":///")[2] + "-wal")
    for size in (500_000, 3_000_000):  # bound as a value; written in pieces
        raw = make_mail(RECRUITER, "ada@applicant.test", f"CV {size}", "x" * size)
        writer = CaptureWriter(team.db)
        await writer.start()
        try:
            item = await capture(team, raw, writer, confirm=False)
            prepared = await writer.prepare(item)  # the same copy, held twice
            assert await team.db.checkpoint()
            before = wal.stat().st_size
            await writer.confirm(prepared)
        finally:
            await writer.stop()
        assert wal.stat().st_size - before < 100_000, (size, wal.stat().st_size - before)
        found = await team.candidate_messages("C-1")
        assert any(m.raw == raw for m in found)
