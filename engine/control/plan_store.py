"""Durable plan versions: submit, get, activate, roll back, and the audit history.

`PlanStore` is the contract; `SqlPlanStore` keeps it in a SQL database through the dialect of
engine.control.database: `SqlitePlanStore` in a SQLite file (the embedded default), and
`PostgresPlanStore` (engine.control.postgres_store) in a PostgreSQL database that replicas
share. Every write is one transaction that first takes the plan writers' lock (SQLite's
`BEGIN IMMEDIATE`, PostgreSQL's `plan_head` row), so version numbers are assigned under it:
several threads and several processes can submit to the same plan id at once and get
versions 1, 2, 3, ... with no gap and no duplicate, and a compare-and-swap
(`submit_if_active`) cannot be overtaken between its check and its write.

Activation keeps a stack: `activate` pushes, `rollback()` undoes the current activation and
returns to the plan that was active before it (then to the one before that, and so on);
`rollback(id, version)` pushes a named version, so a later `rollback()` comes back from it.

The database is shared by sibling stores, such as the suggestion audit log, that keep their
tables in it: each registers its own schema component with `ensure_schema`.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

from google.protobuf.message import DecodeError

from engine.control.database import SqlDatabase, SqliteDatabase, is_postgres_url
from engine.control.plans import ExecutionPlan, plan_hash
from engine.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, shown

__all__ = ["PlanEvent", "PlanStore", "SqlPlanStore", "SqliteDatabase", "SqlitePlanStore", "open_plan_store",
           "stale"]

log = logging.getLogger(__name__)

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
    def submit_if_active(self, plan: ExecutionPlan, base_version: int,
                         actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        """Compare-and-swap: store `plan` as the next version of `plan.id` (as `submit` does)
        and activate it, only if the active plan is still `plan.id`@`base_version`; otherwise
        raise `stale(...)` (a FailedPrecondition whose `current_id` / `current_version` say
        what is active, "" / 0 for nothing) and write nothing. Of several callers racing on one
        base version, in any processes sharing the store, exactly one wins.
        Returns (now active, previously active)."""

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

    def watch_active(self, callback: Callable[[ExecutionPlan | None], None]) -> Any:
        """Follow the active plan as other writers change it: call `callback(active plan)` on a
        background thread after each change, until the returned handle's `stop()`. None: this
        store has no other writers (a SQLite file one server owns), so there is nothing to follow."""
        return None

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


# --------------------------------------------------------------------------- schema


def _migrations(db: SqlDatabase) -> list[list[str]]:
    """The plan tables in `db`'s words. Version 1 is the same in both databases but for column
    types and PostgreSQL's writers' lock row; version 2 (events of plans never stored) differs,
    as SQLite cannot drop a constraint and copies the table instead."""
    first = [db.ddl(sql) for sql in (
        """CREATE TABLE plans (
            id TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            hash TEXT NOT NULL,
            created_at {double} NOT NULL,
            actor TEXT NOT NULL,
            body {blob} NOT NULL,  -- the ExecutionPlan, serialized, version/hash/created_at set
            PRIMARY KEY (id, version))""",
        """CREATE TABLE plan_events (
            seq {serial},
            action TEXT NOT NULL CHECK (action IN ('submit', 'activate', 'rollback')),
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            hash TEXT NOT NULL,
            actor TEXT NOT NULL,
            at {double} NOT NULL,
            detail TEXT NOT NULL,
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
        "CREATE INDEX plan_events_by_plan ON plan_events (plan_id, seq)",
        # The active plan is the newest activation not undone by a rollback.
        """CREATE TABLE activations (
            seq {serial},
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            undone {flag},
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
    )]
    actions = ", ".join(f"'{a}'" for a in ACTIONS)
    if db.name == "postgresql":
        first += [  # one row: writers lock it first; `generation` counts changes of the active plan
            """CREATE TABLE plan_head (
                singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
                generation BIGINT NOT NULL)""",
            "INSERT INTO plan_head (generation) VALUES (0)",
        ]
        second = [  # "activation_failed" events, of plan versions that may never have been stored (version 0)
            "ALTER TABLE plan_events DROP CONSTRAINT plan_events_plan_id_version_fkey",
            "ALTER TABLE plan_events DROP CONSTRAINT plan_events_action_check",
            f"ALTER TABLE plan_events ADD CONSTRAINT plan_events_action_check CHECK (action IN ({actions}))",
        ]
    else:
        second = [  # the same, by copying the table
            f"""CREATE TABLE plan_events_2 (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                action TEXT NOT NULL CHECK (action IN ({actions})),
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
        ]
    return [first, second]


_ACTIVE_ROW = "SELECT seq, plan_id, version FROM activations WHERE NOT undone ORDER BY seq DESC LIMIT 1"
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


def read_version(db: SqlDatabase, conn, plan_id: str, version: int) -> ExecutionPlan:
    """One stored version (0: the newest); NotFound says which ids or versions exist."""
    if version:
        row = db.execute(conn, "SELECT body, hash, id, version FROM plans WHERE id = ? AND version = ?",
                         (plan_id, version)).fetchone()
    else:
        row = db.execute(conn, "SELECT body, hash, id, version FROM plans WHERE id = ? ORDER BY version DESC LIMIT 1",
                         (plan_id,)).fetchone()
    if row is not None:
        return parse_stored(*row)
    newest = db.execute(conn, "SELECT MAX(version) FROM plans WHERE id = ?", (plan_id,)).fetchone()[0]
    if newest is not None:
        raise NotFound(f"plan {shown(plan_id)} has no version {version} (versions 1..{newest})")
    ids = [r[0] for r in conn.execute("SELECT DISTINCT id FROM plans ORDER BY id LIMIT 11")]
    known = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "") if ids else "none"
    raise NotFound(f"no plan with id {shown(plan_id)} (stored plans: {known})")


def stale(plan_id: str, base_version: int, current: ExecutionPlan | None) -> FailedPrecondition:
    """The error of a lost compare-and-swap: `current_id` / `current_version` say what is
    active now ("" / 0 when nothing is), so the caller can re-read and retry."""
    exc = FailedPrecondition(f"stale: {plan_id}@{base_version} is no longer the active plan "
                             f"({label(current)} is); re-read it and retry")
    exc.current_id, exc.current_version = (current.id, current.version) if current else ("", 0)
    return exc


# --------------------------------------------------------------------------- the store


class SqlPlanStore(PlanStore):
    """PlanStore in a SQL database: the logic once, the database's differences in `db`."""

    SCHEMA_COMPONENT = "plans"

    def __init__(self, db: SqlDatabase, *, owns_db: bool = True):
        self.db = db
        self._owns_db = owns_db
        try:
            db.ensure_schema(self.SCHEMA_COMPONENT, _migrations(db))
        except BaseException:
            self.close()
            raise

    def _sql(self, conn: Any, text: str, args: Sequence[Any] = ()) -> Any:
        return self.db.execute(conn, text, args)

    # ----------------------------------------------------------------- reads

    def _get(self, conn: Any, plan_id: str, version: int) -> ExecutionPlan:
        return read_version(self.db, conn, plan_id, version)

    def get(self, plan_id: str, version: int = 0) -> ExecutionPlan:
        if version < 0:
            raise InvalidArgument(f"version {version} must be >= 0 (0 = newest)", field="version")
        with self.db.snapshot() as conn:
            return self._get(conn, plan_id, version)

    def list_latest(self) -> list[ExecutionPlan]:
        with self.db.snapshot() as conn:
            rows = conn.execute(
                "SELECT p.body, p.hash, p.id, p.version FROM plans p JOIN (SELECT id, MAX(version) AS v FROM plans "
                "GROUP BY id) n ON p.id = n.id AND p.version = n.v ORDER BY p.id").fetchall()
        return parse_rows(rows)

    def _active(self, conn: Any) -> tuple[int, ExecutionPlan] | None:
        row = conn.execute(_ACTIVE_ROW).fetchone()
        return None if row is None else (row[0], self._get(conn, row[1], row[2]))

    def active(self) -> ExecutionPlan | None:
        with self.db.snapshot() as conn:  # the activation row and the plan from the same snapshot
            current = self._active(conn)
        return current[1] if current else None

    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        query = "SELECT seq, action, plan_id, version, hash, actor, at, detail FROM plan_events"
        args: tuple = ()
        if plan_id:
            query, args = query + " WHERE plan_id = ?", (plan_id,)
        with self.db.snapshot() as conn:
            rows = self._sql(conn, query + " ORDER BY seq DESC LIMIT ?", (*args, max(0, limit))).fetchall()
        return [PlanEvent(*row) for row in rows]

    # ----------------------------------------------------------------- writes

    @contextmanager
    def _write(self) -> Iterator[tuple[Any, float, Callable[[], None]]]:
        """A write transaction holding the plan writers' lock: (connection, time, changed()).
        changed() records that the active plan changes (see SqlDatabase.lock_plans)."""
        with self.db.transaction() as conn:
            at, changed = self.db.lock_plans(conn)
            yield conn, at, changed

    def _event(self, conn: Any, at: float, action: str, plan: ExecutionPlan, actor: str, detail: str) -> None:
        self._sql(conn, "INSERT INTO plan_events (action, plan_id, version, hash, actor, at, detail) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (action, plan.id, plan.version, plan.hash or plan_hash(plan), actor, at, detail))

    def activation_failed(self, plan: ExecutionPlan, actor: str, detail: str) -> None:
        with self._write() as (conn, at, _changed):
            self._event(conn, at, "activation_failed", plan, actor, detail[:MAX_DETAIL])

    def _activate(self, conn: Any, at: float, changed: Callable[[], None], plan: ExecutionPlan,
                  actor: str) -> tuple[ExecutionPlan, ExecutionPlan | None]:
        current = self._active(conn)
        previous = current[1] if current else None
        if previous is not None and (previous.id, previous.version) == (plan.id, plan.version):
            return plan, previous
        self._sql(conn, "INSERT INTO activations (plan_id, version) VALUES (?, ?)", (plan.id, plan.version))
        self._event(conn, at, "activate", plan, actor, f"previous: {label(previous)}")
        changed()
        return plan, previous

    def _store(self, conn: Any, at: float, plan: ExecutionPlan, digest: str, actor: str) -> ExecutionPlan:
        """Insert `plan` as the next version of its id, or return the newest if it has the same hash."""
        newest = self._sql(conn, "SELECT version, hash, body FROM plans WHERE id = ? ORDER BY version DESC LIMIT 1",
                           (plan.id,)).fetchone()
        if newest is not None and newest[1] == digest:
            return parse_stored(newest[2], newest[1], plan.id, newest[0])
        stored = ExecutionPlan()
        stored.CopyFrom(plan)
        stored.version = newest[0] + 1 if newest else 1
        stored.hash = digest
        stored.created_at.FromNanoseconds(int(at * 1e9))
        self._sql(conn, "INSERT INTO plans (id, version, hash, created_at, actor, body) VALUES (?, ?, ?, ?, ?, ?)",
                  (stored.id, stored.version, digest, at, actor, stored.SerializeToString(deterministic=True)))
        self._event(conn, at, "submit", stored, actor, stored.description[:200])
        return stored

    def submit(self, plan: ExecutionPlan, actor: str = "", activate: bool = False) -> ExecutionPlan:
        if not plan.id:
            raise InvalidArgument("a plan needs an id to be stored", field="id")
        digest = plan_hash(plan)  # outside the lock: it is pure
        with self._write() as (conn, at, changed):
            stored = self._store(conn, at, plan, digest, actor)
            if activate:
                self._activate(conn, at, changed, stored, actor)
        return stored

    def submit_if_active(self, plan: ExecutionPlan, base_version: int,
                         actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        if not plan.id:
            raise InvalidArgument("a plan needs an id to be stored", field="id")
        if base_version < 1:
            raise InvalidArgument(f"base version {base_version} must be >= 1", field="base_version")
        digest = plan_hash(plan)
        with self._write() as (conn, at, changed):  # the check and the write under one lock
            current = self._active(conn)
            previous = current[1] if current else None
            if previous is None or (previous.id, previous.version) != (plan.id, base_version):
                raise stale(plan.id, base_version, previous)
            stored = self._store(conn, at, plan, digest, actor)
            self._activate(conn, at, changed, stored, actor)
        return stored, previous

    def activate(self, plan_id: str, version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan | None]:
        with self._write() as (conn, at, changed):
            return self._activate(conn, at, changed, self._get(conn, plan_id, version), actor)

    def _rollback_plan(self, conn: Any, plan_id: str, version: int) -> tuple[int, ExecutionPlan, ExecutionPlan, bool]:
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
        earlier = "SELECT plan_id, version FROM activations WHERE NOT undone AND seq < ?{} ORDER BY seq DESC LIMIT 1"
        before = self._sql(conn, earlier.format(""), (seq,)).fetchone()
        before_same = self._sql(conn, earlier.format(" AND plan_id = ?"), (seq, previous.id)).fetchone()
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
        with self.db.snapshot() as conn:  # one snapshot for the several reads
            return self._rollback_plan(conn, plan_id, version)[2]

    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        with self._write() as (conn, at, changed):
            seq, previous, target, undo = self._rollback_plan(conn, plan_id, version)
            if undo:  # pop the current activation off the stack
                self._sql(conn, "UPDATE activations SET undone = TRUE WHERE seq = ?", (seq,))
            # Unless the target is now on top of the stack, it goes on top (a named version is
            # pushed like an activation, so a later rollback() returns from it).
            top = conn.execute(_ACTIVE_ROW).fetchone()
            if top is None or (top[1], top[2]) != (target.id, target.version):
                self._sql(conn, "INSERT INTO activations (plan_id, version) VALUES (?, ?)", (target.id, target.version))
            self._event(conn, at, "rollback", target, actor, f"from {label(previous)}")
            changed()
        return target, previous

    def close(self) -> None:
        if self._owns_db:
            self.db.close()


class SqlitePlanStore(SqlPlanStore):
    """PlanStore in a SQLite file (created if missing), or in a shared SqliteDatabase."""

    def __init__(self, path: str | os.PathLike[str] | SqliteDatabase):
        owns = not isinstance(path, SqliteDatabase)
        super().__init__(SqliteDatabase(path) if owns else path, owns_db=owns)


def open_plan_store(target: str | os.PathLike[str]) -> SqlPlanStore:
    """The store a target names: a postgresql:// URL (shared by replicas), else a SQLite file."""
    if is_postgres_url(target):
        from engine.control.postgres_store import PostgresPlanStore
        return PostgresPlanStore(str(target))
    return SqlitePlanStore(target)
