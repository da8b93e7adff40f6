"""The PostgreSQL plan store against a real server started here on loopback (tests/postgres_server.py):
what only it has, beyond the contract every store keeps (test_store_contract.py): the shared
schema, an unreachable database, writers and compare-and-swap in several processes, one audit
log for both databases, replicas following the active plan (LISTEN/NOTIFY and polling), and
two `plan-engine serve` replicas sharing it. Without PostgreSQL every test here is skipped,
saying so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from engine.control.agents import SuggestionLog, Verdict
from engine.control.database import is_postgres_url
from engine.control.plan_store import PlanStore, SqlitePlanStore
from engine.control.postgres_store import PostgresDatabase, PostgresPlanStore
from engine.errors import FailedPrecondition, InvalidArgument, Unavailable
from postgres_server import free_port, served_hash, start_postgres, wait_served
from protos.planengine.v1 import control_plane_pb2, plan_pb2, suggestion_pb2
from test_store_contract import make_plan

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def store(dsn):
    s = PostgresPlanStore(dsn)
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


@pytest.mark.timeout(60)  # never a hang: connecting is bounded by timeout_s
def test_an_unreachable_database_is_unavailable_and_the_password_is_not_shown():
    port = free_port()  # nothing listens there
    with pytest.raises(Unavailable, match=rf"cannot connect to the plan database postgresql://u@127.0.0.1:{port}/x") \
            as caught:
        PostgresDatabase(f"postgresql://u:s3cret@127.0.0.1:{port}/x", timeout_s=1.0)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(InvalidArgument, match="not a PostgreSQL connection string"):
        PostgresDatabase("postgresql://h/db?bogus_option=1")


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
    """A watch callback that records what it is called with, in order, and lets a test wait for
    a plan. `fail`: raise on this many calls (recorded as failed attempts)."""

    def __init__(self):
        self.calls: list[plan_pb2.ExecutionPlan | None] = []  # delivered
        self.attempts: list[tuple[str, int]] = []  # (outcome, version) of every call, failed or not
        self.cond = threading.Condition()
        self.fail = 0

    def __call__(self, plan):
        with self.cond:
            version = plan.version if plan is not None else 0
            if self.fail:
                self.fail -= 1
                self.attempts.append(("failed", version))
                raise RuntimeError("apply failed")
            self.attempts.append(("applied", version))
            self.calls.append(plan)
            self.cond.notify_all()

    def wait_for(self, plan, timeout: float = 30) -> None:
        """Until `plan` (compared by id, version) was delivered; the timeout only ends a hang."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(p is not None and (p.id, p.version) == (plan.id, plan.version)
                                                  for p in self.calls), timeout), self.calls

    def versions(self) -> list[int]:
        with self.cond:
            return [p.version if p is not None else 0 for p in self.calls]


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_a_replica_follows_activations_made_by_another(dsn, listen):
    # Listening, the poll is an hour: every delivery after the first read can only be NOTIFY's.
    replica_a, replica_b = PostgresPlanStore(dsn), PostgresPlanStore(dsn, poll_interval_s=3600 if listen else 0.2)
    seen = Seen()
    try:
        replica_b.watch_active(seen, listen=listen)
        with seen.cond:
            assert seen.cond.wait_for(lambda: seen.calls, 30)  # called at once with the current state
        assert seen.calls == [None]
        v1 = replica_a.submit(make_plan(seed=1), activate=True)
        seen.wait_for(v1)
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        seen.wait_for(v2)
        replica_a.rollback()
        with seen.cond:
            assert seen.cond.wait_for(lambda: len(seen.calls) == 4, 30), seen.calls
        replica_a.submit(make_plan(seed=3))  # stored, not activated: nobody is told
        replica_a.activate("p", 1)  # already active: nothing changes
        v4 = replica_a.submit(make_plan(seed=4), activate=True)
        seen.wait_for(v4)
        # each change delivered once, in order, and nothing for the two writes that changed nothing
        assert seen.versions() == [0, 1, 2, 1, 4]
    finally:
        replica_b.close()
        replica_a.close()


def test_a_failing_callback_is_called_again(dsn):
    replica_a, replica_b = PostgresPlanStore(dsn), PostgresPlanStore(dsn, poll_interval_s=0.2)
    seen = Seen()
    try:
        replica_b.watch_active(seen)
        v1 = replica_a.submit(make_plan(seed=1), activate=True)
        seen.wait_for(v1)
        seen.fail = 2  # the apply fails twice (a model that will not load, say), then works
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        seen.wait_for(v2)
        # the same change offered again after each failure (at the next polls), then delivered once
        assert seen.attempts[-3:] == [("failed", 2), ("failed", 2), ("applied", 2)]
        assert seen.versions()[-2:] == [1, 2] and seen.versions().count(2) == 1
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
        seen.wait_for(v1)
        server.stop("fast")
        with pytest.raises(Unavailable, match="unreachable"):
            replica_a.submit(make_plan(seed=2), activate=True)
        server.start()
        v2 = replica_a.submit(make_plan(seed=2), activate=True)
        seen.wait_for(v2)
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
        delays["activate (reload)"] = wait_served(a, v3.hash)

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
