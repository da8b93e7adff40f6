"""The SQL databases the plan store and the suggestion audit log keep their tables in.

`SqlDatabase` is the dialect the stores are written against: one SQL text (with `?`
placeholders, and DDL with `{serial}`-style type words), run through `execute`, inside
`transaction()` (a write) or `snapshot()` (reads that see one state). Two databases fill it
in: `SqliteDatabase` here (a file, the embedded default) and `PostgresDatabase` in
engine.control.postgres_store (shared by replicas; psycopg is imported only for it).

`is_postgres_url` is the one test of which a store target names.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted

__all__ = ["SqlDatabase", "SqliteDatabase", "is_postgres_url", "open_database"]

SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 11, 13, 26  # sqlite3.h result codes
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another's transaction before failing
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: object) -> bool:
    """Whether a store target (a --store value, a config's store_path) names a PostgreSQL database;
    anything else is a SQLite file."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_database(target: str | os.PathLike[str]) -> SqlDatabase:
    """The database a store target names: a postgresql:// URL, else a SQLite file."""
    if is_postgres_url(target):
        from engine.control.postgres_store import PostgresDatabase
        return PostgresDatabase(str(target))
    return SqliteDatabase(target)


class SqlDatabase(ABC):
    """What the stores need of a database, and what differs between SQLite and PostgreSQL."""

    name: ClassVar[str]  # "sqlite" | "postgresql"
    placeholder: ClassVar[str]  # the DB-API parameter marker the SQL below is rewritten to
    # Column types as the DDL templates name them: an autoincrementing key, a column
    # referring to one, bytes, a double, and a boolean defaulting to false.
    types: ClassVar[dict[str, str]]
    label: str  # what messages call the database (never a password)

    def sql(self, text: str) -> str:
        """`text`, written with `?` placeholders, in this database's parameter style. A plain
        rewrite: the stores' SQL has no other `?` (nor a `%`, which psycopg would read as one);
        values always travel as parameters."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def execute(self, conn: Any, text: str, args: Sequence[Any] = ()) -> Any:
        return conn.execute(self.sql(text), args)

    def ddl(self, text: str) -> str:
        """A CREATE statement with this database's column types filled in."""
        return text.format(**self.types)

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction on a connection: committed when the block ends, rolled back if
        it raises; failures a client or an operator can act on mapped to domain errors."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Any]:
        """A connection whose reads in the block see one committed state."""

    @abstractmethod
    def lock_plans(self, conn: Any) -> tuple[float, Callable[[], None]]:
        """Inside a write transaction: serialise plan writers (every replica's), then return
        (the time to stamp what is written, changed()). changed() records that the active plan
        changes, for the database's followers (nothing in SQLite)."""

    def _lock_schema(self, conn: Any) -> None:
        """Serialise migrations between processes starting together (a no-op where the write
        transaction already does)."""

    def ensure_schema(self, component: str, migrations: Sequence[Sequence[str]]) -> None:
        """Bring `component`'s tables to version len(migrations): migrations[i] (a list of SQL
        statements) takes them from version i to i + 1. Recorded in the `schema_version` table,
        one row per component, so stores sharing the database evolve independently."""
        with self.transaction() as conn:
            self._lock_schema(conn)
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = self.execute(conn, "SELECT version FROM schema_version WHERE component = ?", (component,)).fetchone()
            current = row[0] if row else 0
            if current > len(migrations):
                raise FailedPrecondition(f"{self.label}: the {component} tables are at schema version {current}, "
                                         f"newer than this server's {len(migrations)}")
            for statements in migrations[current:]:
                for statement in statements:
                    conn.execute(statement)
            if current < len(migrations):
                self.execute(conn, "INSERT INTO schema_version (component, version) VALUES (?, ?) "
                             "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                             (component, len(migrations)))

    @abstractmethod
    def close(self) -> None:
        """Release the connections; the database is unusable afterwards."""


class SqliteDatabase(SqlDatabase):
    """One SQLite file shared by the stores that keep tables in it.

    Each thread gets its own connection (sqlite3 connections must not be shared across
    threads mid-transaction); a forked child opens fresh ones. Connections run in autocommit
    mode, and writes go through `transaction()`, which takes the write lock up front
    (BEGIN IMMEDIATE) so a read-then-write can never be overtaken by another writer: the
    plan writers need no lock of their own. The database runs in WAL mode with
    `synchronous=FULL`: a write that returned is on disk and survives a kill of the process
    (or of the machine).
    """

    name = "sqlite"
    placeholder = "?"
    types = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "ref": "INTEGER", "blob": "BLOB", "double": "REAL",
             "flag": "INTEGER NOT NULL DEFAULT 0"}

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        if str(path) == ":memory:":
            raise InvalidArgument("an in-memory database is per connection; give a file path", field="path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.label = str(self.path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def error(self, exc: sqlite3.Error) -> Exception:
        """The domain error for a SQLite failure that a client or an operator can act on, naming
        the file: a full disk is RESOURCE_EXHAUSTED, a damaged file DATA_LOSS; others unchanged."""
        text = str(exc)
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code of an extended one
        if code == SQLITE_FULL or "database or disk is full" in text:
            return ResourceExhausted(f"the plan store {self.path} is full ({text}): free disk space; "
                                     "nothing was written")
        if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
            return DataLoss(f"the plan store {self.path} is not a readable SQLite database ({text}); "
                            "restore it from a backup or move it away to start with an empty store")
        return exc

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and configured) on first use."""
        if self._closed:
            raise FailedPrecondition(f"the database {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            try:
                conn = self._open()
            except sqlite3.Error as exc:
                raise self.error(exc) from exc
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)  # close() may run on another thread
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        # Switching to WAL needs a moment of exclusive access, so it can meet another process
        # opening the file at the same time; it persists in the file once set.
        deadline = time.monotonic() + self.busy_timeout_s
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT leaves it open too
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            mapped = self.error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        conn.execute("BEGIN")  # deferred: a read transaction, one snapshot for its reads
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def lock_plans(self, conn: sqlite3.Connection) -> tuple[float, Callable[[], None]]:
        return time.time(), lambda: None  # BEGIN IMMEDIATE holds the file's write lock already

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
