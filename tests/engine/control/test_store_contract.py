"""The PlanStore contract, run against every store: SQLite always, PostgreSQL when its server is
installed (`.ci/postgres.sh`; skipped, saying so, without it). Versions, idempotent resubmit,
activation and rollback, the audit history, durability across a reopen, damaged rows,
concurrent writers and compare-and-swap. What only one database has (SQLite's file and
processes, PostgreSQL's replicas following each other) is in test_sqlite_plan_store.py and
test_postgres_plan_store.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from engine.control.plan_store import PlanEvent, PlanStore, SqlitePlanStore, SqlPlanStore
from engine.control.plans import plan_hash
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound
from protos.planengine.v1 import plan_pb2


def make_plan(plan_id: str = "p", seed: int = 0, description: str = "") -> plan_pb2.ExecutionPlan:
    """Plans differing in content: the seed is hashed, the description is not."""
    plan = plan_pb2.ExecutionPlan(id=plan_id, model="smol", backend=plan_pb2.BACKEND_CPU, description=description)
    plan.determinism.default_seed = seed
    return plan


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request, tmp_path) -> Callable[[], SqlPlanStore]:
    """Opens a new store over one database, of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "plans.db"
        return lambda: SqlitePlanStore(path)
    dsn = request.getfixturevalue("dsn")  # skips without psycopg or a PostgreSQL server
    from engine.control.postgres_store import PostgresPlanStore
    return lambda: PostgresPlanStore(dsn)


@pytest.fixture
def store(opener):
    s = opener()
    yield s
    s.close()


def versions(store: SqlPlanStore, plan_id: str) -> list[int]:
    """The stored versions of `plan_id`, read from the table (not through the store's API)."""
    with store.db.snapshot() as conn:
        rows = store.db.execute(conn, "SELECT version FROM plans WHERE id = ? ORDER BY version", (plan_id,))
        return [r[0] for r in rows.fetchall()]


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


def test_plans_survive_close_and_reopen(opener):
    with opener() as store:
        v1 = store.submit(make_plan(seed=1), activate=True)
        v2 = store.submit(make_plan(seed=2))
    with pytest.raises(EngineError):  # SQLite: "closed" (FailedPrecondition); PostgreSQL: Unavailable
        store.get("p")
    with opener() as store:
        assert store.get("p", 1) == v1 and store.get("p") == v2
        assert store.active() == v1
        assert store.submit(make_plan(seed=3)).version == 3
        assert len(store.history()) == 4


def test_a_corrupt_row_is_reported_not_returned(store):
    store.submit(make_plan(seed=1))
    with store.db.transaction() as conn:  # a foreign writer swaps the body
        store.db.execute(conn, "UPDATE plans SET body = ? WHERE id = 'p'", (make_plan(seed=9).SerializeToString(),))
    with pytest.raises(EngineError, match="corrupt"):
        store.get("p")


def test_a_failed_transaction_leaves_no_trace(store):
    with pytest.raises(RuntimeError), store.db.transaction() as conn:
        store.db.execute(conn, "INSERT INTO plans (id, version, hash, created_at, actor, body) "
                               "VALUES ('p', 1, 'h', 0, '', ?)", (b"\x00",))
        raise RuntimeError("boom")
    assert store.submit(make_plan(seed=1)).version == 1


def test_threads_submitting_to_one_id_get_contiguous_versions(store):
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
    assert versions(store, "p") == expected
    seeds = {store.get("p", v).determinism.default_seed for v in expected}
    assert seeds == {t * 1000 + i for t in range(n_threads) for i in range(per_thread)}


def test_compare_and_swap_activates_only_on_the_current_base(store):
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


def test_compare_and_swap_races_in_threads_have_one_winner_each(store):
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
