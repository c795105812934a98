"""Migrations keep the mail a store holds, going up and coming back down."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from atsmail.storage import Store, UserError


async def _populate_at_0004(store: Store) -> None:
    """One captured message of candidate C-1's, as 0004 stored it."""
    await store.migrate("0004")
    async with store.db.writer.begin() as conn:
        await conn.execute(text(
            "INSERT INTO threads (id, subject, created_at, last_date) "
            "VALUES (1, 'Interview', '2026-01-01', '2026-01-01')"))
        await conn.execute(text(
            "INSERT INTO candidates (id, name, created_at) "
            "VALUES ('C-1', 'Ada', '2026-01-01')"))
        await conn.execute(text(
            "INSERT INTO messages (id, thread_id, capture_key, state, direction, source, "
            "from_addr, to_addrs, cc_addrs, subject, size, raw, trace, created_at) "
            "VALUES (1, 1, 'mid:a@b', 'confirmed', 'inbound', 'relay', 'ada@a.test', '[]', "
            "'[]', 'Interview', 5, :raw, '[]', '2026-01-01')"), {"raw": b"hello"})
        await conn.execute(text(
            "INSERT INTO message_candidates (message_pk, candidate_id) VALUES (1, 'C-1')"))


async def _scalar(store: Store, sql: str) -> object:
    async with store.db.reader.connect() as conn:
        return (await conn.execute(text(sql))).scalar_one()


async def test_upgrading_a_populated_sqlite_store_loses_no_row(tmp_path: Path) -> None:
    # 0005 rebuilds the thread table, which captured messages point into
    # with ON DELETE CASCADE; later ones rebuild others.
    store = Store.open(f"sqlite+aiosqlite:///{tmp_path}/old.db")
    try:
        await _populate_at_0004(store)
        await store.migrate()
        assert await _scalar(store, "SELECT raw FROM message_bodies WHERE message_pk = 1") \
            == b"hello"
        assert await _scalar(store, "SELECT candidate_id FROM message_candidates") == "C-1"
        async with store.db.writer.connect() as conn:
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
        assert await store.candidate_messages("C-1")
        assert (await store.schema()).condition == "current"
    finally:
        await store.close()


async def test_every_migration_comes_down_and_goes_up_again_with_the_mail(
        store_url: str) -> None:
    store = Store.open(store_url)
    try:
        # Every downgrade, on an empty store; then every upgrade, on one with mail.
        await store.migrate("base")
        assert await _scalar(store, "SELECT count(*) FROM alembic_version") == 0
        await _populate_at_0004(store)
        await store.migrate()
        assert await store.candidate_messages("C-1")
        # Back to each older schema with the mail, and up again.
        for revision in [f"{n:04d}" for n in range(11, 0, -1)]:
            await store.migrate(revision)
            assert await _scalar(store, "SELECT raw FROM messages WHERE id = 1") == b"hello", \
                revision
            assert await _scalar(store, "SELECT candidate_id FROM message_candidates") == "C-1"
            await store.migrate()
        assert await _scalar(store, "SELECT raw FROM message_bodies WHERE message_pk = 1") \
            == b"hello"
        assert await _scalar(store, "SELECT candidate_id FROM message_candidates") == "C-1"
        assert (await store.schema()).condition == "current"
    finally:
        await store.close()


async def test_a_store_says_how_its_schema_stands_against_this_version(store_url: str) -> None:
    store = Store.open(store_url)
    try:
        await store.migrate("0011")
        state = await store.schema()
        assert (state.at, state.head, state.condition) == ("0011", "0012", "older")
        assert state.applied == state.ids[:-1]
        with pytest.raises(UserError, match=r"at 0011, older than this version's 0012: run "
                                            r"`atsmail init`"):
            await store.ensure_current()
        await store.migrate()
        await store.ensure_current()
        # As a newer version of atsmail would leave it.
        async with store.db.writer.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        state = await store.schema()
        assert (state.condition, state.applied) == ("newer", state.ids)
        newer = r"at 0099, which a newer version .* `atsmail schema downgrade 0012` first"
        with pytest.raises(UserError, match=newer):
            await store.ensure_current()
        with pytest.raises(UserError, match=newer):
            await store.migrate()
        async with store.db.writer.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0012'"))
    finally:
        await store.close()
