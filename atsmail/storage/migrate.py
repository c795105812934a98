"""Create or upgrade the store's schema with Alembic."""

from __future__ import annotations

from collections.abc import Callable

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from atsmail.storage.db import Database


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "atsmail.storage:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def _move_to(revision: str) -> Callable[[Connection], None]:
    """Upgrade to `revision`, or downgrade when it comes before the store's."""
    def move(connection: Connection) -> None:
        config = _alembic_config(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        older = revision == "base" or (
            current is not None and revision not in ("head", current) and revision in {
                script.revision for script in
                ScriptDirectory.from_config(config).iterate_revisions(current, "base")})
        if older:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)
    return move


def _is_current(connection: Connection) -> bool:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    return MigrationContext.configure(connection).get_current_revision() == head


class MigrationError(RuntimeError):
    pass


async def migrate(db: Database, revision: str = "head") -> None:
    """Bring the schema to `revision`: the newest, or an older one to go back to."""
    async with db.writer.connect() as conn:
        driver = None
        if db.is_sqlite:
            # SQLite changes a table by building a new one and dropping the
            # old, and dropping a table with foreign keys enforced deletes the
            # rows that point into it (ON DELETE CASCADE): a thread table
            # rebuilt would take every captured message with it. So they are
            # off while migrating (outside a transaction, or it is a no-op) and
            # checked before the commit.
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("PRAGMA foreign_keys=OFF")
        try:
            async with conn.begin():
                await conn.run_sync(_move_to(revision))
                if driver is not None:
                    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise MigrationError(f"the migration would leave rows pointing nowhere: "
                                             f"{broken[:5]}")
        finally:
            if driver is not None:
                await driver.execute("PRAGMA foreign_keys=ON")


async def is_current(db: Database) -> bool:
    """Whether the store is at the schema this version needs."""
    async with db.reader.connect() as conn:
        return await conn.run_sync(_is_current)
