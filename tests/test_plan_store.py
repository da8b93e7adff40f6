"""The SQLite plan store: versions, activation and rollback, durability under threads,
processes and SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine.control.plan_store import (
    PlanEvent,
    PlanStore,
    SqliteDatabase,
    SqlitePlanStore,
)
from engine.control.plans import plan_hash
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound
from protos.planengine.v1 import plan_pb2

REPO = Path(__file__).resolve().parents[1]


def make_plan(plan_id: str = "p", seed: int = 0, description: str = "") -> plan_pb2.ExecutionPlan:
    """Plans differing in content: the seed is hashed, the description is not."""
    plan = plan_pb2.ExecutionPlan(id=plan_id, model="smol", backend=plan_pb2.BACKEND_CPU, description=description)
    plan.determinism.default_seed = seed
    return plan


@pytest.fixture
def store(tmp_path):
    s = SqlitePlanStore(tmp_path / "plans.db")
    yield s
    s.close()


def versions(db_path: Path, plan_id: str) -> list[int]:
    with sqlite3.connect(db_path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM plans WHERE id = ? ORDER BY version", (plan_id,))]


# --------------------------------------------------------------------------- basics


def test_submit_assigns_versions_hash_and_time(store):
    assert isinstance(store, PlanStore)
    before = time.time()
    first = store.submit(make_plan(seed=1), actor="alice")
    second = store.submit(make_plan(seed=2))
    other = store.submit(make_plan("q", seed=1))
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert first.hash == plan_hash(first) and first.hash != second.hash
    assert first.hash == other.hash  # same content under another id
    assert before - 1 <= first.created_at.ToNanoseconds() / 1e9 <= time.time() + 1
    assert store.get("p") == second
    assert store.get("p", 1) == first
    assert [p.id for p in store.list_latest()] == ["p", "q"]
    assert store.list_latest()[0] == second


def test_get_unknown_is_not_found_with_a_clear_message(store):
    store.submit(make_plan(seed=1))
    with pytest.raises(NotFound, match=r"no plan with id 'nope' \(stored plans: p\)"):
        store.get("nope")
    with pytest.raises(NotFound, match=r"plan 'p' has no version 5 \(versions 1..1\)"):
        store.get("p", 5)
    with pytest.raises(InvalidArgument):
        store.get("p", -1)
    with pytest.raises(InvalidArgument, match="needs an id"):
        store.submit(make_plan(""))


def test_resubmitting_the_newest_content_is_idempotent(store):
    first = store.submit(make_plan(seed=1, description="first"))
    again = store.submit(make_plan(seed=1, description="retried"))
    assert again == first and again.description == "first"
    store.submit(make_plan(seed=2))
    back = store.submit(make_plan(seed=1))  # only the newest version is compared
    assert back.version == 3
    assert [e.action for e in store.history("p")] == ["submit"] * 3


def test_activate_rollback_and_history(store):
    assert store.active() is None
    with pytest.raises(FailedPrecondition, match="no plan is active"):
        store.rollback()
    v1 = store.submit(make_plan(seed=1))
    v2 = store.submit(make_plan(seed=2))
    v3 = store.submit(make_plan(seed=3))
    q1 = store.submit(make_plan("q", seed=1))

    assert store.activate("p", 1, actor="ops") == (v1, None)
    with pytest.raises(FailedPrecondition, match="p@1 has no earlier activation"):
        store.rollback()
    assert store.activate("p") == (v3, v1)  # 0 = newest
    assert store.activate("p", 3) == (v3, v3)  # already active: nothing recorded
    assert store.activate("q") == (q1, v3)
    assert store.active() == q1
    with pytest.raises(NotFound):
        store.activate("p", 9)

    # rollback undoes activations one at a time: q1 -> p3 -> p1
    assert store.rollback(actor="ops") == (v3, q1)
    assert store.active() == v3
    assert store.rollback() == (v1, v3)
    with pytest.raises(FailedPrecondition):
        store.rollback()
    assert store.active() == v1  # a failed rollback changes nothing

    # to a named version, then back
    assert store.rollback("p", 2) == (v2, v1)
    with pytest.raises(FailedPrecondition, match="already the active plan"):
        store.rollback("p", 2)
    with pytest.raises(FailedPrecondition, match="'q' is not the active plan"):
        store.rollback("q")
    assert store.rollback() == (v1, v2)

    events = store.history()
    assert all(isinstance(e, PlanEvent) for e in events)
    assert [(e.action, e.plan_id, e.version) for e in events] == [
        ("rollback", "p", 1), ("rollback", "p", 2), ("rollback", "p", 1), ("rollback", "p", 3),
        ("activate", "q", 1), ("activate", "p", 3), ("activate", "p", 1),
        ("submit", "q", 1), ("submit", "p", 3), ("submit", "p", 2), ("submit", "p", 1),
    ]
    assert events[0].detail == "from p@2" and events[-5].actor == "ops"
    assert events[-5].detail == "previous: none"
    assert [e.seq for e in events] == sorted((e.seq for e in events), reverse=True)
    assert events[0].hash == v1.hash and events[0].at >= events[-1].at
    assert [e.action for e in store.history("q")] == ["activate", "submit"]
    assert len(store.history(limit=2)) == 2


def test_submit_and_activate_in_one_step(store):
    v1 = store.submit(make_plan(seed=1), activate=True)
    assert store.active() == v1
    assert store.submit(make_plan(seed=1), activate=True) == v1  # retry: no new version, no event
    v2 = store.submit(make_plan(seed=2), activate=True)
    assert store.active() == v2
    assert [e.action for e in store.history()] == ["activate", "submit", "activate", "submit"]


def test_plans_survive_close_and_reopen(tmp_path):
    path = tmp_path / "plans.db"
    with SqlitePlanStore(path) as store:
        v1 = store.submit(make_plan(seed=1), activate=True)
        v2 = store.submit(make_plan(seed=2))
    with pytest.raises(FailedPrecondition, match="closed"):
        store.get("p")
    with SqlitePlanStore(path) as store:
        assert store.get("p", 1) == v1 and store.get("p") == v2
        assert store.active() == v1
        assert store.submit(make_plan(seed=3)).version == 3
        assert len(store.history()) == 4


def test_schema_is_versioned_and_the_database_can_be_shared(tmp_path):
    db = SqliteDatabase(tmp_path / "shared.db")
    store = SqlitePlanStore(db)
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id INTEGER PRIMARY KEY, body TEXT)"]])
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id INTEGER PRIMARY KEY, body TEXT)"]])  # no-op
    with db.transaction() as conn:
        conn.execute("INSERT INTO suggestions (body) VALUES ('x')")
    store.submit(make_plan(seed=1))
    rows = dict(db.connection().execute("SELECT component, version FROM schema_version"))
    assert rows == {"plans": 2, "suggestions": 1}  # plans 2: activation_failed events
    assert db.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(FailedPrecondition, match="schema version 1, newer than this server's 0"):
        db.ensure_schema("suggestions", [])
    store.close()  # a shared database is closed by its owner
    assert store.get("p").version == 1
    db.close()


def test_a_corrupt_row_is_reported_not_returned(store):
    store.submit(make_plan(seed=1))
    with store.db.transaction() as conn:  # a foreign writer swaps the body
        conn.execute("UPDATE plans SET body = ? WHERE id = 'p'", (make_plan(seed=9).SerializeToString(),))
    with pytest.raises(EngineError, match="corrupt"):
        store.get("p")


def test_a_failed_transaction_leaves_no_trace(store):
    with pytest.raises(RuntimeError), store.db.transaction() as conn:
        conn.execute("INSERT INTO plans (id, version, hash, created_at, actor, body) "
                     "VALUES ('p', 1, 'h', 0, '', x'00')")
        raise RuntimeError("boom")
    assert store.submit(make_plan(seed=1)).version == 1


# --------------------------------------------------------------------------- concurrency


def test_threads_submitting_to_one_id_get_contiguous_versions(store, tmp_path):
    n_threads, per_thread = 8, 20
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
    assert versions(tmp_path / "plans.db", "p") == expected
    seeds = {store.get("p", v).determinism.default_seed for v in expected}
    assert seeds == {t * 1000 + i for t in range(n_threads) for i in range(per_thread)}


WORKER = textwrap.dedent("""
    import sys
    import time
    from engine.control.plan_store import SqlitePlanStore
    from protos.planengine.v1 import plan_pb2

    path, plan_id, first_seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = SqlitePlanStore(path)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    print("start", time.time(), flush=True)
    seed = first_seed
    while count < 0 or seed < first_seed + count:
        plan = plan_pb2.ExecutionPlan(id=plan_id, model="smol")
        plan.determinism.default_seed = seed
        stored = store.submit(plan)
        print(stored.version, stored.hash, seed, time.time(), flush=True)  # acknowledged: durable from here
        seed += 1
""")


def start_worker(db: Path, plan_id: str, first_seed: int, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), plan_id, str(first_seed), str(count)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    word, started = proc.stdout.readline().split()
    assert word == "start"
    return float(started)


def test_processes_submitting_to_one_id_get_contiguous_versions(tmp_path):
    db = tmp_path / "plans.db"
    SqlitePlanStore(db).close()
    per_process = 60
    procs = [start_worker(db, "p", k * 10_000, per_process) for k in range(2)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=60)[0].splitlines() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    acks = [[line.split() for line in out[1:]] for out in outputs]
    acknowledged = sorted(int(ack[0]) for worker in acks for ack in worker)
    expected = list(range(1, 2 * per_process + 1))
    assert acknowledged == expected
    assert versions(db, "p") == expected
    # both were writing at the same time: each started before the other's last commit.
    # (Which one wins the lock is up to SQLite's busy handler; it need not alternate.)
    spans = [(float(out[0].split()[1]), float(worker[-1][3])) for out, worker in zip(outputs, acks)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans


def test_sigkill_mid_burst_loses_no_acknowledged_version(tmp_path):
    db = tmp_path / "plans.db"
    acknowledged: dict[int, tuple[str, int]] = {}
    for round_ in range(3):
        proc = start_worker(db, "burst", round_ * 1_000_000, -1)  # submits until killed
        go(proc)
        for _ in range(40 + 17 * round_):  # vary where in the burst the kill lands
            version, digest, seed, _at = proc.stdout.readline().split()
            acknowledged[int(version)] = (digest, int(seed))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        for line in rest.splitlines():
            parts = line.split()
            if len(parts) == 4 and len(parts[1]) == 64:  # a line cut by the kill is not an acknowledgement
                acknowledged[int(parts[0])] = (parts[1], int(parts[2]))

        with SqlitePlanStore(db) as store:
            conn = store.db.connection()
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = versions(db, "burst")
            assert stored == list(range(1, len(stored) + 1))  # contiguous, nothing half-written
            for version, (digest, seed) in acknowledged.items():
                plan = store.get("burst", version)  # verifies the body against its hash
                assert plan.hash == digest == plan_hash(plan)
                assert plan.determinism.default_seed == seed
            n_events = conn.execute("SELECT COUNT(*) FROM plan_events WHERE plan_id = 'burst'").fetchone()[0]
            assert n_events == len(stored)  # each version with its audit event, in one transaction
    assert len(acknowledged) >= 40 + 57 + 74


def test_rollback_of_one_id_skips_other_plans(store):
    p1 = store.submit(make_plan(seed=1), activate=True)
    q1 = store.submit(make_plan("q", seed=1), activate=True)
    p2 = store.submit(make_plan(seed=2), activate=True)
    assert store.rollback("p") == (p1, p2)  # not q1, which was active in between
    assert store.active() == p1
    assert store.rollback() == (q1, p1)


def test_preview_then_named_rollback_is_the_same_as_rollback(store):
    """The control plane loads the target first (rollback_target), then commits it by name."""
    p1 = store.submit(make_plan(seed=1), activate=True)
    p2 = store.submit(make_plan(seed=2), activate=True)
    q1 = store.submit(make_plan("q", seed=1), activate=True)
    p3 = store.submit(make_plan(seed=3), activate=True)
    target = store.rollback_target("p")
    assert target == p2  # the last earlier activation of 'p', skipping q1
    assert store.rollback(target.id, target.version) == (p2, p3)
    for expected, was in [(q1, p2), (p2, q1), (p1, p2)]:  # the stack now: p1, p2, q1, p2
        target = store.rollback_target()
        assert target == expected
        assert store.rollback(target.id, target.version) == (expected, was)
    with pytest.raises(FailedPrecondition, match="no earlier activation"):
        store.rollback_target()
    assert store.active() == p1
    assert len(store.history()) == 4 + 4 + 4  # submits, activations, rollbacks: previews record nothing
