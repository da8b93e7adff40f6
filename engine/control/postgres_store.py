"""The plan store (and the suggestion audit log's database) in PostgreSQL: one fleet-wide truth about
which plan is active.

`PostgresDatabase` is the PostgreSQL dialect of engine.control.database, and
`PostgresPlanStore(dsn)` the SqlPlanStore over it (the same code as `SqlitePlanStore`: versions,
idempotent resubmit, the activation stack, rollback, audit history) in a database that
several server replicas share; SQLite stays the embedded default. The tables are SQLite's;
`plan_head` adds one row that serialises the writers and counts activation changes. The
suggestion audit log (engine.control.agents.SuggestionLog) keeps its tables in the same
database.

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

import logging
import os
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from engine.control.database import SqlDatabase
from engine.control.plan_store import SqlPlanStore, label, parse_stored
from engine.control.plans import ExecutionPlan
from engine.errors import DataLoss, InvalidArgument, ResourceExhausted, Unavailable

__all__ = ["ActiveWatch", "PostgresDatabase", "PostgresPlanStore"]

log = logging.getLogger(__name__)

CHANNEL = "plan_engine_active"  # NOTIFY channel; the payload is the new generation
POLL_INTERVAL_S = 2.0
TIMEOUT_S = 10.0
SCHEMA_LOCK = 0x706C616E656E67  # advisory lock key serialising migrations across replicas ("planeng")


# --------------------------------------------------------------------------- connections


class PostgresDatabase(SqlDatabase):
    """A pool of connections to one PostgreSQL database, shared by the stores that keep tables
    in it (the plan store, the suggestion audit log).

    `transaction()` lends a connection inside a transaction, committed when the block ends and
    rolled back if it raises. Every psycopg connection or pool failure surfaces as Unavailable.
    """

    name = "postgresql"
    placeholder = "%s"
    types = {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "ref": "BIGINT", "blob": "BYTEA",
             "double": "DOUBLE PRECISION", "flag": "BOOLEAN NOT NULL DEFAULT FALSE"}

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

    def snapshot(self) -> AbstractContextManager[psycopg.Connection]:
        return self.transaction(read_only=True)

    def lock_plans(self, conn: psycopg.Connection) -> tuple[float, Callable[[], None]]:
        """`SELECT ... FROM plan_head FOR UPDATE`: plan writes are serial across all replicas, as
        under SQLite's BEGIN IMMEDIATE. changed() bumps the generation and notifies the
        followers when (and only if) the transaction commits."""
        generation, now = conn.execute(_LOCK).fetchone()
        bumped = False

        def changed() -> None:
            nonlocal bumped
            if not bumped:
                bumped = True
                conn.execute("UPDATE plan_head SET generation = %s", (generation + 1,))
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation + 1)))
        return now, changed

    def _lock_schema(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))  # replicas starting together

    def close(self) -> None:
        self._pool.close()


# --------------------------------------------------------------------------- plan store


_ACTIVE_ROW = "SELECT seq, plan_id, version FROM activations WHERE NOT undone ORDER BY seq DESC LIMIT 1"
# The generation and the active plan in one statement, so one snapshot even in autocommit.
_SNAPSHOT = f"""SELECT h.generation, p.body, p.hash, p.id, p.version FROM plan_head h
    LEFT JOIN LATERAL ({_ACTIVE_ROW}) a ON TRUE
    LEFT JOIN plans p ON p.id = a.plan_id AND p.version = a.version"""
# Taken first by every write; the database's clock (after the lock) stamps what it writes,
# so replicas with skewed clocks still record times in commit order.
_LOCK = "SELECT generation, extract(epoch FROM clock_timestamp())::float8 FROM plan_head FOR UPDATE"


class PostgresPlanStore(SqlPlanStore):
    """PlanStore in a PostgreSQL database shared by replicas (tables created if missing), which
    can follow the active plan as other replicas change it (`watch_active`)."""

    def __init__(self, dsn: str | PostgresDatabase, *, poll_interval_s: float = POLL_INTERVAL_S):
        self.poll_interval_s = poll_interval_s
        self._watches: list[ActiveWatch] = []
        owns = not isinstance(dsn, PostgresDatabase)
        super().__init__(PostgresDatabase(dsn) if owns else dsn, owns_db=owns)

    def poll_active(self, conn: psycopg.Connection | None = None) -> tuple[int, ExecutionPlan | None]:
        """(generation, active plan) from one snapshot. The generation grows by one with every
        change of the active plan, in any replica: comparing it is how a poller sees a change.
        `conn`: a connection of the caller's (the watcher's own), else a pooled one."""
        if conn is None:
            with self.db.snapshot() as pooled:
                return self.poll_active(pooled)
        generation, body, stored_hash, plan_id, version = conn.execute(_SNAPSHOT).fetchone()
        return generation, parse_stored(body, stored_hash, plan_id, version) if body is not None else None

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
        super().close()


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
