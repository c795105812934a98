"""A write that `Database.run` flushes is on disk before `run` returns, and
its transaction holds SQLite's write lock from its start.

The hot path's SQLite writer commits without waiting for the disk, so that
the processes of `serve --workers N` do not hold the write lock through
each other's flushes, and flushes the write-ahead log after the commit.
What is on disk when is seen only in the system calls, so the store is
driven in a process of its own under strace; a flush that fails is made to
fail at the system call.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Connection

from atsmail.storage import db as db_module
from atsmail.storage.db import SQLITE_BUSY_TIMEOUT_MS, Database
from tests.conftest import require_peer

SCRIPT = """
import asyncio, os, sys
from atsmail.storage.db import Database

async def main(path, flush):
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.run(lambda c: c.exec_driver_sql("CREATE TABLE t (x BLOB)"), write=True)
    for _ in range(3):
        os.write(1, b"WRITE\\n")
        await db.run(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (randomblob(20000))"),
                     write=True, flush=flush)
        os.write(1, b"RETURNED\\n")
    await db.close()

asyncio.run(main(sys.argv[1], sys.argv[2] == "flush"))
"""

# strace -y writes each descriptor with its path: fdatasync(7</tmp/.../store.db-wal>)
CALL = re.compile(r"^(\d+)\s+(\w+)\((\d+)<([^>]*)>(.*)$")


def calls_between_the_markers(store: Path, log: Path, flush: bool,
                              tmp_path: Path) -> list[list[str]]:
    """For each write: the system calls ("name path") of the thread that wrote
    it to the log, from WRITE to RETURNED. (The store's other threads, such
    as the one that folds the log into the database, flush it on their own
    schedule.)"""
    trace = tmp_path / "trace"
    run = subprocess.run(["strace", "-f", "-y", "-o", str(trace),
                          "-e", "trace=write,pwrite64,fsync,fdatasync",
                          sys.executable, "-c", SCRIPT, str(store), "flush" if flush else "no"],
                         capture_output=True, text=True, timeout=60)
    require_peer("ptrace" not in run.stderr, f"strace cannot trace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    writes: list[list[str]] = []
    current: list[tuple[str, str]] | None = None
    for line in trace.read_text().splitlines():
        match = CALL.match(line)
        if not match:
            continue
        thread, name, fd, target, rest = match.groups()
        if name == "write" and fd == "1":
            if "WRITE" in rest:
                current = []
            elif "RETURNED" in rest and current is not None:
                writer = next(t for t, call in current if call == f"pwrite64 {log}")
                writes.append([call for t, call in current if t == writer])
                current = None
        elif current is not None:
            current.append((thread, f"{name} {target}"))
    return writes


@pytest.fixture
def strace() -> None:
    require_peer(shutil.which("strace") is not None, "strace is not installed")


@pytest.mark.usefixtures("strace")
def test_a_flushed_write_reaches_the_disk_after_its_commit_before_run_returns(
        tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    assert_flushed_after_each_commit(
        calls_between_the_markers(store, Path(f"{store}-wal"), flush=True, tmp_path=tmp_path),
        Path(f"{store}-wal"))


@pytest.mark.usefixtures("strace")
def test_the_log_flushed_is_the_one_sqlite_writes_beside_a_linked_store(
        tmp_path: Path) -> None:
    # SQLite follows the link and keeps its log beside the file it opened.
    real = tmp_path / "data" / "store.db"
    real.parent.mkdir()
    link = tmp_path / "store.db"
    link.symlink_to(real)
    log = Path(f"{real}-wal")
    assert_flushed_after_each_commit(
        calls_between_the_markers(link, log, flush=True, tmp_path=tmp_path), log)


def assert_flushed_after_each_commit(writes: list[list[str]], log: Path) -> None:
    assert len(writes) == 3
    for calls in writes:
        commit = max(i for i, call in enumerate(calls) if call == f"pwrite64 {log}")
        assert {f"fdatasync {log}", f"fsync {log}"} & set(calls[commit + 1:]), calls


@pytest.mark.usefixtures("strace")
def test_a_write_not_flushed_leaves_the_log_to_a_later_flush(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    writes = calls_between_the_markers(store, Path(f"{store}-wal"), flush=False,
                                       tmp_path=tmp_path)
    assert len(writes) == 3
    # (SQLite flushes the log's header itself when it starts writing the log
    # from its beginning, as in the first write.)
    for calls in writes[1:]:
        assert f"pwrite64 {store}-wal" in calls
        assert not [call for call in calls if call.startswith(("fsync", "fdatasync"))], calls


async def rows(db: Database) -> list[object]:
    return await db.run(lambda c: c.exec_driver_sql("SELECT x FROM t").scalars().all(),
                        write=False)


async def test_a_failed_flush_fails_the_write_and_the_store_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not reported, the write would be answered as kept (250) while not on disk.
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        await db.run(lambda c: c.exec_driver_sql("CREATE TABLE t (x)"), write=True)

        def disk_error(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", disk_error)
        with pytest.raises(OSError, match="Input/output"):
            await db.run(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (1)"), write=True)
        monkeypatch.undo()
        await db.run(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (2)"), write=True)
        # The first was committed before its flush failed: it is there, only
        # not known to be on disk until the second's flush.
        assert await rows(db) == [1, 2]
    finally:
        await db.close()


# --- the write lock ----------------------------------------------------------------------


@pytest.fixture
async def rival(tmp_path: Path) -> AsyncIterator[tuple[Database, sqlite3.Connection]]:
    """A store with a table `t`, and a connection of another's to it (to
    SQLite's locks, as good as another process)."""
    path = tmp_path / "store.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        await db.run(lambda c: c.exec_driver_sql("CREATE TABLE t (x)"), write=True)
        yield db, other
    finally:
        other.close()
        await db.close()


async def test_a_write_holds_the_write_lock_from_its_start(
        rival: tuple[Database, sqlite3.Connection]) -> None:
    # BEGIN IMMEDIATE: two processes' writes never interleave, and none
    # learns only at its first change that another process got there first.
    db, other = rival
    seen: list[str] = []

    def work(conn: Connection) -> None:
        # No statement yet, and the lock is this transaction's.
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            seen.append(str(exc))
        else:
            other.execute("ROLLBACK")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    await db.run(work, write=True)
    assert seen == ["database is locked"]


async def test_a_write_waits_for_another_process_s_write_then_goes_on(
        rival: tuple[Database, sqlite3.Connection]) -> None:
    db, other = rival
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES ('other')")
    write = asyncio.create_task(db.run(
        lambda c: c.exec_driver_sql("INSERT INTO t VALUES ('ours')"), write=True))
    await asyncio.sleep(0.3)
    assert not write.done()
    other.execute("COMMIT")
    await asyncio.wait_for(write, 10)
    assert await rows(db) == ["other", "ours"]
    # SQLite's own wait is back for what the writer does inside its
    # transactions.
    assert await db.run(lambda c: c.exec_driver_sql("PRAGMA busy_timeout").scalar(),
                        write=True) == SQLITE_BUSY_TIMEOUT_MS


async def test_a_write_gives_up_when_the_lock_stays_taken(
        rival: tuple[Database, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    db, other = rival
    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 300)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        await db.run(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (1)"), write=True)
    other.execute("COMMIT")
    # The store goes on once the lock is free.
    await db.run(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (2)"), write=True)
    assert await rows(db) == [2]
