"""The PostgreSQL plan store against a real server started here on loopback: the SQLite store's
contract tests, writers in threads and processes, compare-and-swap, replicas following the
active plan (LISTEN/NOTIFY and polling), and two `plan-engine serve` replicas sharing it.

The server is Debian's PostgreSQL (`.ci/postgres.sh` installs it): each session runs initdb in
a temporary directory and pg_ctl on a free loopback port, as the `postgres` user when the
tests run as root (PostgreSQL refuses to run as root), and removes it all at the end.
Without the binaries every test here is skipped, saying so.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine.errors import EngineError, FailedPrecondition, InvalidArgument, Unavailable
from protos.planengine.v1 import control_plane_pb2, plan_pb2

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")

# The SQLite store's contract tests, run here against PostgreSQL through this module's `store`
# fixture (pytest resolves fixtures where a test is collected). The ones reading SQLite's file
# directly have PostgreSQL versions below.
from test_plan_store import (  # noqa: F401
    make_plan,
    test_activate_rollback_and_history,
    test_get_unknown_is_not_found_with_a_clear_message,
    test_preview_then_named_rollback_is_the_same_as_rollback,
    test_resubmitting_the_newest_content_is_idempotent,
    test_rollback_of_one_id_skips_other_plans,
    test_submit_and_activate_in_one_step,
    test_submit_assigns_versions_hash_and_time,
)

from engine.control.plan_store import PlanStore, SqlitePlanStore
from engine.control.postgres_store import (
    PostgresDatabase,
    PostgresPlanStore,
)
from engine.control.database import is_postgres_url
from engine.control.agents import SuggestionLog, Verdict
from protos.planengine.v1 import suggestion_pb2

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a throwaway server


def postgres_bindir() -> Path | None:
    """Debian's newest /usr/lib/postgresql/N/bin, else the directory of `pg_ctl` on PATH."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, on 127.0.0.1 only (no Unix socket), trust auth."""

    USER = "planengine"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        # under /tmp itself: pytest's tmp dirs sit in a root-only (0700) parent
        self.root = Path(tempfile.mkdtemp(prefix="plan-engine-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.port = 0
        self._run("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(self.bindir / tool), *args]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{tail}")

    def start(self) -> None:
        self.port = self.port or free_port()  # a restart keeps its port: DSNs handed out stay valid
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                  "-c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (bash .ci/postgres.sh installs Debian's package)")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


@pytest.fixture(scope="session")
def pg():
    server = start_postgres()
    yield server
    server.remove()


@pytest.fixture
def dsn(pg) -> str:
    """A fresh, empty database for one test."""
    return pg.create_database()


@pytest.fixture
def store(dsn):
    s = PostgresPlanStore(dsn)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    """Each store kind; compare-and-swap must behave the same in both."""
    s = SqlitePlanStore(tmp_path / "plans.db") if request.param == "sqlite" else \
        PostgresPlanStore(request.getfixturevalue("dsn"))
    yield s
    s.close()


def versions(dsn: str, plan_id: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM plans WHERE id = %s ORDER BY version", (plan_id,))]


# --------------------------------------------------------------------------- the store itself


def test_url_recognition_and_the_shared_schema(store, dsn):
    assert isinstance(store, PlanStore)
    assert is_postgres_url(dsn) and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("/var/lib/plans.sqlite3") and not is_postgres_url(Path("x"))
    # a sibling store (the suggestion audit log) registers its own component in the same database
    db = PostgresDatabase(dsn)
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id BIGSERIAL PRIMARY KEY, body TEXT)"]])
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id BIGSERIAL PRIMARY KEY, body TEXT)"]])  # no-op
    with db.transaction() as conn:
        rows = dict(conn.execute("SELECT component, version FROM schema_version").fetchall())
    assert rows == {"plans": 2, "suggestions": 1}  # plans 2: activation_failed events
    with pytest.raises(FailedPrecondition, match="schema version 1, newer than this server's 0"):
        db.ensure_schema("suggestions", [])
    shared = PostgresPlanStore(db)
    shared.submit(make_plan(seed=1))
    shared.close()  # a shared database is closed by its owner
    assert store.get("p").version == 1
    db.close()


def test_plans_survive_close_and_reopen(dsn):
    with PostgresPlanStore(dsn) as store:
        v1 = store.submit(make_plan(seed=1), activate=True)
        v2 = store.submit(make_plan(seed=2))
    with pytest.raises(Unavailable):
        store.get("p")
    with PostgresPlanStore(dsn) as store:
        assert store.get("p", 1) == v1 and store.get("p") == v2
        assert store.active() == v1
        assert store.submit(make_plan(seed=3)).version == 3
        assert len(store.history()) == 4


def test_a_corrupt_row_is_reported_not_returned(store, dsn):
    store.submit(make_plan(seed=1))
    with psycopg.connect(dsn) as conn:  # a foreign writer swaps the body
        conn.execute("UPDATE plans SET body = %s WHERE id = 'p'", (make_plan(seed=9).SerializeToString(),))
    with pytest.raises(EngineError, match="corrupt"):
        store.get("p")


def test_a_failed_transaction_leaves_no_trace(store):
    with pytest.raises(RuntimeError), store.db.transaction() as conn:
        conn.execute("INSERT INTO plans (id, version, hash, created_at, actor, body) "
                     "VALUES ('p', 1, 'h', 0, '', '\\x00')")
        raise RuntimeError("boom")
    assert store.submit(make_plan(seed=1)).version == 1


def test_an_unreachable_database_is_unavailable_and_the_password_is_not_shown():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(Unavailable, match=rf"cannot connect to the plan database postgresql://u@127.0.0.1:{port}/x") \
            as caught:
        PostgresDatabase(f"postgresql://u:s3cret@127.0.0.1:{port}/x", timeout_s=1.0)
    assert "s3cret" not in str(caught.value)
    assert time.monotonic() - started < 10
    with pytest.raises(InvalidArgument, match="not a PostgreSQL connection string"):
        PostgresDatabase("postgresql://h/db?bogus_option=1")


def test_threads_submitting_to_one_id_get_contiguous_versions(store, dsn):
    n_threads, per_thread = 8, 15
    acknowledged: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            v = store.submit(make_plan(seed=t * 1000 + i)).version
            with lock:
                acknowledged.append(v)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = list(range(1, n_threads * per_thread + 1))
    assert sorted(acknowledged) == expected
    assert versions(dsn, "p") == expected


SUBMITTER = textwrap.dedent("""
    import sys
    from engine.control.postgres_store import PostgresPlanStore
    from protos.planengine.v1 import plan_pb2

    dsn, first_seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # start together: both create the schema of an empty database
    store = PostgresPlanStore(dsn)
    for seed in range(first_seed, first_seed + count):
        plan = plan_pb2.ExecutionPlan(id="p", model="smol")
        plan.determinism.default_seed = seed
        print(store.submit(plan).version, flush=True)
    store.close()
""")


def test_processes_on_an_empty_database_get_contiguous_versions(dsn):
    """Two replicas starting together: one creates the tables, neither fails, no version is lost."""
    per_process = 40
    procs = [subprocess.Popen([sys.executable, "-c", SUBMITTER, dsn, str(k * 10_000), str(per_process)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    expected = list(range(1, 2 * per_process + 1))
    assert sorted(int(v) for out in outputs for v in out) == expected
    assert versions(dsn, "p") == expected


# --------------------------------------------------------------------------- compare-and-swap


def test_compare_and_swap_activates_only_on_the_current_base(any_store):
    store = any_store
    with pytest.raises(FailedPrecondition, match="stale: p@1 is no longer the active plan \\(none is\\)") as caught:
        store.submit_if_active(make_plan(seed=1), 1)
    assert (caught.value.current_id, caught.value.current_version) == ("", 0)
    v1 = store.submit(make_plan(seed=1), activate=True)
    v2, was = store.submit_if_active(make_plan(seed=2), base_version=1, actor="agent-a")
    assert (v2.version, was) == (2, v1) and store.active() == v2
    assert [(e.action, e.version, e.actor) for e in store.history(limit=2)] == [
        ("activate", 2, "agent-a"), ("submit", 2, "agent-a")]

    events = len(store.history())
    with pytest.raises(FailedPrecondition, match="stale: p@1 .*\\(p@2 is\\)") as caught:
        store.submit_if_active(make_plan(seed=3), base_version=1)
    assert (caught.value.current_id, caught.value.current_version) == ("p", 2)
    with pytest.raises(FailedPrecondition, match="stale") as caught:  # the id is part of the base
        store.submit_if_active(make_plan("q", seed=3), base_version=2)
    assert caught.value.current_version == 2
    assert len(store.history()) == events and store.get("p").version == 2  # a stale call writes nothing

    with pytest.raises(InvalidArgument, match="base version 0 must be >= 1"):
        store.submit_if_active(make_plan(seed=3), 0)
    with pytest.raises(InvalidArgument, match="needs an id"):
        store.submit_if_active(make_plan(""), 1)
    # unchanged content: no new version, nothing recorded (a retried suggestion is harmless)
    assert store.submit_if_active(make_plan(seed=2), 2) == (v2, v2)
    assert len(store.history()) == events


def test_compare_and_swap_races_in_threads_have_one_winner_each(any_store):
    store = any_store
    store.submit(make_plan(seed=0), activate=True)
    n_threads, rounds = 4, 15

    def suggest(start: threading.Barrier, seed: int, base: int, outcomes: list) -> None:
        start.wait()
        try:
            stored, _ = store.submit_if_active(make_plan(seed=seed), base)
            outcomes.append(("won", stored.version))
        except FailedPrecondition as exc:
            outcomes.append(("stale", exc.current_version))

    for r in range(rounds):
        base = store.active().version
        start = threading.Barrier(n_threads)
        outcomes: list[tuple[str, int]] = []
        threads = [threading.Thread(target=suggest, args=(start, 1000 * (r + 1) + t, base, outcomes))
                   for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [v for kind, v in outcomes if kind == "won"]
        assert len(won) == 1, outcomes
        assert sorted(outcomes) == sorted([("won", base + 1)] + [("stale", base + 1)] * (n_threads - 1))
    assert store.active().version == rounds + 1


CAS_RACER = textwrap.dedent("""
    import sys
    from engine.control.postgres_store import PostgresPlanStore
    from engine.errors import FailedPrecondition
    from protos.planengine.v1 import plan_pb2

    store = PostgresPlanStore(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:  # "base seed": one suggestion computed against `base`
        base, seed = map(int, line.split())
        plan = plan_pb2.ExecutionPlan(id="p", model="smol")
        plan.determinism.default_seed = seed
        try:
            print("won", store.submit_if_active(plan, base)[0].version, flush=True)
        except FailedPrecondition as exc:
            print("stale", exc.current_version, flush=True)
    store.close()
""")


def test_compare_and_swap_races_between_processes_have_one_winner_each(store, dsn):
    """Two replicas accept a suggestion against the same base version at the same moment."""
    store.submit(make_plan(seed=0), activate=True)
    racers = [subprocess.Popen([sys.executable, "-c", CAS_RACER, dsn], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    rounds, wins = 25, [0, 0]
    for r in range(rounds):
        base = r + 1
        for k, racer in enumerate(racers):
            racer.stdin.write(f"{base} {100 * base + k + 1}\n")
            racer.stdin.flush()
        verdicts = [racer.stdout.readline().split() for racer in racers]
        assert sorted(kind for kind, _ in verdicts) == ["stale", "won"], verdicts
        assert all(int(v) == base + 1 for _, v in verdicts)  # the loser is told the winner's version
        wins[[kind for kind, _ in verdicts].index("won")] += 1
    for racer in racers:
        racer.stdin.close()
        assert racer.wait(timeout=30) == 0
    assert versions(dsn, "p") == list(range(1, rounds + 2))
    assert [e.action for e in store.history("p")].count("activate") == rounds + 1
    print(f"\ncompare-and-swap races won by each process: {wins}")


# --------------------------------------------------------------------------- suggestion audit log


def test_the_suggestion_log_keeps_the_same_records_in_both_databases(tmp_path, dsn):
    """The same suggestions and verdicts, written to SQLite's log and PostgreSQL's, read back alike."""
    sqlite_store, pg_store = SqlitePlanStore(tmp_path / "plans.db"), PostgresPlanStore(dsn)
    logs = [SuggestionLog(sqlite_store.db), SuggestionLog(pg_store.db)]
    SuggestionLog(pg_store.db)  # a second replica starting: the schema is there already

    def suggestion(sid: str, agent: str, plan_id: str = "default") -> suggestion_pb2.Suggestion:
        s = suggestion_pb2.Suggestion(suggestion_id=sid, agent_id=agent, plan_id=plan_id, base_version=3,
                                      rationale=f"why {sid}", expected_effect="p95 -10%")
        s.update_mask.paths.append("scheduler_policy")
        s.patch.scheduler_policy = plan_pb2.SCHEDULER_POLICY_LATENCY
        return s

    def verdict(sid: str, decision: str, **kw) -> Verdict:
        return Verdict(sid, decision, f"{decision} {sid}", decided_at=1000.5, **kw)

    for log in logs:
        a = log.received("tuner", suggestion("a", "tuner"), "auto", 1000.0)
        log.decided(a, verdict("a", "accepted", resulting_version=4, resulting_hash="h4", current_version=4), "policy")
        b = log.received("careful", suggestion("b", "careful", "other"), "review", 1001.0)
        log.decided(b, verdict("b", "pending_review", current_version=4), "policy")
        log.decided(b, verdict("b", "rejected", rejection="stale", current_version=5), "operator:ops")
        log.received("tuner", suggestion("c", "tuner"), "auto", 1002.0)  # the server stopped before judging it
        assert (a, b) == (1, 2)

    def view(log) -> list:
        def one(r):
            v = r.verdict
            return (r.id, r.agent_id, r.suggestion, r.received_at, r.mode, r.patch_json, r.decided_by,
                    None if v is None else (v.decision, v.rejection, v.reason, v.resulting_version, v.resulting_hash,
                                            v.current_version, v.decided_at))
        return [[one(r) for r in log.list()], [one(r) for r in log.list(agent_id="tuner")],
                [one(r) for r in log.list(decision="rejected")], [one(r) for r in log.list(plan_id="other", limit=1)],
                one(log.get(2))]

    sqlite_view, pg_view = view(logs[0]), view(logs[1])
    assert pg_view == sqlite_view
    assert [r[0] for r in pg_view[0]] == [3, 2, 1] and pg_view[0][0][-1] is None
    assert pg_view[4][-1][:2] == ("rejected", "stale") and pg_view[4][6] == "operator:ops"
    with pytest.raises(Exception, match="no suggestion with id 9"):
        logs[1].get(9)
    sqlite_store.close()
    pg_store.close()


# --------------------------------------------------------------------------- following replicas


class Seen:
    """A watch callback that records (time, plan) and lets a test wait for a plan."""

    def __init__(self):
        self.calls: list[tuple[float, plan_pb2.ExecutionPlan | None]] = []
        self.cond = threading.Condition()
        self.fail = 0  # raise on this many calls

    def __call__(self, plan):
        with self.cond:
            if self.fail:
                self.fail -= 1
                raise RuntimeError("apply failed")
            self.calls.append((time.monotonic(), plan))
            self.cond.notify_all()

    def wait_for(self, plan, timeout: float) -> float:
        """Seconds until `plan` (compared by id, version) was delivered."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(p is not None and (p.id, p.version) == (plan.id, plan.version)
                                                  for _, p in self.calls), timeout), self.calls
            return next(t for t, p in self.calls if p is not None and (p.id, p.version) == (plan.id, plan.version))


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_a_replica_follows_activations_made_by_another(dsn, listen):
    # Listening, the poll is made too slow to matter: deliveries well inside it show NOTIFY at work.
    replica_a, replica_b = PostgresPlanStore(dsn), PostgresPlanStore(dsn, poll_interval_s=10 if listen else 0.5)
    seen = Seen()
    try:
        watch = replica_b.watch_active(seen, listen=listen)
        with seen.cond:
            assert seen.cond.wait_for(lambda: seen.calls, 5)  # called at once with the current state
        assert seen.calls[0][1] is None
        delays = []  # from just before the committing call, so they include its commit
        t0 = time.monotonic()
        v1 = replica_a.submit(make_plan(seed=1), activate=True)
        delays.append(seen.wait_for(v1, 5) - t0)
        t0 = time.monotonic()
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        delays.append(seen.wait_for(v2, 5) - t0)
        with seen.cond:
            seen.calls.clear()  # v1 was seen before: wait for it to come back
        t0 = time.monotonic()
        replica_a.rollback()
        delays.append(seen.wait_for(v1, 5) - t0)
        n = len(seen.calls)
        replica_a.submit(make_plan(seed=3))  # stored, not activated: nobody is told
        replica_a.activate("p", 1)  # already active: nothing changes
        time.sleep(1.2)
        assert len(seen.calls) == n
        if listen:  # well inside the 10 s poll: only NOTIFY can have delivered these
            assert max(delays) < watch.poll_interval_s / 2, delays
        print(f"\npropagation ({'LISTEN/NOTIFY' if listen else 'polling every 0.5 s'}): "
              + ", ".join(f"{d * 1000:.1f} ms" for d in delays))
    finally:
        replica_b.close()
        replica_a.close()


def test_a_failing_callback_is_called_again(dsn):
    replica_a, replica_b = PostgresPlanStore(dsn), PostgresPlanStore(dsn, poll_interval_s=0.2)
    seen = Seen()
    try:
        replica_b.watch_active(seen)
        v1 = replica_a.submit(make_plan(seed=1), activate=True)
        seen.wait_for(v1, 5)
        seen.fail = 2  # the apply fails twice (a model that will not load, say), then works
        t0 = time.monotonic()
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        assert 0.3 < seen.wait_for(v2, 5) - t0 < 2  # two polls of 0.2 s later
    finally:
        replica_b.close()
        replica_a.close()


def test_following_survives_a_database_restart():
    """The listening connection and the pool reconnect; a change made meanwhile is not missed."""
    server = start_postgres()
    try:
        dsn = server.create_database()
        replica_a = PostgresPlanStore(PostgresDatabase(dsn, timeout_s=2))  # fail fast while it is down
        replica_b = PostgresPlanStore(dsn, poll_interval_s=0.5)
        seen = Seen()
        replica_b.watch_active(seen)
        v1 = replica_a.submit(make_plan(seed=1), activate=True)
        seen.wait_for(v1, 5)
        server.stop("fast")
        with pytest.raises(Unavailable, match="unreachable"):
            replica_a.submit(make_plan(seed=2), activate=True)
        server.start()
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        seen.wait_for(v2, 10)
        assert replica_b.active() == v2
        replica_b.close()
        replica_a.close()
        replica_a.db.close()
    finally:
        server.remove()


# --------------------------------------------------------------------------- two server replicas


def serve(dsn: str, env: dict, cwd: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """`plan-engine serve --port 0 --store DSN ...` from this checkout, run in `cwd`."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", "0", "--store", dsn, *args],
                            cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"serving on [\d.]+:(\d+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, int(match.group(1))
    raise AssertionError("server exited before serving:\n" + "".join(lines[-30:]))


def served_hash(client) -> str:
    """The plan hash in Generate's final message."""
    *_, last = client.generate(text="Hi", max_tokens=1, ignore_eos=True)
    return last.final.plan.hash


def wait_served(client, plan_hash_: str, timeout: float = 60) -> float:
    """Seconds from now until `client`'s server stamped a Generate with `plan_hash_`, taken at
    the start of that call. Only a hang is a failure: how fast a replica follows depends on the
    machine's load (a Generate on a busy 2-core machine takes seconds), so the delays are
    printed for the record, never asserted."""
    t0 = time.monotonic()
    while True:
        sent = time.monotonic()
        if served_hash(client) == plan_hash_:
            return sent - t0
        assert sent - t0 < timeout, f"not served within {timeout} s"
        time.sleep(0.005)


AGENTS = {"agents": {"tuner": {"token": "tuner-token", "mode": "auto", "rate_per_minute": 600,
                                "fields": {"batching.max_batch_size": {"min": 1, "max": 64}}}}}


def race_suggestions(clients: list, plan_id: str, base: int, sizes: list[int]) -> list:
    """One suggestion per replica, all against `base`, sent at the same moment; their verdicts."""
    start = threading.Barrier(len(clients))
    verdicts: list = [None] * len(clients)

    def send(k: int) -> None:
        s = suggestion_pb2.Suggestion(suggestion_id=f"{base}-{k}", agent_id="tuner", plan_id=plan_id,
                                      base_version=base, rationale="race")
        s.update_mask.paths.append("batching.max_batch_size")
        s.patch.batching.max_batch_size = sizes[k]
        start.wait()
        [verdicts[k]] = clients[k].stub.Suggest(iter([s]), metadata=clients[k].metadata, timeout=60)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return verdicts


@pytest.mark.slow
def test_two_server_replicas_share_the_active_plan(pg, model_path, tmp_path):
    import json

    from services.client import PlanEngineClient

    dsn = pg.create_database()
    env = {**os.environ, "PLAN_ENGINE_CACHE": str(model_path.parent)}
    policy = tmp_path / "agents.json"
    policy.write_text(json.dumps(AGENTS))
    procs: dict[str, subprocess.Popen] = {}
    clients: dict[str, PlanEngineClient] = {}
    agents: dict[str, PlanEngineClient] = {}

    def start(name: str) -> None:
        procs[name], port = serve(dsn, env, tmp_path, "--agent-policy", str(policy), "--insecure-operator")
        clients[name] = PlanEngineClient(f"127.0.0.1:{port}", timeout=60)
        agents[name] = PlanEngineClient(f"127.0.0.1:{port}", token="tuner-token", timeout=60)

    try:
        # both start together on an empty database: one creates the tables and the default plan
        threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a, b = clients["a"], clients["b"]
        default = a.active_plan()
        assert default.version == 1 and served_hash(a) == served_hash(b) == default.hash

        # a plan activated through one replica is served by the other
        delays = {}
        changed = plan_pb2.ExecutionPlan()
        changed.CopyFrom(default)
        for field in ("version", "hash", "created_at"):
            changed.ClearField(field)
        changed.scheduler_policy = plan_pb2.SCHEDULER_POLICY_LATENCY
        v2 = a.submit_plan(changed, activate=True).plan
        delays["activate (live apply)"] = wait_served(b, v2.hash)
        assert served_hash(a) == v2.hash

        rolled = b.rollback().plan
        assert rolled.hash == default.hash
        delays["rollback (live apply)"] = wait_served(a, default.hash)

        # a plan needing a model reload
        reload = plan_pb2.ExecutionPlan()
        reload.CopyFrom(changed)
        reload.limits.context_length = 1024
        reload.limits.max_tokens_per_request = 1024
        v3 = b.submit_plan(reload, activate=True).plan
        delays["activate (reload)"] = wait_served(a, v3.hash, timeout=180)

        # a replica killed and restarted mid-way loses nothing and overrides nothing
        procs["a"].kill()
        procs["a"].wait(timeout=30)
        a.close()
        agents["a"].close()
        v4 = b.submit_plan({"id": "other", "model": default.model}, activate=True).plan
        start("a")
        a = clients["a"]
        assert served_hash(a) == served_hash(b) == v4.hash
        assert [(p.id, p.version) for p in a.list_plans().plans] == [("default", 3), ("other", 1)]
        history = [(e.action, e.plan_id, e.version) for e in a.history(limit=50).events]
        assert history == [(e.action, e.plan_id, e.version) for e in b.history(limit=50).events]
        assert history == [("activate", "other", 1), ("submit", "other", 1),
                           ("activate", "default", 3), ("submit", "default", 3),
                           ("rollback", "default", 1),
                           ("activate", "default", 2), ("submit", "default", 2),
                           ("activate", "default", 1), ("submit", "default", 1)]

        # suggestions racing on two replicas against one base version: one accepted, one stale
        accepted = suggestion_pb2.SuggestionVerdict.DECISION_ACCEPTED
        for base in range(1, 6):
            verdicts = race_suggestions([agents["a"], agents["b"]], "other", base, [2 * base, 2 * base + 1])
            decisions = sorted((v.decision, v.rejection, v.current_version) for v in verdicts)
            assert decisions == [(accepted, suggestion_pb2.REJECTION_UNSPECIFIED, base + 1),
                                 (suggestion_pb2.SuggestionVerdict.DECISION_REJECTED, suggestion_pb2.REJECTION_STALE,
                                  base + 1)], verdicts
            winner = next(v for v in verdicts if v.decision == accepted)
            loser = clients["b" if verdicts[0].decision == accepted else "a"]
            followed = wait_served(loser, winner.resulting_hash)  # the winner's is at once
            delays["accepted suggestion (live apply)"] = max(followed, delays.get("accepted suggestion (live apply)", 0))
        listed = a._call("ListSuggestions", control_plane_pb2.ListSuggestionsRequest(limit=50))
        assert len(listed.suggestions) == 10  # both replicas' audit entries, in the one database
        print("\npropagation between server replicas: "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in delays.items()))
    finally:
        for client in [*clients.values(), *agents.values()]:
            client.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
