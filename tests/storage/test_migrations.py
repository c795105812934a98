"""Upgrading a store that holds mail keeps all of it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import text

from atsmail.storage import Store
from atsmail.storage.migrate import _alembic_config


async def test_upgrading_a_populated_sqlite_store_loses_no_row(tmp_path: Path) -> None:
    # 0005 rebuilds the thread table, which captured messages point into
    # with ON DELETE CASCADE; later ones rebuild others.
    store = Store.open(f"sqlite+aiosqlite:///{tmp_path}/old.db")
    try:
        async with store.db.writer.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(_alembic_config(c), "0004"))
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
                "'[]', 'Interview', 5, x'68656c6c6f', '[]', '2026-01-01')"))
            await conn.execute(text(
                "INSERT INTO message_candidates (message_pk, candidate_id) VALUES (1, 'C-1')"))
        await store.migrate()
        async with store.db.writer.begin() as conn:
            assert (await conn.execute(text(
                "SELECT raw FROM message_bodies WHERE message_pk = 1"))).scalar_one() == b"hello"
            assert (await conn.execute(text(
                "SELECT candidate_id FROM message_candidates"))).scalar_one() == "C-1"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
        assert (await store.candidate_messages("C-1"))
    finally:
        await store.close()
