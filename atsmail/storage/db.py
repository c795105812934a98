"""Engines and sessions: one URL switches SQLite and PostgreSQL.

SQLite is tuned for a mail gateway: WAL so readers never wait for the
writer, commits flushed to disk (the hot path's by `Database.run`, after the
commit) so a committed capture survives a power cut,
`secure_delete` so erased mail is overwritten rather than left in free
pages, and writers that take the lock up front (`BEGIN IMMEDIATE`) so two
processes writing at once wait for each other instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How the hot path's writer waits for another process's write (seconds):
# a pause that doubles from the first to the longest.
BUSY_FIRST_PAUSE = 50e-6
BUSY_LONGEST_PAUSE = 1e-3
CHECKPOINT_ATTEMPTS = 10
# The hot path's writes leave folding the write-ahead log into the database
# file to a thread of their own, started at most this often (seconds).
FOLD_EVERY = 0.5
# The log starts again from the beginning only when a write finds all of it
# folded in, which under steady writes that thread seldom leaves it: past this
# many pages a hot-path commit folds in the rest itself (SQLite's own default
# is 1,000 pages).
FOLD_BACKSTOP_PAGES = 10_000

log = logging.getLogger(__name__)

T = TypeVar("T")
# Where the hot path's writer keeps the path of the write-ahead log it
# flushes itself (in its connection's `info`).
FLUSHED_LOG = "atsmail_flushed_log"


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_engine(url: str, begin: str) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    _tune_sqlite(engine.sync_engine, begin)
    return engine


def _sqlite_sync_engine(url: str, hot_writer: bool = False) -> Engine:
    engine = create_engine(url.replace("+aiosqlite", "", 1),
                           connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    _tune_sqlite(engine, None, hot_writer)
    return engine


def _begin_immediate(conn: Connection) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write in short steps.

    SQLite's own wait (the busy timeout) sleeps a millisecond at the first
    refusal, then 2, 5, 10 and more, often long after the other write has
    ended; this one sleeps 50 µs, doubling up to 1 ms. With `serve --workers
    N` the processes take the store's write lock in turns, and SQLite's
    sleeps left the CPU idle. Blocks its thread, as SQLite's wait does: for
    the store's own threads only.
    """
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = BUSY_FIRST_PAUSE
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                # The low byte: SQLITE_BUSY_RECOVERY and the like are busy too.
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, BUSY_LONGEST_PAUSE)
    finally:
        driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def _tune_sqlite(engine: Engine, begin: str | None, hot_writer: bool = False) -> None:
    """Settings for every connection `engine` makes; `begin` starts its
    transactions (None: the driver's autocommit, or `Database.run`'s BEGIN).
    The hot path's writer (`hot_writer`) is begun with `_begin_immediate`
    and flushes the log itself, in `Database.run`."""
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the driver so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        logged = cursor.fetchone()[0] == "wal"
        synchronous = "FULL"
        if hot_writer and logged:
            # Its commits do not wait for the disk while they hold the write
            # lock: `Database.run` flushes the log after them. The log is
            # beside the file SQLite opened, by the name it resolved (a
            # symbolic link followed), not necessarily the name it was given.
            cursor.execute("PRAGMA database_list")
            opened = {name: file for _, name, file in cursor.fetchall()}.get("main")
            if opened:
                record.info[FLUSHED_LOG] = f"{opened}-wal"
                synchronous = "NORMAL"
        pragmas = [f"synchronous={synchronous}", "secure_delete=ON", "foreign_keys=ON",
                   f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}"]
        if hot_writer:
            # Otherwise every thousandth page or so, a commit also copies the
            # log into the database file and waits for the disk twice more.
            pragmas.append(f"wal_autocheckpoint={FOLD_BACKSTOP_PAGES}")
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    if begin is None:
        return  # autocommit: each statement is its own transaction

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)


def _flush(log_file: str) -> None:
    """Put the write-ahead log on disk, and with it every commit before.

    What `synchronous=FULL` does inside each commit, done after it, with the
    write lock free: the processes of `serve --workers N` do not wait for
    each other's flushes. SQLite has written the commit to the log file
    (only not yet to disk), and a crash that leaves part of it unwritten
    undoes it whole: the log's checksums end at the last commit written in
    full. Unlike FULL, other connections may see the commit before it is on
    disk; a capture's own flushed commit takes every commit before it there.
    """
    fd = os.open(log_file, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class Database:
    """A writer and a reader engine over one store.

    On PostgreSQL both are the same engine; on SQLite the reader starts
    deferred transactions so reads never queue behind the write lock.

    `run` serves the relay's hot path: it runs a plain synchronous function
    over one connection in one transaction. On SQLite that function runs in
    a thread of its own over a connection it keeps (one hop for the whole
    function, where aiosqlite would hop per statement); on PostgreSQL it runs
    on the async engine. Its writes do not fold the write-ahead log into the
    database file themselves: a third thread does, in the background.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._sync_engines: dict[str, Engine] = {}
        self._held: dict[str, Connection] = {}
        self._folding: Future[None] | None = None
        self._folded_at = 0.0
        self._closing = False
        if self.is_sqlite:
            self.writer = _sqlite_engine(url, "BEGIN IMMEDIATE")
            self.reader = _sqlite_engine(url, "BEGIN")
            # The hot path's reads are single statements or tolerate a commit
            # between their statements, so they skip BEGIN/COMMIT entirely.
            # Its writer's transactions are begun by `run` (an engine event
            # would be dispatched on every statement).
            for name in ("writer", "reader", "folder"):
                self._sync_engines[name] = _sqlite_sync_engine(
                    url, hot_writer=name == "writer")
                # One thread per engine: SQLite connections stay in the thread
                # that made them, and the writer serialises writes anyway.
                self._threads[name] = ThreadPoolExecutor(
                    1, thread_name_prefix=f"atsmail-store-{name}")
        else:
            self.writer = self.reader = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)

    async def run(self, work: Callable[[Connection], T], write: bool,
                  flush: bool = True) -> T:
        """`work(connection)` in one transaction, committed when it returns.

        With `flush` False the commit does not wait for the disk: it is
        atomic and seen at once, and on disk by the next flushed commit (the
        write-ahead log is written in order), but a power loss before that
        may undo it. For writes that nothing is promised on until a later
        flushed commit.
        """
        if self._closing:
            raise RuntimeError("the store is closed")
        if not self._sync_engines:
            async with self.writer.begin() as conn:
                if not flush:
                    await conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                return await conn.run_sync(work)
        name = "writer" if write else "reader"

        def in_transaction() -> T:
            conn = self._connection(name)
            try:
                with conn.begin():
                    if write:
                        _begin_immediate(conn)
                    result = work(conn)
                log_file = conn.info.get(FLUSHED_LOG)
                if flush and log_file:
                    _flush(log_file)
            except BaseException:
                # Whatever state it was left in, the next run starts afresh.
                self._release(name)
                raise
            return result

        result = await asyncio.get_running_loop().run_in_executor(
            self._threads[name], in_transaction)
        if write:
            self._fold_log_soon()
        return result

    def _connection(self, name: str) -> Connection:
        """The connection kept for the thread `name` (called in that thread)."""
        conn = self._held.get(name)
        if conn is None:
            conn = self._held[name] = self._sync_engines[name].connect()
        return conn

    def _release(self, name: str) -> None:
        conn = self._held.pop(name, None)
        if conn is not None:
            conn.close()

    def _fold_log_soon(self) -> None:
        """Start folding the write-ahead log into the database file, unless
        that is under way or was started less than FOLD_EVERY seconds ago."""
        now = time.monotonic()
        if self._closing or (self._folding is not None and not self._folding.done()) \
                or now - self._folded_at < FOLD_EVERY:
            return
        self._folded_at = now
        self._folding = self._threads["folder"].submit(self._fold_log)

    def _fold_log(self) -> None:
        # PASSIVE: copies what no reader still needs, never waits for a
        # writer or reader and never holds one up.
        try:
            driver = self._connection("folder").connection.driver_connection
            assert driver is not None
            driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception:
            self._release("folder")
            log.warning("could not fold the SQLite write-ahead log into the database; "
                        "trying again after the next write", exc_info=True)

    @property
    def is_sqlite(self) -> bool:
        return _is_sqlite(self.url)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, for a file-backed SQLite store."""
        path = self.url.partition(":///")[2].partition("?")[0]
        if not self.is_sqlite or not path or path.startswith(":memory:"):
            return None
        return Path(path)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in one write transaction, committed on success."""
        async with self._write_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read_sessions() as session, session.begin():
            yield session

    async def checkpoint(self) -> bool:
        """Fold SQLite's write-ahead log into the main file and empty it.

        Returns False when readers kept it from completing after a few tries.
        """
        if not self.is_sqlite:
            return True
        async with self.writer.connect() as conn:
            # Outside any transaction: a checkpoint cannot run inside one.
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            # A reader in the way makes the checkpoint report busy; do not
            # also sit out the long busy timeout on each try.
            await raw.execute("PRAGMA busy_timeout=500")
            try:
                for attempt in range(CHECKPOINT_ATTEMPTS):
                    async with raw.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                        busy = (await cursor.fetchone())[0]
                    if not busy:
                        return True
                    await asyncio.sleep(0.05 * (attempt + 1))
            finally:
                await raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        log.warning("the SQLite write-ahead log could not be emptied: readers kept it busy")
        return False

    async def close(self) -> None:
        self._closing = True
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
        for name, engine in self._sync_engines.items():
            # Connections are closed in the thread that made them.
            def close_in_thread(name: str = name, engine: Engine = engine) -> None:
                self._release(name)
                engine.dispose()

            await asyncio.get_running_loop().run_in_executor(self._threads[name], close_in_thread)
            self._threads[name].shutdown(wait=True)
        self._sync_engines.clear()
        self._threads.clear()
