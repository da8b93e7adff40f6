"""Plan store and suggestion audit log in PostgreSQL: one fleet-wide truth about which plan is active.

`PostgresPlanStore(dsn)` keeps the same contract as `SqlitePlanStore` (versions, idempotent
resubmit, the activation stack, rollback, audit history) in a database that several server
replicas share; SQLite stays the embedded default. The tables mirror SQLite's; `plan_head`
adds one row that serialises the writers and counts activation changes.

Writers: every write transaction starts with `SELECT ... FROM plan_head FOR UPDATE`, so plan
writes are serial across all replicas, exactly as under SQLite's `BEGIN IMMEDIATE`. Versions
are then contiguous per id, event and activation sequence numbers follow commit order, and a
compare-and-swap (`submit_if_active`) cannot be overtaken between its check and its write.
One store-wide lock rather than one per plan id: the activation stack is global, and plan
writes come from operators and agents, a handful a minute, never from requests.

Readers in other replicas learn of a change by LISTEN/NOTIFY with a polling fallback
(`watch_active`). A change of the active plan bumps `plan_head.generation` and sends
`NOTIFY plan_engine_active` in the same transaction; PostgreSQL delivers it at commit, so a
listening replica hears within milliseconds. A notification is lost while the listening
connection is down (and LISTEN does not pass through a transaction-mode pooler such as
PgBouncer), so the watcher also re-reads the generation every `poll_interval_s` and after
every reconnect. The bound a replica follows a change within is therefore
`poll_interval_s` (default 2 s) plus the time to apply the plan (0 for a policy or limits
change, a model load for a reload); with LISTEN working it is milliseconds plus the apply.

Connections come from a small pool (psycopg_pool); an unreachable database is `Unavailable`,
never a hang: connecting and waiting for a pooled connection are bounded by `timeout_s`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from engine.control.plan_store import (
    ACTIONS,
    MAX_DETAIL,
    PlanEvent,
    PlanStore,
    label,
    parse_rows,
    parse_stored,
    read_version,
)
from engine.control.plans import ExecutionPlan, plan_hash
from engine.control.suggestions import _SELECT as _SUGGESTION_SELECT  # plain SQL, the same in both databases
from engine.control.suggestions import (
    DECISIONS,
    Suggestion,
    SuggestionLog,
    SuggestionRecord,
    Verdict,
    _record,
    patch_json,
)
from engine.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    shown,
)

__all__ = ["ActiveWatch", "PostgresDatabase", "PostgresPlanStore", "PostgresSuggestionLog", "is_postgres_url",
           "stale"]

log = logging.getLogger(__name__)

CHANNEL = "plan_engine_active"  # NOTIFY channel; the payload is the new generation
POLL_INTERVAL_S = 2.0
TIMEOUT_S = 10.0
SCHEMA_LOCK = 0x706C616E656E67  # advisory lock key serialising migrations across replicas ("planeng")


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def stale(plan_id: str, base_version: int, current: ExecutionPlan | None) -> FailedPrecondition:
    """The error of a lost compare-and-swap: `current_id` / `current_version` say what is
    active now ("" / 0 when nothing is), so the caller can re-read and retry."""
    exc = FailedPrecondition(f"stale: {plan_id}@{base_version} is no longer the active plan "
                             f"({label(current)} is); re-read it and retry")
    exc.current_id, exc.current_version = (current.id, current.version) if current else ("", 0)
    return exc


# --------------------------------------------------------------------------- connections


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database, shared by the stores that keep tables
    in it (the plan store; the suggestion audit log can register its own schema component).

    `transaction()` lends a connection inside a transaction, committed when the block ends and
    rolled back if it raises. Every psycopg connection or pool failure surfaces as Unavailable.
    """

    def __init__(self, dsn: str, *, max_connections: int = 4, timeout_s: float = TIMEOUT_S):
        try:
            params = pg_conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise InvalidArgument(f"not a PostgreSQL connection string: {exc}", field="store") from None
        # what messages show: never the password
        self.label = "postgresql://{}@{}:{}/{}".format(params.get("user", ""), params.get("host", ""),
                                                       params.get("port", 5432), params.get("dbname", ""))
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._connect_args = {"connect_timeout": max(1, int(timeout_s)), "application_name": "plan-engine"}
        self._pool = ConnectionPool(dsn, min_size=1, max_size=max_connections, kwargs=self._connect_args,
                                    check=ConnectionPool.check_connection, timeout=timeout_s,
                                    reconnect_timeout=0, name="plan-store", open=False)
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout:
            self._pool.close()
            raise Unavailable(f"cannot connect to the plan database {self.label} within {timeout_s:g} s") from None

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[psycopg.Connection]:
        """A transaction on a pooled connection. `read_only`: one REPEATABLE READ snapshot for
        several reads."""
        try:
            with self._pool.connection() as conn:
                if read_only:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"the plan database {self.label} is unreachable: {str(exc).strip()}") from exc
        except psycopg.errors.ReadOnlySqlTransaction as exc:  # a standby after a failover
            raise Unavailable(f"the plan database {self.label} is read-only (a standby?)") from exc
        except (psycopg.errors.DiskFull, psycopg.errors.OutOfMemory) as exc:
            raise ResourceExhausted(f"the plan database {self.label} is full ({str(exc).strip()}); "
                                    "nothing was written") from exc
        except (psycopg.errors.DataCorrupted, psycopg.errors.IndexCorrupted) as exc:
            raise DataLoss(f"the plan database {self.label} reports corrupt data: {str(exc).strip()}") from exc

    def connect(self, listen: str = "") -> psycopg.Connection:
        """A dedicated autocommit connection outside the pool (the caller closes it), LISTENing
        on the channel `listen` if given."""
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, **self._connect_args)
            if listen:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(listen)))
            return conn
        except psycopg.OperationalError as exc:
            raise Unavailable(f"the plan database {self.label} is unreachable: {str(exc).strip()}") from exc

    def ensure_schema(self, component: str, migrations: Sequence[Sequence[str]]) -> None:
        """Bring `component`'s tables to version len(migrations), as `SqliteDatabase.ensure_schema`
        does; an advisory lock makes replicas starting together migrate one at a time."""
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version WHERE component = %s", (component,)).fetchone()
            current = row[0] if row else 0
            if current > len(migrations):
                raise FailedPrecondition(f"{self.label}: the {component} tables are at schema version {current}, "
                                         f"newer than this server's {len(migrations)}")
            for statements in migrations[current:]:
                for statement in statements:
                    conn.execute(statement)
            if current < len(migrations):
                conn.execute("INSERT INTO schema_version (component, version) VALUES (%s, %s) "
                             "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                             (component, len(migrations)))

    def close(self) -> None:
        self._pool.close()


# --------------------------------------------------------------------------- plan store


_MIGRATIONS: list[list[str]] = [
    [  # 1: the SQLite store's tables, plus the writers' lock row
        """CREATE TABLE plans (
            id TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            body BYTEA NOT NULL,  -- the ExecutionPlan, serialized, version/hash/created_at set
            PRIMARY KEY (id, version))""",
        """CREATE TABLE plan_events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            action TEXT NOT NULL CHECK (action IN ('submit', 'activate', 'rollback')),
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            hash TEXT NOT NULL,
            actor TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            detail TEXT NOT NULL,
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
        "CREATE INDEX plan_events_by_plan ON plan_events (plan_id, seq)",
        # The active plan is the newest activation not undone by a rollback.
        """CREATE TABLE activations (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            plan_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            undone BOOLEAN NOT NULL DEFAULT FALSE,
            FOREIGN KEY (plan_id, version) REFERENCES plans (id, version))""",
        # One row: writers lock it first; `generation` counts changes of the active plan.
        """CREATE TABLE plan_head (
            singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
            generation BIGINT NOT NULL)""",
        "INSERT INTO plan_head (generation) VALUES (0)",
    ],
    [  # 2: "activation_failed" events, of plan versions that may never have been stored (version 0)
        "ALTER TABLE plan_events DROP CONSTRAINT plan_events_plan_id_version_fkey",
        "ALTER TABLE plan_events DROP CONSTRAINT plan_events_action_check",
        f"""ALTER TABLE plan_events ADD CONSTRAINT plan_events_action_check
            CHECK (action IN ({", ".join(f"'{a}'" for a in ACTIONS)}))""",
    ],
]

_ACTIVE_ROW = "SELECT seq, plan_id, version FROM activations WHERE NOT undone ORDER BY seq DESC LIMIT 1"
# The generation and the active plan in one statement, so one snapshot even in autocommit.
_SNAPSHOT = f"""SELECT h.generation, p.body, p.hash, p.id, p.version FROM plan_head h
    LEFT JOIN LATERAL ({_ACTIVE_ROW}) a ON TRUE
    LEFT JOIN plans p ON p.id = a.plan_id AND p.version = a.version"""
# Taken first by every write; the database's clock (after the lock) stamps what it writes,
# so replicas with skewed clocks still record times in commit order.
_LOCK = "SELECT generation, extract(epoch FROM clock_timestamp())::float8 FROM plan_head FOR UPDATE"


class PostgresPlanStore(PlanStore):
    """PlanStore in a PostgreSQL database shared by replicas (tables created if missing)."""

    SCHEMA_COMPONENT = "plans"

    def __init__(self, dsn: str | PostgresDatabase, *, poll_interval_s: float = POLL_INTERVAL_S):
        self._owns_db = not isinstance(dsn, PostgresDatabase)
        self.db = PostgresDatabase(dsn) if self._owns_db else dsn
        self.poll_interval_s = poll_interval_s
        self._watches: list[ActiveWatch] = []
        try:
            self.db.ensure_schema(self.SCHEMA_COMPONENT, _MIGRATIONS)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- reads

    _parse = staticmethod(parse_stored)

    def _get(self, conn: psycopg.Connection, plan_id: str, version: int) -> ExecutionPlan:
        return read_version(conn, plan_id, version, placeholder="%s")

    def get(self, plan_id: str, version: int = 0) -> ExecutionPlan:
        if version < 0:
            raise InvalidArgument(f"version {version} must be >= 0 (0 = newest)", field="version")
        with self.db.transaction(read_only=True) as conn:
            return self._get(conn, plan_id, version)

    def list_latest(self) -> list[ExecutionPlan]:
        with self.db.transaction(read_only=True) as conn:
            rows = conn.execute("SELECT DISTINCT ON (id) body, hash, id, version FROM plans "
                                "ORDER BY id, version DESC").fetchall()
        return parse_rows(rows)

    def _active(self, conn: psycopg.Connection) -> tuple[int, ExecutionPlan] | None:
        row = conn.execute(_ACTIVE_ROW).fetchone()
        return None if row is None else (row[0], self._get(conn, row[1], row[2]))

    def active(self) -> ExecutionPlan | None:
        return self.poll_active()[1]

    def poll_active(self, conn: psycopg.Connection | None = None) -> tuple[int, ExecutionPlan | None]:
        """(generation, active plan) from one snapshot. The generation grows by one with every
        change of the active plan, in any replica: comparing it is how a poller sees a change.
        `conn`: a connection of the caller's (the watcher's own), else a pooled one."""
        if conn is None:
            with self.db.transaction(read_only=True) as pooled:
                return self.poll_active(pooled)
        generation, body, stored_hash, plan_id, version = conn.execute(_SNAPSHOT).fetchone()
        return generation, self._parse(body, stored_hash, plan_id, version) if body is not None else None

    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        query = "SELECT seq, action, plan_id, version, hash, actor, at, detail FROM plan_events"
        args: tuple = ()
        if plan_id:
            query, args = query + " WHERE plan_id = %s", (plan_id,)
        with self.db.transaction(read_only=True) as conn:
            rows = conn.execute(query + " ORDER BY seq DESC LIMIT %s", (*args, max(0, limit))).fetchall()
        return [PlanEvent(*row) for row in rows]

    # ----------------------------------------------------------------- writes

    @contextmanager
    def _write(self) -> Iterator[tuple[psycopg.Connection, float, Callable[[], None]]]:
        """A write transaction holding the store lock: (connection, database time, changed()).
        Calling changed() records that the active plan changes: the generation is bumped and
        the replicas are notified when (and only if) the transaction commits."""
        with self.db.transaction() as conn:
            generation, now = conn.execute(_LOCK).fetchone()
            bumped = False

            def changed() -> None:
                nonlocal bumped
                if not bumped:
                    bumped = True
                    conn.execute("UPDATE plan_head SET generation = %s", (generation + 1,))
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation + 1)))
            yield conn, now, changed

    @staticmethod
    def _event(conn: psycopg.Connection, at: float, action: str, plan: ExecutionPlan, actor: str,
               detail: str) -> None:
        conn.execute("INSERT INTO plan_events (action, plan_id, version, hash, actor, at, detail) "
                     "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                     (action, plan.id, plan.version, plan.hash or plan_hash(plan), actor, at, detail))

    def activation_failed(self, plan: ExecutionPlan, actor: str, detail: str) -> None:
        with self._write() as (conn, at, _changed):
            self._event(conn, at, "activation_failed", plan, actor, detail[:MAX_DETAIL])

    def _activate(self, conn: psycopg.Connection, at: float, changed: Callable[[], None], plan: ExecutionPlan,
                  actor: str) -> tuple[ExecutionPlan, ExecutionPlan | None]:
        current = self._active(conn)
        previous = current[1] if current else None
        if previous is not None and (previous.id, previous.version) == (plan.id, plan.version):
            return plan, previous
        conn.execute("INSERT INTO activations (plan_id, version) VALUES (%s, %s)", (plan.id, plan.version))
        self._event(conn, at, "activate", plan, actor, f"previous: {label(previous)}")
        changed()
        return plan, previous

    def _store(self, conn: psycopg.Connection, at: float, plan: ExecutionPlan, digest: str,
               actor: str) -> ExecutionPlan:
        """Insert `plan` as the next version of its id, or return the newest if it has the same hash."""
        newest = conn.execute("SELECT version, hash, body FROM plans WHERE id = %s ORDER BY version DESC LIMIT 1",
                              (plan.id,)).fetchone()
        if newest is not None and newest[1] == digest:
            return self._parse(newest[2], newest[1], plan.id, newest[0])
        stored = ExecutionPlan()
        stored.CopyFrom(plan)
        stored.version = newest[0] + 1 if newest else 1
        stored.hash = digest
        stored.created_at.FromNanoseconds(int(at * 1e9))
        conn.execute("INSERT INTO plans (id, version, hash, created_at, actor, body) VALUES (%s, %s, %s, %s, %s, %s)",
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
        """Compare-and-swap: store `plan` as the next version of `plan.id` and activate it, only
        if the active plan is still `plan.id`@`base_version`; otherwise raise `stale(...)` (a
        FailedPrecondition carrying `current_id` / `current_version`) and write nothing. Of
        several callers racing on one base version, in any replicas, exactly one wins.
        Returns (now active, previously active)."""
        if not plan.id:
            raise InvalidArgument("a plan needs an id to be stored", field="id")
        if base_version < 1:
            raise InvalidArgument(f"base version {base_version} must be >= 1", field="base_version")
        digest = plan_hash(plan)
        with self._write() as (conn, at, changed):
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

    def _rollback_plan(self, conn: psycopg.Connection, plan_id: str,
                       version: int) -> tuple[int, ExecutionPlan, ExecutionPlan, bool]:
        """(current activation seq, current plan, target, whether it is an undo) of a rollback;
        the same rules as SqlitePlanStore's."""
        if version < 0:
            raise InvalidArgument(f"version {version} must be >= 0 (0 = the previously active one)", field="version")
        current = self._active(conn)
        if current is None:
            raise FailedPrecondition("no plan is active, so there is nothing to roll back")
        seq, previous = current
        if plan_id and not version and plan_id != previous.id:
            raise FailedPrecondition(f"plan {shown(plan_id)} is not the active plan ({label(previous)})")
        # The activation before the current one, and the one before it of the same plan id.
        earlier = ("SELECT plan_id, version FROM activations WHERE NOT undone AND seq < %s{} "
                   "ORDER BY seq DESC LIMIT 1")
        before = conn.execute(earlier.format(""), (seq,)).fetchone()
        before_same = conn.execute(earlier.format(" AND plan_id = %s"), (seq, previous.id)).fetchone()
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
        with self.db.transaction(read_only=True) as conn:
            return self._rollback_plan(conn, plan_id, version)[2]

    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]:
        with self._write() as (conn, at, changed):
            seq, previous, target, undo = self._rollback_plan(conn, plan_id, version)
            if undo:  # pop the current activation off the stack
                conn.execute("UPDATE activations SET undone = TRUE WHERE seq = %s", (seq,))
            top = conn.execute(_ACTIVE_ROW).fetchone()
            if top is None or (top[1], top[2]) != (target.id, target.version):
                conn.execute("INSERT INTO activations (plan_id, version) VALUES (%s, %s)", (target.id, target.version))
            self._event(conn, at, "rollback", target, actor, f"from {label(previous)}")
            changed()
        return target, previous

    # ----------------------------------------------------------------- following other replicas

    def watch_active(self, callback: Callable[[ExecutionPlan | None], None], *, listen: bool = True,
                     poll_interval_s: float | None = None) -> ActiveWatch:
        """Call `callback(active plan)` on a background thread now and after every change of
        the active plan made through any store sharing this database (this one included).
        A callback that raises is logged and called again at the next poll. `listen=False`
        polls only. Stopped by `ActiveWatch.stop()` or `close()`."""
        watch = ActiveWatch(self, callback, poll_interval_s or self.poll_interval_s, listen)
        self._watches.append(watch)
        return watch

    def close(self) -> None:
        for watch in self._watches:
            watch.stop()
        self._watches.clear()
        if self._owns_db:
            self.db.close()


class ActiveWatch:
    """The thread behind `PostgresPlanStore.watch_active`: wakes on a NOTIFY or every
    `poll_interval_s`, re-reads the generation, and calls back when it moved.

    It keeps two connections of its own, outside the pool: one only LISTENs (a query on it
    would swallow notifications arriving meanwhile), one reads. So a busy or exhausted pool
    never delays following, and after the database comes back both reconnect at the next
    round, which re-reads whatever changed while they were down.
    """

    def __init__(self, store: PostgresPlanStore, callback: Callable[[ExecutionPlan | None], None],
                 poll_interval_s: float, listen: bool):
        if not poll_interval_s > 0:
            raise InvalidArgument(f"poll interval {poll_interval_s} s must be positive", field="poll_interval_s")
        self.store = store
        self.callback = callback
        self.poll_interval_s = poll_interval_s
        self.listen = listen
        self.delivered: int | None = None  # the generation last handed to the callback
        self._stop = threading.Event()
        self._stopping = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()  # stop() interrupts the wait at once
        self._thread = threading.Thread(target=self._run, name="plan-store-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        listener: psycopg.Connection | None = None
        reader: psycopg.Connection | None = None
        try:
            while not self._stop.is_set():
                try:
                    if self.listen and listener is None:
                        listener = self.store.db.connect(listen=CHANNEL)
                    if listener is not None:  # drain first: one arriving after the read wakes the next round
                        for _ in listener.notifies(timeout=0):
                            pass
                    if reader is None:
                        reader = self.store.db.connect()
                    generation, plan = self.store.poll_active(reader)
                except (Unavailable, psycopg.Error) as exc:
                    log.warning("plan store: cannot follow the active plan (%s); retrying every %g s",
                                str(exc).strip(), self.poll_interval_s)
                    for conn in (listener, reader):
                        if conn is not None:
                            conn.close()
                    listener = reader = None
                except Exception:  # a corrupt row, say: keep watching
                    log.exception("plan store: cannot read the active plan; retrying in %g s", self.poll_interval_s)
                else:
                    self._deliver(generation, plan)
                waits = [self._wake_r] + ([listener.fileno()] if listener is not None else [])
                select.select(waits, [], [], self.poll_interval_s)
        finally:  # the last user of the pipe: stop() only writes to it before setting the flag
            for conn in (listener, reader):
                if conn is not None:
                    conn.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _deliver(self, generation: int, plan: ExecutionPlan | None) -> None:
        if generation == self.delivered:
            return
        try:
            self.callback(plan)
        except Exception:  # not delivered: called again next round
            log.exception("plan store: applying the active plan %s failed; retrying in %g s",
                          label(plan), self.poll_interval_s)
        else:
            self.delivered = generation

    def stop(self) -> None:
        with self._stopping:
            if self._stop.is_set() or not self._thread.is_alive():
                return
            os.write(self._wake_w, b"x")  # before the flag: the thread closes the pipe once it sees it
            self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


# --------------------------------------------------------------------------- suggestion audit log


_SUGGESTION_MIGRATIONS: list[list[str]] = [
    [  # 1: SuggestionLog's SQLite tables, in PostgreSQL types
        """CREATE TABLE suggestions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            agent_id TEXT NOT NULL,
            suggestion_id TEXT NOT NULL,
            plan_id TEXT NOT NULL,
            base_version INTEGER NOT NULL,
            paths TEXT NOT NULL,
            patch TEXT NOT NULL,
            rationale TEXT NOT NULL,
            expected_effect TEXT NOT NULL,
            mode TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            body BYTEA NOT NULL)""",
        "CREATE INDEX suggestions_by_agent ON suggestions (agent_id, id)",
        f"""CREATE TABLE suggestion_verdicts (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            suggestion BIGINT NOT NULL REFERENCES suggestions (id),
            decision TEXT NOT NULL CHECK (decision IN ({", ".join(f"'{d}'" for d in DECISIONS)})),
            rejection TEXT NOT NULL,
            reason TEXT NOT NULL,
            resulting_version INTEGER NOT NULL,
            resulting_hash TEXT NOT NULL,
            current_version INTEGER NOT NULL,
            decided_at DOUBLE PRECISION NOT NULL,
            decided_by TEXT NOT NULL)""",
        "CREATE INDEX suggestion_verdicts_by_suggestion ON suggestion_verdicts (suggestion, seq)",
    ],
]


class PostgresSuggestionLog(SuggestionLog):
    """SuggestionLog (the WeOS audit log) in the plan store's PostgreSQL database: every
    replica's suggestions and verdicts in one place, listed by any of them."""

    def __init__(self, db: PostgresDatabase):
        # not super().__init__: that would create SQLite's tables
        self.db = db
        db.ensure_schema(self.SCHEMA_COMPONENT, _SUGGESTION_MIGRATIONS)

    def received(self, agent_id: str, s: Suggestion, mode: str, at: float) -> int:
        paths = list(s.update_mask.paths)
        with self.db.transaction() as conn:
            return conn.execute(
                "INSERT INTO suggestions (agent_id, suggestion_id, plan_id, base_version, paths, patch, rationale, "
                "expected_effect, mode, received_at, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING id",
                (agent_id, s.suggestion_id, s.plan_id, s.base_version, json.dumps(paths), patch_json(s.patch, paths),
                 s.rationale, s.expected_effect, mode, at, s.SerializeToString(deterministic=True))).fetchone()[0]

    def decided(self, audit_id: int, v: Verdict, decided_by: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO suggestion_verdicts (suggestion, decision, rejection, reason, resulting_version, "
                "resulting_hash, current_version, decided_at, decided_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (audit_id, v.decision, v.rejection, v.reason, v.resulting_version, v.resulting_hash,
                 v.current_version, v.decided_at, decided_by))

    def get(self, audit_id: int) -> SuggestionRecord:
        with self.db.transaction(read_only=True) as conn:
            row = conn.execute(_SUGGESTION_SELECT + " WHERE s.id = %s", (audit_id,)).fetchone()
        if row is None:
            raise NotFound(f"no suggestion with id {audit_id}")
        return _record(row)

    def list(self, agent_id: str = "", decision: str = "", plan_id: str = "", limit: int = 100) -> list[SuggestionRecord]:
        where, args = [], []
        for column, value in (("s.agent_id", agent_id), ("v.decision", decision), ("s.plan_id", plan_id)):
            if value:
                where.append(f"{column} = %s")
                args.append(value)
        query = _SUGGESTION_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.id DESC LIMIT %s"
        with self.db.transaction(read_only=True) as conn:
            rows = conn.execute(query, (*args, max(0, limit))).fetchall()
        return [_record(row) for row in rows]
