"""Create, upgrade or take back the store's schema with Alembic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Schema:
    """Where the store's schema is, against the migrations of this version."""

    # The store's revision; None before `atsmail init`.
    at: str | None
    # This version's migrations, oldest first: (revision, what it does).
    revisions: tuple[tuple[str, str], ...]

    @property
    def head(self) -> str:
        return self.revisions[-1][0]

    @property
    def known(self) -> bool:
        """Whether this version knows the store's revision (a newer one made it, if not)."""
        return self.at is None or self.at in self.ids

    @property
    def ids(self) -> list[str]:
        return [revision for revision, _ in self.revisions]

    @property
    def applied(self) -> list[str]:
        """The revisions of this version that the store has."""
        if self.at is None:
            return []
        return self.ids if not self.known else self.ids[:self.ids.index(self.at) + 1]

    @property
    def condition(self) -> str:
        if self.at is None:
            return "empty"
        if not self.known:
            return "newer"
        return "current" if self.at == self.head else "older"

    @property
    def summary(self) -> str:
        """Where the store stands, and what to do about it, for the admin."""
        return {
            "empty": "the store is not initialised: run `atsmail init`",
            "current": f"the store's schema is at {self.at}, this version's",
            "older": f"the store's schema is at {self.at}, older than this version's "
                     f"{self.head}: run `atsmail init` to upgrade it",
            "newer": f"the store's schema is at {self.at}, which a newer version of atsmail "
                     f"made (this one knows up to {self.head}): run that version, or take the "
                     f"store back with its `atsmail schema downgrade {self.head}` first",
        }[self.condition]


async def schema(db: Database) -> Schema:
    """The store's schema revision, and this version's migrations."""
    async with db.reader.connect() as conn:
        at = await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision())
    scripts = ScriptDirectory.from_config(_alembic_config())
    return Schema(at, tuple((script.revision, script.doc) for script in
                            reversed(list(scripts.walk_revisions("base", "heads")))))
