"""Durable plan versions: submit, get, activate, roll back, and the audit history.

`PlanStore` is the contract; `SqlitePlanStore` the embedded default (a PostgreSQL store can
follow behind the same interface). Every write is one `BEGIN IMMEDIATE` transaction, so
version numbers are assigned under SQLite's write lock: several threads and several
processes can submit to the same plan id at once and get versions 1, 2, 3, ... with no gap
and no duplicate. The database runs in WAL mode with `synchronous=FULL`: a write that
returned is on disk and survives a kill of the process (or of the machine).

Activation keeps a stack: `activate` pushes, `rollback()` undoes the current activation and
returns to the plan that was active before it (then to the one before that, and so on);
`rollback(id, version)` pushes a named version, so a later `rollback()` comes back from it.

`SqliteDatabase` (the connection helper) is shared by sibling stores, such as the suggestion
audit log, that keep their tables in the same file: each registers its own schema component
with `ensure_schema`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from google.protobuf.message import DecodeError

from engine.control.plans import ExecutionPlan, plan_hash
from engine.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown

__all__ = ["PlanEvent", "PlanStore", "SqliteDatabase", "SqlitePlanStore"]

log = logging.getLogger(__name__)

SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 11, 13, 26  # sqlite3.h result codes
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another's transaction before failing
ACTIONS = ("submit", "activate", "rollback", "activation_failed")


@dataclass(frozen=True)
class PlanEvent:
    """One entry of the audit history. `at` is unix time in seconds."""

    seq: int
    action: str  # "submit" | "activate" | "rollback" | "activation_failed" (version 0: never stored)
    plan_id: str
    version: int
    hash: str
    actor: str
    at: float
    detail: str


class PlanStore(ABC):
    """Versioned, durable plans and which one is active. All methods are thread-safe."""

    @abstractmethod
    def submit(self, plan: ExecutionPlan, actor: str = "", activate: bool = False) -> ExecutionPlan:
        """Store `plan` as the next version of `plan.id`, with version, hash and created_at set.

        If the newest version of that id has the same content hash, it is returned instead of a
        new version (a retried submit is harmless; the new description is then not kept).
        `activate=True` also activates the result, in the same transaction.
        """

    @abstractmethod
    def get(self, plan_id: str, version: int = 0) -> ExecutionPlan:
        """A stored version (0 = the newest); NotFound if there is none."""

    @abstractmethod
    def list_latest(self) -> list[ExecutionPlan]:
        """The newest version of every plan id, ordered by id."""

    @abstractmethod
    def active(self) -> ExecutionPlan | None:
        """The plan requests run with, or None before the first activation."""

    @abstractmethod
    def activate(self, plan_id: str, version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan | None]:
        """Make a stored version (0 = newest) active; returns (active, previously active or None).
        Activating the plan that is already active records nothing."""

    @abstractmethod
    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        """Undo the current activation; returns (now active, previously active).

        version 0: undo the current activation, back to the plan active before it; repeated,
        it walks further back. With `plan_id` (which must be the active plan's id): back to
        the last earlier activation of that id. A version: activate that stored version of
        `plan_id` (default: the active plan's id), recorded as a rollback; a later rollback()
        returns from it, unless it is the plan rollback() would pick, which makes it exactly
        rollback(). FailedPrecondition when nothing is active, when there is nothing
        earlier to return to, or when the named version is already active.
        """

    @abstractmethod
    def rollback_target(self, plan_id: str = "", version: int = 0) -> ExecutionPlan:
        """What `rollback(plan_id, version)` would activate, changing nothing; raises what it
        would raise. `rollback(target.id, target.version)` then does the same as the preview."""

    @abstractmethod
    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        """Audit events, newest first; only those of `plan_id` when given."""

    @abstractmethod
    def activation_failed(self, plan: ExecutionPlan, actor: str, detail: str) -> None:
        """Record that `plan` could not be activated (its model did not load) and nothing changed:
        an "activation_failed" event, with version 0 when the plan was never stored."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- sqlite helper


class SqliteDatabase:
    """One SQLite file shared by the stores that keep tables in it.

    Each thread gets its own connection (sqlite3 connections must not be shared across
    threads mid-transaction); a forked child opens fresh ones. Connections run in autocommit
    mode, and writes go through `transaction()`, which takes the write lock up front
    (BEGIN IMMEDIATE) so a read-then-write can never be overtaken by another writer.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        if str(path) == ":memory:":
            raise InvalidArgument("an in-memory database is per connection; give a file path", field="path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        """A write transaction: committed when the block ends, rolled back if it raises."""
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

    def ensure_schema(self, component: str, migrations: Sequence[Sequence[str]]) -> None:
        """Bring `component`'s tables to version len(migrations): migrations[i] (a list of SQL
        statements) takes them from version i to i + 1. Recorded in the `schema_version` table,
        one row per component, so stores sharing the file evolve independently."""
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version WHERE component = ?", (component,)).fetchone()
            current = row[0] if row else 0
            if current > len(migrations):
                raise FailedPrecondition(f"{self.path}: the {component} tables are at schema version {current}, "
                                         f"newer than this server's {len(migrations)}")
            for statements in migrations[current:]:
                for sql in statements:
                    conn.execute(sql)
            if current < len(migrations):
                conn.execute("INSERT INTO schema_version (component, version) VALUES (?, ?) "
                             "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                             (component, len(migrations)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


# --------------------------------------------------------------------------- sqlite plan store


_MIGRATIONS: list[list[str]] = [
    [  # 1: plans, their audit events, the activation stack
        """CREATE TABLE plans (
            id TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            actor TEXT NOT NULL,
            body BLOB NOT NULL,  -- the ExecutionPlan, serialized, version/hash/created_at set
            PRIMARY KEY (id, version))""",
        """CREATE TABLE plan_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            action TEXT NOT NULL CHECK (action IN ('submit', 'activate', 'rollback')),
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            hash TEXT NOT NULL,
            actor TEXT NOT NULL,
            at REAL NOT NULL,
            detail TEXT NOT NULL,
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
        "CREATE INDEX plan_events_by_plan ON plan_events (plan_id, seq)",
        # The active plan is the newest activation not undone by a rollback.
        """CREATE TABLE activations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            undone INTEGER NOT NULL DEFAULT 0,
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
    ],
]

_MIGRATIONS.append([  # 2: "activation_failed" events, of plan versions that may never have been stored
    """CREATE TABLE plan_events_2 (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL CHECK (action IN ('submit', 'activate', 'rollback', 'activation_failed')),
        plan_id TEXT NOT NULL,
        version INTEGER NOT NULL,  -- 0: a plan that failed before it was stored
        hash TEXT NOT NULL,
        actor TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT NOT NULL)""",
    "INSERT INTO plan_events_2 SELECT seq, action, plan_id, version, hash, actor, at, detail FROM plan_events",
    "DROP TABLE plan_events",
    "ALTER TABLE plan_events_2 RENAME TO plan_events",
    "CREATE INDEX plan_events_by_plan ON plan_events (plan_id, seq)",
])

_ACTIVE_ROW = "SELECT seq, plan_id, version FROM activations WHERE undone = 0 ORDER BY seq DESC LIMIT 1"
MAX_DETAIL = 1000  # characters of an event's detail (a description, an error)


def label(plan: ExecutionPlan | None) -> str:
    return f"{plan.id}@{plan.version}" if plan is not None else "none"


def parse_stored(body: bytes, stored_hash: str, plan_id: str, version: int) -> ExecutionPlan:
    """A stored plan, its hash re-verified: a damaged row is reported (DATA_LOSS naming it), never served."""
    # only a damaged database or a foreign writer can fail here
    try:
        plan = ExecutionPlan.FromString(bytes(body))
    except DecodeError as exc:
        raise DataLoss(f"stored plan {shown(plan_id)[1:-1]}@{version} is corrupt: its body does not parse "
                       f"({exc})") from None
    if plan.hash != stored_hash or plan_hash(plan) != stored_hash or (plan.id, plan.version) != (plan_id, version):
        raise DataLoss(f"stored plan {shown(plan_id)[1:-1]}@{version} is corrupt: its content does not match "
                       f"hash {shown(stored_hash)}")
    return plan


def parse_rows(rows: Sequence[tuple]) -> list[ExecutionPlan]:
    """(body, hash, id, version) rows as plans, skipping (and logging) corrupt ones, so one damaged
    row does not hide the others from a listing."""
    plans = []
    for row in rows:
        try:
            plans.append(parse_stored(*row))
        except DataLoss as exc:
            log.error("plan store: %s; left out of the listing", exc)
    return plans


def read_version(conn, plan_id: str, version: int, placeholder: str = "?") -> ExecutionPlan:
    """One stored version (0: the newest) through a DB-API connection (sqlite3 or psycopg, whose
    SQL here differs only in the parameter placeholder); NotFound says which ids or versions exist."""
    p = placeholder
    if version:
        row = conn.execute(f"SELECT body, hash, id, version FROM plans WHERE id = {p} AND version = {p}",
                           (plan_id, version)).fetchone()
    else:
        row = conn.execute(f"SELECT body, hash, id, version FROM plans WHERE id = {p} ORDER BY version DESC LIMIT 1",
                           (plan_id,)).fetchone()
    if row is not None:
        return parse_stored(*row)
    newest = conn.execute(f"SELECT MAX(version) FROM plans WHERE id = {p}", (plan_id,)).fetchone()[0]
    if newest is not None:
        raise NotFound(f"plan {shown(plan_id)} has no version {version} (versions 1..{newest})")
    ids = [r[0] for r in conn.execute("SELECT DISTINCT id FROM plans ORDER BY id LIMIT 11")]
    known = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "") if ids else "none"
    raise NotFound(f"no plan with id {shown(plan_id)} (stored plans: {known})")


class SqlitePlanStore(PlanStore):
    """PlanStore in a SQLite file (created if missing), or in a shared SqliteDatabase."""

    SCHEMA_COMPONENT = "plans"

    def __init__(self, path: str | os.PathLike[str] | SqliteDatabase):
        self._owns_db = not isinstance(path, SqliteDatabase)
        self.db = SqliteDatabase(path) if self._owns_db else path
        self.db.ensure_schema(self.SCHEMA_COMPONENT, _MIGRATIONS)

    # ----------------------------------------------------------------- reads

    _parse = staticmethod(parse_stored)

    def _get(self, conn: sqlite3.Connection, plan_id: str, version: int) -> ExecutionPlan:
        return read_version(conn, plan_id, version)

    def get(self, plan_id: str, version: int = 0) -> ExecutionPlan:
        if version < 0:
            raise InvalidArgument(f"version {version} must be >= 0 (0 = newest)", field="version")
        return self._get(self.db.connection(), plan_id, version)

    def list_latest(self) -> list[ExecutionPlan]:
        rows = self.db.connection().execute(
            "SELECT p.body, p.hash, p.id, p.version FROM plans p JOIN (SELECT id, MAX(version) AS v FROM plans "
            "GROUP BY id) n ON p.id = n.id AND p.version = n.v ORDER BY p.id").fetchall()
        return parse_rows(rows)

    def _active(self, conn: sqlite3.Connection) -> tuple[int, ExecutionPlan] | None:
        row = conn.execute(_ACTIVE_ROW).fetchone()
        return None if row is None else (row[0], self._get(conn, row[1], row[2]))

    def active(self) -> ExecutionPlan | None:
        conn = self.db.connection()
        # one read transaction: the activation row and the plan from the same snapshot
        conn.execute("BEGIN")
        try:
            current = self._active(conn)
        finally:
            conn.execute("COMMIT")
        return current[1] if current else None

    def activation_failed(self, plan: ExecutionPlan, actor: str, detail: str) -> None:
        with self.db.transaction() as conn:
            self._event(conn, "activation_failed", plan, actor, detail[:MAX_DETAIL])

    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        sql = "SELECT seq, action, plan_id, version, hash, actor, at, detail FROM plan_events"
        args: tuple = ()
        if plan_id:
            sql, args = sql + " WHERE plan_id = ?", (plan_id,)
        rows = self.db.connection().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, max(0, limit)))
        return [PlanEvent(*row) for row in rows]

    # ----------------------------------------------------------------- writes

    @staticmethod
    def _event(conn: sqlite3.Connection, action: str, plan: ExecutionPlan, actor: str, detail: str) -> None:
        conn.execute("INSERT INTO plan_events (action, plan_id, version, hash, actor, at, detail) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (action, plan.id, plan.version, plan.hash or plan_hash(plan), actor, time.time(), detail))

    def _activate(self, conn: sqlite3.Connection, plan: ExecutionPlan,
                  actor: str) -> tuple[ExecutionPlan, ExecutionPlan | None]:
        current = self._active(conn)
        previous = current[1] if current else None
        if previous is not None and (previous.id, previous.version) == (plan.id, plan.version):
            return plan, previous
        conn.execute("INSERT INTO activations (plan_id, version) VALUES (?, ?)", (plan.id, plan.version))
        self._event(conn, "activate", plan, actor, f"previous: {label(previous)}")
        return plan, previous

    def submit(self, plan: ExecutionPlan, actor: str = "", activate: bool = False) -> ExecutionPlan:
        if not plan.id:
            raise InvalidArgument("a plan needs an id to be stored", field="id")
        digest = plan_hash(plan)  # outside the write lock: it is pure
        with self.db.transaction() as conn:
            newest = conn.execute("SELECT version, hash, body FROM plans WHERE id = ? ORDER BY version DESC LIMIT 1",
                                  (plan.id,)).fetchone()
            if newest is not None and newest[1] == digest:
                stored = self._parse(newest[2], newest[1], plan.id, newest[0])
            else:
                stored = ExecutionPlan()
                stored.CopyFrom(plan)
                stored.version = newest[0] + 1 if newest else 1
                stored.hash = digest
                now_ns = time.time_ns()
                stored.created_at.FromNanoseconds(now_ns)
                conn.execute("INSERT INTO plans (id, version, hash, created_at, actor, body) VALUES (?, ?, ?, ?, ?, ?)",
                             (stored.id, stored.version, digest, now_ns / 1e9, actor,
                              stored.SerializeToString(deterministic=True)))
                self._event(conn, "submit", stored, actor, stored.description[:200])
            if activate:
                self._activate(conn, stored, actor)
        return stored

    def activate(self, plan_id: str, version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan | None]:
        with self.db.transaction() as conn:
            return self._activate(conn, self._get(conn, plan_id, version), actor)

    def _rollback_plan(self, conn: sqlite3.Connection, plan_id: str,
                       version: int) -> tuple[int, ExecutionPlan, ExecutionPlan, bool]:
        """(current activation seq, current plan, target, whether it is an undo) of a rollback."""
        if version < 0:
            raise InvalidArgument(f"version {version} must be >= 0 (0 = the previously active one)", field="version")
        current = self._active(conn)
        if current is None:
            raise FailedPrecondition("no plan is active, so there is nothing to roll back")
        seq, previous = current
        if plan_id and not version and plan_id != previous.id:
            raise FailedPrecondition(f"plan {shown(plan_id)} is not the active plan ({label(previous)})")
        # The activation before the current one, and the one before it of the same plan id.
        earlier = "SELECT plan_id, version FROM activations WHERE undone = 0 AND seq < ?{} ORDER BY seq DESC LIMIT 1"
        before = conn.execute(earlier.format(""), (seq,)).fetchone()
        before_same = conn.execute(earlier.format(" AND plan_id = ?"), (seq, previous.id)).fetchone()
        if not version:
            row = before_same if plan_id else before
            if row is None:
                raise FailedPrecondition(f"{label(previous)} has no earlier activation"
                                         f"{' of ' + repr(plan_id) if plan_id else ''} to roll back to")
            return seq, previous, self._get(conn, *row), True
        target = self._get(conn, plan_id or previous.id, version)
        if (target.id, target.version) == (previous.id, previous.version):
            raise FailedPrecondition(f"{label(target)} is already the active plan")
        # Naming the plan that rollback() or rollback(id) would pick is the same as calling it.
        undo = (target.id, target.version) in {tuple(r) for r in (before, before_same) if r is not None}
        return seq, previous, target, undo

    def rollback_target(self, plan_id: str = "", version: int = 0) -> ExecutionPlan:
        """The plan `rollback(plan_id, version)` would make active, changing nothing: lets a
        caller load it first. Raises what rollback would raise."""
        conn = self.db.connection()
        conn.execute("BEGIN")  # one snapshot for the several reads
        try:
            return self._rollback_plan(conn, plan_id, version)[2]
        finally:
            conn.execute("COMMIT")

    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        with self.db.transaction() as conn:
            seq, previous, target, undo = self._rollback_plan(conn, plan_id, version)
            if undo:  # pop the current activation off the stack
                conn.execute("UPDATE activations SET undone = 1 WHERE seq = ?", (seq,))
            # Unless the target is now on top of the stack, it goes on top (a named version is
            # pushed like an activation, so a later rollback() returns from it).
            top = conn.execute(_ACTIVE_ROW).fetchone()
            if top is None or (top[1], top[2]) != (target.id, target.version):
                conn.execute("INSERT INTO activations (plan_id, version) VALUES (?, ?)", (target.id, target.version))
            self._event(conn, "rollback", target, actor, f"from {label(previous)}")
        return target, previous

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    def submit_if_active(self, plan: ExecutionPlan, base_version: int,
                         actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        """Compare-and-swap: store `plan` as the next version of `plan.id` and activate it, only
        if the active plan is still `plan.id`@`base_version`; otherwise raise FailedPrecondition
        (a stale base; its `current_id` / `current_version` say what is active, "" / 0 for
        nothing) and write nothing. Of several callers racing on one base version, exactly one
        wins. Returns (now active, previously active). PostgresPlanStore has the same method."""
        if not plan.id:
            raise InvalidArgument("a plan needs an id to be stored", field="id")
        if base_version < 1:
            raise InvalidArgument(f"base version {base_version} must be >= 1", field="base_version")
        digest = plan_hash(plan)
        with self.db.transaction() as conn:  # the check and the write under one write lock
            current = self._active(conn)
            previous = current[1] if current else None
            if previous is None or (previous.id, previous.version) != (plan.id, base_version):
                exc = FailedPrecondition(f"stale: {plan.id}@{base_version} is no longer the active plan "
                                         f"({label(previous)} is); re-read it and retry")
                exc.current_id, exc.current_version = (previous.id, previous.version) if previous else ("", 0)
                raise exc
            # as in submit(): the newest version again if the content is unchanged, else a new one
            newest = conn.execute("SELECT version, hash, body FROM plans WHERE id = ? ORDER BY version DESC LIMIT 1",
                                  (plan.id,)).fetchone()
            if newest is not None and newest[1] == digest:
                stored = self._parse(newest[2], newest[1], plan.id, newest[0])
            else:
                stored = ExecutionPlan()
                stored.CopyFrom(plan)
                stored.version = newest[0] + 1 if newest else 1
                stored.hash = digest
                now_ns = time.time_ns()
                stored.created_at.FromNanoseconds(now_ns)
                conn.execute("INSERT INTO plans (id, version, hash, created_at, actor, body) VALUES (?, ?, ?, ?, ?, ?)",
                             (stored.id, stored.version, digest, now_ns / 1e9, actor,
                              stored.SerializeToString(deterministic=True)))
                self._event(conn, "submit", stored, actor, stored.description[:200])
            self._activate(conn, stored, actor)
        return stored, previous
