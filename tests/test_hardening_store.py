"""Issue 13, items 4-6 below the RPC layer: plans load before they are committed, a plan that
cannot load never blocks a start, the audit log stays bounded, the store's failures have the
right codes (DATA_LOSS, RESOURCE_EXHAUSTED), and a bad model path is a clear error.

Every test runs on the tiny synthetic model (tests/tiny_gguf.py); the store tests run on
SQLite and, when PostgreSQL is installed (`.ci/postgres.sh`), on PostgreSQL too.
"""

from __future__ import annotations

import logging
import shutil

import pytest
from gguf import GGMLQuantizationType
from tiny_gguf import write_tiny_gguf

from engine.control import control_plane as cp
from engine.control.control_plane import ControlPlane
from engine.control.plan_store import SqliteDatabase, SqlitePlanStore
from engine.control.plans import InvalidPlan, ModelInfo, PlanEnvironment, prepare
from engine.control.agents import (
    MAX_LIST,
    MAX_LIST_BYTES,
    MAX_TEXT,
    AgentPolicy,
    SuggestionLog,
    SuggestionReviewer,
)
from engine.errors import DataLoss, EngineError, InvalidArgument, ResourceExhausted, shown
from engine.model import registry
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    if request.param == "sqlite":
        s = SqlitePlanStore(tmp_path / "plans.sqlite3")
    else:  # the `dsn` fixture (tests/conftest.py) skips, saying why, without psycopg or a server
        dsn = request.getfixturevalue("dsn")
        from engine.control.postgres_store import PostgresPlanStore
        s = PostgresPlanStore(dsn)
    yield s
    s.close()


@pytest.fixture
def models(tmp_path):
    """A good tiny model, a copy of it, and one whose header reads but whose tensors cannot load."""
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    other = tmp_path / "tiny-copy.gguf"
    shutil.copy(good, other)
    bad = write_tiny_gguf(tmp_path / "iq2.gguf", odd_tensor_type=GGMLQuantizationType.IQ2_XXS)
    return good, other, bad


def plan(model, plan_id: str = "default", **fields) -> plan_pb2.ExecutionPlan:
    p = plan_pb2.ExecutionPlan(id=plan_id, model=str(model), **fields)
    return p


@pytest.fixture
def started(any_store, models):
    control = ControlPlane(any_store, PlanEnvironment())
    control.start(plan(models[0]))
    yield control
    control.close(1)


def actions(store, plan_id: str = "") -> list[str]:
    return [e.action for e in reversed(store.history(plan_id))]


# --------------------------------------------------------------------------- item 4: load before commit


def test_submit_and_activate_with_a_model_that_cannot_load_stores_nothing(started, models):
    store = started.store
    before = store.get("default")
    events = len(store.history())
    with pytest.raises(EngineError, match="IQ2_XXS"):
        started.submit_plan(plan(models[2]), activate=True, actor="op")
    assert store.get("default") == before  # no new version
    assert store.active() == before and started.runtime.plan == before
    history = store.history()
    assert len(history) == events + 1
    failed = history[0]
    assert failed.action == "activation_failed" and failed.plan_id == "default" and failed.version == 0
    assert "IQ2_XXS" in failed.detail and failed.actor == "op"


def test_activating_a_stored_version_that_cannot_load_is_audited(started, models):
    store = started.store
    broken = started.submit_plan(plan(models[2], description="broken"))[0]  # stored, not active
    with pytest.raises(EngineError, match="IQ2_XXS"):
        started.activate("default", broken.version, actor="op")
    assert store.active().version == 1
    event = store.history()[0]
    assert (event.action, event.version) == ("activation_failed", broken.version)


def test_compare_and_swap_commits_only_after_the_model_is_loaded(started, models, monkeypatch):
    """The crash window of `auto` mode: while the new model loads, the store must still say the
    old version is active (a kill -9 then leaves a store that starts)."""
    store = started.store
    seen = []

    class Watching(cp.Runtime):
        def __init__(self, p, *args, **kwargs):
            seen.append(store.active().version)
            super().__init__(p, *args, **kwargs)

    monkeypatch.setattr(cp, "Runtime", Watching)
    stored, previous = started.submit_if_active(plan(models[1]), base_version=1, actor="agent:t")
    assert seen == [1]  # loading happened while version 1 was still the active one
    assert (stored.version, previous.version) == (2, 1)
    assert store.active() == stored == started.runtime.plan


def test_compare_and_swap_with_a_model_that_cannot_load_leaves_no_version(started, models):
    store = started.store
    with pytest.raises(EngineError, match="IQ2_XXS"):
        started.submit_if_active(plan(models[2]), base_version=1, actor="agent:t")
    assert store.get("default").version == 1 and store.active().version == 1
    assert actions(store) == ["submit", "activate", "activation_failed"]


def test_a_lost_compare_and_swap_discards_the_loaded_runtime(started, models):
    store = started.store
    with pytest.raises(EngineError, match="stale"):
        started.submit_if_active(plan(models[1]), base_version=7)
    assert store.get("default").version == 1 and started.runtime.plan.version == 1


def test_start_falls_back_to_the_newest_version_that_loads(any_store, models, caplog, tmp_path):
    good, other, _ = models
    env = PlanEnvironment()
    v1 = any_store.submit(prepare(plan(good), env), actor="op", activate=True)
    v2 = any_store.submit(prepare(plan(other, description="v2"), env), actor="op")
    v3 = any_store.submit(prepare(plan(good, kv_cache=plan_pb2.KVCache(block_size=8)), env), actor="op",
                          activate=True)
    assert any_store.active() == v3
    # the active version's model is replaced by one that cannot load (as after a crash mid-change)
    write_tiny_gguf(good, odd_tensor_type=GGMLQuantizationType.IQ2_XXS)
    control = ControlPlane(any_store, PlanEnvironment())
    with caplog.at_level(logging.ERROR):
        serving = control.start()
    try:
        assert serving == v2 == control.runtime.plan == any_store.active()  # v1 shares v3's broken file
        assert control.fallback and "default@3" in control.fallback and "default@2" in control.fallback
        assert any("default@3" in r.getMessage() and "cannot load" in r.getMessage() for r in caplog.records)
        events = any_store.history()
        assert [e.action for e in events[:2]] == ["rollback", "activation_failed"]
        assert (events[1].version, events[0].version) == (3, 2)
    finally:
        control.close(1)
    del v1


def test_start_with_no_version_that_loads_says_which_failed(any_store, models):
    good, _, bad = models
    any_store.submit(prepare(plan(good), PlanEnvironment()), actor="op", activate=True)
    good.unlink()
    control = ControlPlane(any_store, PlanEnvironment())
    with pytest.raises(EngineError, match="default@1"):
        control.start()


# --------------------------------------------------------------------------- item 5: the audit log stays bounded

ENV = PlanEnvironment.with_models({"smol": ModelInfo(2048, 30, 3, 64)})
POLICY = {"agents": {
    "tuner": {"token": "tuner-token", "mode": "dry_run", "rate_per_minute": 2,
              "fields": {"scheduler_policy": {}, "model": {}}}}}


class Control:
    def __init__(self, store, env=ENV):
        self.store, self.env = store, env


@pytest.fixture
def audit(tmp_path):
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    store.submit(prepare(plan("smol"), ENV), actor="test", activate=True)
    log = SuggestionLog(store.db)
    reviewer = SuggestionReviewer(Control(store), AgentPolicy.from_dict(POLICY), log)
    yield reviewer, store, tmp_path / "plans.sqlite3"
    store.close()


def suggestion(rationale: str = "because", sid: str = "s", **patch) -> sg.Suggestion:
    s = sg.Suggestion(suggestion_id=sid, agent_id="tuner", plan_id="default", base_version=1, rationale=rationale)
    s.update_mask.paths.append("scheduler_policy")
    s.patch.scheduler_policy = plan_pb2.SCHEDULER_POLICY_LATENCY
    for k, v in patch.items():
        setattr(s.patch, k, v)
    return s


def store_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_oversized_and_over_rate_suggestions_are_rejected_before_they_are_stored(audit):
    reviewer, store, path = audit
    agent = reviewer.authenticate("tuner-token")
    before = store_bytes(path)
    verdicts = [reviewer.review(agent, suggestion("x" * (8 << 20), sid=f"big{i}")) for i in range(10)]
    assert all(v.decision == "rejected" for v in verdicts)
    assert verdicts[0].rejection == "malformed" and f"at most {MAX_TEXT}" in verdicts[0].reason
    assert verdicts[-1].rejection == "rate_limit"  # 2 a minute: the rest are over the rate
    assert store_bytes(path) - before < 2 << 20  # ten 8 MB rationales grew it 185 MB before
    for record in reviewer.list(limit=10):
        assert record.verdict is not None and record.verdict.decision == "rejected"
        assert len(record.suggestion.rationale) <= MAX_TEXT + 100


def test_an_oversized_patch_is_rejected_and_not_stored_in_full(audit):
    reviewer, store, path = audit
    agent = reviewer.authenticate("tuner-token")
    s = suggestion(sid="p")
    s.update_mask.paths.append("model")
    s.patch.model = "m" * (1 << 20)
    v = reviewer.review(agent, s)
    assert (v.decision, v.rejection) == ("rejected", "malformed") and "patch" in v.reason
    record = reviewer.log.get(v.audit_id)
    assert len(record.suggestion.SerializeToString()) < 64 << 10 and len(record.patch_json) < 64 << 10


def test_listing_suggestions_is_bounded(audit):
    reviewer, store, _ = audit
    log = reviewer.log
    huge = suggestion("r" * (4 << 20), sid="old")  # a row stored in full by an older server
    audit_id = log.received("tuner", huge, "dry_run", 0.0)
    records = reviewer.list(limit=10 ** 6)
    assert [r.id for r in records] == [audit_id]
    assert len(records[0].suggestion.rationale) <= MAX_TEXT + 100
    for i in range(MAX_LIST + 5):
        log.received("tuner", suggestion(sid=str(i)), "dry_run", 0.0)
    assert len(reviewer.list(limit=10 ** 6)) == MAX_LIST
    assert len(reviewer.list()) == 100  # the default
    for i in range(MAX_LIST):  # the largest records that can be stored: the reply stays bounded in bytes
        log.received("tuner", suggestion("r" * MAX_TEXT, sid=str(i), description="d" * 1000), "dry_run", 0.0)
    listed = reviewer.list(limit=MAX_LIST)
    assert 0 < len(listed) < MAX_LIST
    assert sum(r.suggestion.ByteSize() + len(r.patch_json) for r in listed) <= MAX_LIST_BYTES


def test_a_full_disk_is_resource_exhausted_naming_the_store(tmp_path):
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    conn = store.db.connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # this connection's database is now full
    with pytest.raises(ResourceExhausted, match="plans.sqlite3") as err:
        for seed in range(200):
            p = plan("smol", description="d" * 1000)
            p.determinism.default_seed = seed
            store.submit(prepare(p, ENV))
    assert "full" in str(err.value)
    store.close()


# --------------------------------------------------------------------------- item 6: the right codes


def test_a_model_path_longer_than_the_file_system_allows_is_invalid_argument(tmp_path):
    long_path = str(tmp_path / ("a" * 300 + ".gguf"))
    with pytest.raises(InvalidArgument, match="too long") as err:
        registry.resolve(long_path, pull_missing=False)
    assert len(str(err.value)) < 600  # the path is shown truncated
    with pytest.raises(InvalidPlan) as err:
        prepare(plan(long_path), PlanEnvironment())
    assert [v.field for v in err.value.violations] == ["model"]


def test_a_long_model_path_in_a_suggestion_gets_a_verdict(tmp_path):
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = PlanEnvironment()
    store.submit(prepare(plan(good), env), actor="test", activate=True)
    reviewer = SuggestionReviewer(Control(store, env), AgentPolicy.from_dict(POLICY), SuggestionLog(store.db))
    s = suggestion(sid="long")
    s.update_mask.paths.append("model")
    s.patch.model = "/tmp/" + "a" * 300
    v = reviewer.review(reviewer.authenticate("tuner-token"), s)
    assert (v.decision, v.rejection) == ("rejected", "invalid_plan") and "too long" in v.reason
    assert reviewer.log.get(v.audit_id).verdict.decision == "rejected"
    store.close()


def test_echoed_values_are_truncated(tmp_path):
    text = shown("x" * 100_000)
    assert len(text) < 300 and "100000 characters" in text
    assert shown("short") == "'short'"
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    with pytest.raises(EngineError) as err:
        store.get("y" * 100_000)
    assert err.value.code == "NOT_FOUND" and len(str(err.value)) < 600
    store.close()


def test_a_corrupt_row_is_data_loss_naming_it_and_other_reads_go_on(tmp_path, caplog):
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    store.submit(prepare(plan("smol", plan_id="a"), ENV))
    store.submit(prepare(plan("smol", plan_id="b"), ENV), activate=True)
    conn = store.db.connection()
    conn.execute("UPDATE plans SET body = x'ffffff' WHERE id = 'a'")
    with pytest.raises(DataLoss, match=r"plan a@1") as err:
        store.get("a")
    assert err.value.code == "DATA_LOSS"
    assert [p.id for p in store.list_latest()] == ["b"]  # the corrupt row is skipped, and logged:
    assert any("a@1" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert store.active().id == "b"
    conn.execute("UPDATE plans SET hash = 'abc' WHERE id = 'b'")
    with pytest.raises(DataLoss, match=r"plan b@1"):
        store.active()
    store.close()


def test_a_corrupt_store_file_is_named_at_open(tmp_path):
    path = tmp_path / "plans.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DataLoss, match=str(path)):
        SqlitePlanStore(path)
    with pytest.raises(DataLoss, match=str(path)):
        SqliteDatabase(path).connection()
