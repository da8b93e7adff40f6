"""WeOS agent suggestions without a server: the policy file, every verdict kind, review and
dry-run modes, the audit log, and the reference agent's decisions on hand-built snapshots.
Suggestions are applied, and undone, by the real ControlPlane running the tiny GGUF."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from clock import Clock

from engine.control.agents import (
    AgentPolicy,
    SuggestionLog,
    SuggestionReviewer,
    Unauthenticated,
)
from engine.control.control_plane import ControlPlane
from engine.control.plan_store import SqliteDatabase, SqlitePlanStore
from engine.control.plans import GgufModelReader, ModelInfo, PlanEnvironment, plan_hash, prepare
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services.agent import Advisor, Agent, AgentConfig, Load
from services.servicer import _verdict

ENV = PlanEnvironment.with_models({"smol": ModelInfo(2048, 30, 3, 64), "other": ModelInfo(2048, 30, 3, 64)})
THROUGHPUT = plan_pb2.SCHEDULER_POLICY_THROUGHPUT
LATENCY = plan_pb2.SCHEDULER_POLICY_LATENCY

POLICY = {"agents": {
    "tuner": {"token": "tuner-token", "mode": "auto", "rate_per_minute": 50, "plans": ["default"],
              "fields": {"scheduler_policy": {"values": ["LATENCY", "throughput", "SCHEDULER_POLICY_FIFO"]},
                         "batching.max_batch_size": {"min": 1, "max": 64},
                         "batching.max_batched_tokens": {"min": 1, "max": 8192},
                         "limits.max_watts": {"min": 5, "max": 300},
                         "sampling": {}}},
    "careful": {"token_sha256": hashlib.sha256(b"careful-token").hexdigest(), "mode": "review",
                "fields": {"scheduler_policy": {}, "batching.max_batch_size": {"max": 64}}},
    "dry": {"token": "dry-token", "mode": "dry_run", "fields": {"scheduler_policy": {}}},
    "slow": {"token": "slow-token", "rate_per_minute": 3, "mode": "dry_run", "fields": {"scheduler_policy": {}}},
    "loader": {"token": "loader-token", "mode": "auto", "fields": {"model": {}}},  # a change that loads a model
}}


class TinyModels(PlanEnvironment):
    """Plans name models "smol" and "other", both the tiny GGUF (tests/tiny_gguf.py), and
    "broken", a file whose header reads as the tiny model's but which does not load."""

    files: dict[str, Path]

    def resolve_model(self, name: str, pull_missing: bool = True) -> Path:
        return self.files[name]


@pytest.fixture
def world(tmp_path, tiny):
    info = GgufModelReader()(str(tiny))
    env = TinyModels.with_models({"smol": info, "other": info, "broken": info})
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny.read_bytes()[:4096])  # the header, and no tensors
    env.files = {"smol": tiny, "other": tiny, "broken": broken}
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    control = ControlPlane(store, env)
    control.start(plan_pb2.ExecutionPlan(id="default", model="smol"), actor="test")
    clock = Clock()
    reviewer = SuggestionReviewer(control, AgentPolicy.from_dict(POLICY), SuggestionLog(store.db), monotonic=clock)
    yield reviewer, control, clock
    control.close(0)
    store.close()


def suggest(agent_id: str = "tuner", base: int = 1, plan_id: str = "default", sid: str = "s", **values) -> sg.Suggestion:
    """A suggestion setting `values`, given by path with '__' for '.': batching__max_batch_size=64."""
    s = sg.Suggestion(suggestion_id=sid, agent_id=agent_id, plan_id=plan_id, base_version=base,
                      rationale="because", expected_effect="faster")
    for key, value in values.items():
        path = key.replace("__", ".")
        s.update_mask.paths.append(path)
        *parents, leaf = path.split(".")
        try:
            target = s.patch
            for p in parents:
                target = getattr(target, p)
            setattr(target, leaf, value)
        except (AttributeError, TypeError):
            pass  # a path that names no field: only the mask carries it
    return s


def review(reviewer: SuggestionReviewer, s: sg.Suggestion, token: str = "tuner-token"):
    return reviewer.review(reviewer.authenticate(token), s)


def active(control: ControlPlane) -> plan_pb2.ExecutionPlan:
    """The store's active plan, which must be the one the engine runs."""
    stored = control.store.active()
    assert control.runtime.plan.hash == stored.hash
    return stored


# --------------------------------------------------------------------------- the policy file


def test_policy_file_parses_tokens_modes_and_bounds(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps(POLICY))
    policy = AgentPolicy.load(path)
    assert policy.authenticate("tuner-token").id == "tuner"
    assert policy.authenticate("careful-token").id == "careful"  # matched by its sha256
    assert policy.authenticate("nope") is None and policy.authenticate(None) is None
    tuner = policy.agents["tuner"]
    assert tuner.mode == "auto" and tuner.rate_per_minute == 50 and tuner.plans == {"default"}
    assert tuner.fields["scheduler_policy"].values == {LATENCY, THROUGHPUT, plan_pb2.SCHEDULER_POLICY_FIFO}
    assert tuner.allows("sampling.top_p") and tuner.allows("batching.max_batch_size")
    assert not tuner.allows("batching") and not tuner.allows("model")
    assert policy.agents["careful"].mode == "review" and policy.agents["careful"].rate_per_minute == 30


@pytest.mark.parametrize("agent, message", [
    ({"token": "t", "fields": {"modle": {}}}, "no field 'modle'"),
    ({"token": "t", "fields": {"version": {}}}, "identity fields"),
    ({"token": "t", "fields": {"scheduler_policy": {"min": 1}}}, "needs a numeric field"),
    ({"token": "t", "fields": {"scheduler_policy": {"values": ["FASTEST"]}}}, "not a SchedulerPolicy value"),
    ({"token": "t", "fields": {"batching": {"max": 3}}}, "message field takes no bounds"),
    ({"token": "t", "fields": {"limits.max_watts": {"min": 9, "max": 3}}}, "above max"),
    ({"token": "t", "mode": "yolo", "fields": {"model": {}}}, "mode 'yolo'"),
    ({"token": "t", "rate_per_minute": 0, "fields": {"model": {}}}, "rate_per_minute 0"),
    ({"fields": {"model": {}}}, "exactly one of token, token_sha256"),
    ({"token": "t", "token_sha256": "ab", "fields": {"model": {}}}, "exactly one of token, token_sha256"),
    ({"token_sha256": "xyz", "fields": {"model": {}}}, "64 hex digits"),
    ({"token": "t", "fields": {}}, "at least one plan path"),
    ({"token": "t", "fields": {"model": {}}, "extra": 1}, "unknown keys ['extra']"),
])
def test_policy_file_errors_name_the_problem(tmp_path, agent, message):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": {"a": agent}}))
    with pytest.raises(InvalidArgument, match="agents.json") as err:
        AgentPolicy.load(path)
    assert message in str(err.value)


def test_policy_file_rejects_bad_json_and_shared_tokens(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        AgentPolicy.load(path)
    with pytest.raises(InvalidArgument, match="share a token"):
        AgentPolicy.from_dict({"agents": {"a": {"token": "t", "fields": {"model": {}}},
                                          "b": {"token": "t", "fields": {"model": {}}}}})


def test_authentication(world):
    reviewer, _, _ = world
    assert reviewer.authenticate("tuner-token").id == "tuner"
    for token in (None, "", "wrong"):
        with pytest.raises(Unauthenticated, match="agent token"):
            reviewer.authenticate(token)
    empty = SuggestionReviewer(reviewer.control, AgentPolicy(), reviewer.log)
    with pytest.raises(Unauthenticated, match="no agent policy"):
        empty.authenticate("tuner-token")


# --------------------------------------------------------------------------- verdicts


def test_accepted_creates_and_activates_a_new_version(world):
    reviewer, control, _ = world
    before = active(control)
    v = review(reviewer, suggest(scheduler_policy=THROUGHPUT, batching__max_batch_size=64, sid="first"))
    now = active(control)
    assert (v.decision, v.rejection, v.suggestion_id) == ("accepted", "", "first")
    assert (now.version, v.resulting_version, v.current_version) == (2, 2, 2)
    assert v.resulting_hash == now.hash == plan_hash(now) != before.hash
    assert now.scheduler_policy == THROUGHPUT and now.batching.max_batch_size == 64
    assert now.model == before.model and now.kv_cache == before.kv_cache  # only the masked fields changed
    assert control.store.get("default", 1) == before  # the old version is untouched
    assert "suggestion #1 by agent tuner: because" in now.description
    assert v.reason.startswith("accepted: default@2") and "was default@1" in v.reason
    events = control.store.history("default")
    assert [(e.action, e.version, e.actor) for e in events[:2]] == [("activate", 2, "agent:tuner"),
                                                                   ("submit", 2, "agent:tuner")]


def test_stale_base_names_the_current_version(world):
    reviewer, control, _ = world
    review(reviewer, suggest(scheduler_policy=THROUGHPUT))
    v = review(reviewer, suggest(base=1, scheduler_policy=LATENCY))
    assert (v.decision, v.rejection, v.current_version) == ("rejected", "stale", 2)
    assert "base version 1 is not the active version 2" in v.reason and "rebase on version 2" in v.reason
    v = review(reviewer, suggest(base=2, scheduler_policy=LATENCY))  # rebased: accepted
    assert v.decision == "accepted" and active(control).version == 3


def test_suggestion_for_a_plan_that_is_not_active_is_stale(world):
    reviewer, control, _ = world
    control.store.submit(prepare(plan_pb2.ExecutionPlan(id="other", model="smol"), ENV))
    policy = AgentPolicy.from_dict({"agents": {"any": {"token": "any-token", "mode": "auto",
                                                       "fields": {"scheduler_policy": {}}}}})
    free = SuggestionReviewer(control, policy, reviewer.log)
    v = free.review(free.authenticate("any-token"), suggest("any", plan_id="other", scheduler_policy=LATENCY))
    assert (v.rejection, v.current_version) == ("stale", 0)
    assert "'other' is not the active plan (default@1)" in v.reason


@pytest.mark.parametrize("s, rejection, words", [
    (suggest(batching__max_batch_size=4096), "out_of_bounds", "batching.max_batch_size 4096 is outside 1..64"),
    (suggest(batching__max_batch_size=0), "out_of_bounds", "batching.max_batch_size 0 is outside 1..64"),
    (suggest(limits__max_watts=1.5), "out_of_bounds", "limits.max_watts 1.5 is outside 5..300"),
    (suggest(scheduler_policy=plan_pb2.SCHEDULER_POLICY_ENERGY_BALANCED), "out_of_bounds",
     "SCHEDULER_POLICY_ENERGY_BALANCED is not allowed (allowed: SCHEDULER_POLICY_FIFO, SCHEDULER_POLICY_LATENCY, "
     "SCHEDULER_POLICY_THROUGHPUT)"),
    (suggest(model="other"), "not_authorised", "may not change 'model'"),
    (suggest(scheduler_policy=LATENCY, model="other"), "not_authorised", "may not change 'model'"),
    (suggest(plan_id="elsewhere", scheduler_policy=LATENCY), "not_authorised", "may not change plan 'elsewhere'"),
    (suggest(), "malformed", "a patch must name at least one field"),
    (suggest(plan_id="", scheduler_policy=LATENCY), "malformed", "plan_id is empty"),
    (suggest(base=0, scheduler_policy=LATENCY), "malformed", "base_version is 0"),
    (suggest(schedulr_policy=LATENCY), "malformed", "unknown field path 'schedulr_policy'"),
    (suggest(version=7), "malformed", "'version' is an identity field"),
    (suggest(scheduler_policy__x=1), "malformed", "unknown field path"),
    (suggest("impostor", scheduler_policy=LATENCY), "identity",
     "agent_id 'impostor' is not the authenticated agent 'tuner'"),
    (suggest("", scheduler_policy=LATENCY), "identity", "agent_id '' is not the authenticated agent"),
    (suggest(batching__max_batched_tokens=8), "invalid_plan",
     "max_batched_tokens 8 is below max_batch_size 32"),
    (suggest(sampling__top_p=3.0), "invalid_plan", "sampling.top_p"),
    (suggest(scheduler_policy=plan_pb2.SCHEDULER_POLICY_FIFO), "no_change", "leaves default@1 as it is"),
])
def test_rejections_change_nothing(world, s, rejection, words):
    reviewer, control, _ = world
    before = control.store.history()
    v = review(reviewer, s)
    assert (v.decision, v.rejection) == ("rejected", rejection), v.reason
    assert words in v.reason, v.reason
    assert v.reason.startswith(rejection.replace("_", " ")), v.reason
    assert control.store.history() == before and active(control).version == 1


def test_rate_limit_counts_every_suggestion_over_a_sliding_minute(world):
    reviewer, control, clock = world
    kinds = [review(reviewer, suggest("slow", sid=str(i), scheduler_policy=LATENCY), "slow-token").decision
             for i in range(5)]
    assert kinds == ["dry_run"] * 3 + ["rejected"] * 2
    flood = review(reviewer, suggest("slow", scheduler_policy=LATENCY), "slow-token")
    assert flood.rejection == "rate_limit" and "3 suggestions per minute; retry in 60 s" in flood.reason
    clock.t += 30
    assert review(reviewer, suggest("slow", scheduler_policy=LATENCY), "slow-token").rejection == "rate_limit"
    clock.t += 31  # the first three left the window
    assert review(reviewer, suggest("slow", scheduler_policy=LATENCY), "slow-token").decision == "dry_run"
    assert review(reviewer, suggest(scheduler_policy=LATENCY)).decision == "accepted"  # per agent


def test_dry_run_reports_the_plan_and_applies_nothing(world):
    reviewer, control, _ = world
    v = review(reviewer, suggest("dry", scheduler_policy=LATENCY), "dry-token")
    assert (v.decision, v.resulting_version, v.current_version) == ("dry_run", 2, 1)
    assert v.resulting_plan.scheduler_policy == LATENCY and v.resulting_hash == plan_hash(v.resulting_plan)
    assert "would create default@2" in v.reason
    assert active(control).version == 1
    with pytest.raises(NotFound):
        control.store.get("default", 2)
    applied = review(reviewer, suggest(scheduler_policy=LATENCY))
    assert (applied.resulting_version, applied.resulting_hash) == (2, v.resulting_hash)  # as predicted


def test_review_mode_waits_for_an_operator(world):
    reviewer, control, _ = world
    v = review(reviewer, suggest("careful", scheduler_policy=THROUGHPUT), "careful-token")
    assert (v.decision, v.resulting_version, v.current_version) == ("pending_review", 0, 1)
    assert v.resulting_plan.scheduler_policy == THROUGHPUT and active(control).version == 1
    record = reviewer.decide(v.audit_id, approve=True, actor="alice", note="looks fine")
    assert record.verdict.decision == "accepted" and record.decided_by == "alice (looks fine)"
    assert active(control).version == 2 and active(control).scheduler_policy == THROUGHPUT
    assert control.store.history("default")[0].actor == "agent:careful approved by alice"
    with pytest.raises(FailedPrecondition, match="not pending review \\(it is accepted\\)"):
        reviewer.decide(v.audit_id, approve=False, actor="bob")
    with pytest.raises(NotFound):
        reviewer.decide(999, approve=True, actor="bob")


def test_review_reject_and_stale_approval(world):
    reviewer, control, _ = world
    first = review(reviewer, suggest("careful", scheduler_policy=THROUGHPUT), "careful-token")
    second = review(reviewer, suggest("careful", sid="2", scheduler_policy=LATENCY), "careful-token")
    record = reviewer.decide(first.audit_id, approve=False, actor="bob", note="not now")
    assert (record.verdict.decision, record.verdict.rejection) == ("rejected", "operator")
    assert "operator: rejected by bob (not now)" in record.verdict.reason
    review(reviewer, suggest(scheduler_policy=THROUGHPUT))  # the plan moves on to version 2
    record = reviewer.decide(second.audit_id, approve=True, actor="bob")
    assert (record.verdict.rejection, record.verdict.current_version) == ("stale", 2)
    assert active(control).version == 2


def test_activation_failure_is_a_rejection_and_stores_nothing(world):
    reviewer, control, _ = world
    v = review(reviewer, suggest("loader", model="broken"), "loader-token")
    assert (v.rejection, v.current_version) == ("activation_failed", 1), v.reason
    assert v.reason.startswith("activation failed: ")
    assert active(control).version == 1 and control.runtime.plan.model == "smol"  # still serving version 1
    with pytest.raises(NotFound):
        control.store.get("default", 2)  # a plan that does not load is never stored
    failed = control.store.history("default")[0]
    assert (failed.action, failed.version, failed.actor) == ("activation_failed", 0, "agent:loader")


def test_the_control_planes_rollback_undoes_accepted_suggestions(world):
    reviewer, control, _ = world
    v1 = active(control)
    live = review(reviewer, suggest(scheduler_policy=THROUGHPUT))  # applied live, same model
    reload = review(reviewer, suggest("loader", base=2, model="other"), "loader-token")  # loads a model
    assert (live.decision, reload.decision) == ("accepted", "accepted")
    assert active(control).version == 3 and control.runtime.plan.model == "other"

    now, was = control.rollback(actor="ops")  # the reload undone: the model loads again
    assert (now.version, was.version) == (2, 3)
    assert active(control).model == "smol" and control.runtime.plan.scheduler_policy == THROUGHPUT
    now, was = control.rollback(actor="ops")  # the live change undone
    assert (now.version, was.version) == (1, 2) and active(control) == v1
    with pytest.raises(FailedPrecondition, match="no earlier activation"):
        control.rollback()
    assert [(e.action, e.version, e.actor) for e in control.store.history("default")[:2]] == [
        ("rollback", 1, "ops"), ("rollback", 2, "ops")]

    # a rollback to a version that does not load changes nothing, and says so in the history
    patch = plan_pb2.ExecutionPlan()
    patch.CopyFrom(v1)
    for name in ("version", "hash", "created_at"):
        patch.ClearField(name)
    patch.model = "broken"
    broken = control.store.submit(prepare(patch, control.env), actor="ops")
    with pytest.raises(EngineError):
        control.rollback("default", broken.version, actor="ops")
    assert active(control) == v1
    assert [(e.action, e.version) for e in control.store.history("default")[:2]] == [
        ("activation_failed", broken.version), ("submit", broken.version)]


# --------------------------------------------------------------------------- the audit log


def test_audit_log_keeps_every_suggestion_and_verdict_durably(world, tmp_path):
    reviewer, control, _ = world
    review(reviewer, suggest(sid="a", scheduler_policy=THROUGHPUT, batching__max_batch_size=48))
    review(reviewer, suggest(sid="b", model="other"))
    pending = review(reviewer, suggest("careful", base=2, sid="c", scheduler_policy=LATENCY), "careful-token")
    reviewer.decide(pending.audit_id, approve=True, actor="alice")

    # a second connection to the same file, as after a restart
    db = SqliteDatabase(tmp_path / "plans.sqlite3")
    log = SuggestionLog(db)
    records = log.list()
    assert [r.suggestion.suggestion_id for r in records] == ["c", "b", "a"]
    c, b, a = records
    assert (a.agent_id, a.mode, a.verdict.decision, a.verdict.resulting_version) == ("tuner", "auto", "accepted", 2)
    assert json.loads(a.patch_json) == {"scheduler_policy": "SCHEDULER_POLICY_THROUGHPUT",
                                        "batching.max_batch_size": 48}
    assert a.suggestion.rationale == "because" and a.received_at > 0 and a.verdict.decided_at >= a.received_at
    assert (b.verdict.rejection, b.decided_by) == ("not_authorised", "policy")
    assert (c.mode, c.verdict.decision, c.verdict.resulting_version, c.decided_by) == ("review", "accepted", 3, "alice")
    assert [r.suggestion.suggestion_id for r in log.list(agent_id="careful")] == ["c"]
    assert [r.suggestion.suggestion_id for r in log.list(decision="rejected")] == ["b"]
    assert len(log.list(limit=2)) == 2 and log.list(plan_id="nope") == []
    # both verdicts on "c" are kept: pending, then the operator's
    rows = db.connection().execute("SELECT decision, decided_by FROM suggestion_verdicts WHERE suggestion = ? "
                                   "ORDER BY seq", (c.id,)).fetchall()
    assert rows == [("pending_review", "policy"), ("accepted", "alice")]
    db.close()
    with pytest.raises(InvalidArgument, match="decision"):
        reviewer.list(decision="maybe")


def test_concurrent_agents_never_both_build_on_one_version(world):
    reviewer, control, _ = world
    results = []

    def go(policy: int) -> None:
        results.append(review(reviewer, suggest(sid=str(policy), scheduler_policy=policy)))

    threads = [threading.Thread(target=go, args=(p,)) for p in (THROUGHPUT, LATENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v.decision for v in results) == ["accepted", "rejected"]
    assert [v.rejection for v in results if v.decision == "rejected"] == ["stale"]
    assert active(control).version == 2


# --------------------------------------------------------------------------- the reference agent


def plan_with(policy=plan_pb2.SCHEDULER_POLICY_FIFO, batch=32, watts=0.0, version=1) -> plan_pb2.ExecutionPlan:
    plan = prepare(plan_pb2.ExecutionPlan(id="default", model="smol", scheduler_policy=policy), ENV)
    plan.batching.max_batch_size, plan.limits.max_watts, plan.version = batch, watts, version
    return plan


def loads(*states: tuple[int, int], start: float = 0.0, power: float = 0.0) -> list[Load]:
    """(running, waiting) pairs, one second apart."""
    return [Load(start + i, "default", 1, running=r, waiting=w, power_w=power) for i, (r, w) in enumerate(states)]


def test_advisor_waits_for_a_busy_streak_then_asks_for_throughput():
    advisor = Advisor(AgentConfig(busy_waiting=4, busy_after=2, max_batch_size=64))
    plan = plan_with()
    first, second = loads((32, 5), (32, 9))
    assert advisor.step(first, plan) is None  # one busy snapshot is not a trend
    p = advisor.step(second, plan)
    assert p.goal == "throughput" and p.paths == ("scheduler_policy", "batching.max_batch_size")
    assert p.patch.scheduler_policy == THROUGHPUT and p.patch.batching.max_batch_size == 64
    assert "9 requests waiting" in p.rationale and "fifo" in p.rationale and p.expected_effect
    s = p.suggestion("tuner", plan, "x")
    assert (s.plan_id, s.base_version, list(s.update_mask.paths)) == ("default", 1, list(p.paths))


def test_advisor_busy_proposals_depend_on_the_plan():
    advisor = Advisor(AgentConfig(busy_after=1, max_batch_size=64))
    load = loads((4, 6))[0]
    p = advisor.propose("throughput", load, plan_with(THROUGHPUT, batch=8))
    assert p.paths == ("batching.max_batch_size",) and p.patch.batching.max_batch_size == 16  # doubles
    assert advisor.propose("throughput", load, plan_with(THROUGHPUT, batch=64)) is None  # nothing left to do
    p = advisor.propose("throughput", load, plan_with(batch=64))
    assert p.paths == ("scheduler_policy",)


def test_advisor_idle_asks_for_latency_and_power_over_target_for_a_cap():
    advisor = Advisor(AgentConfig(idle_after=3))
    plan = plan_with(THROUGHPUT)
    proposals = [advisor.step(load, plan) for load in loads((0, 0), (0, 0), (0, 0))]
    assert proposals[:2] == [None, None] and proposals[2].paths == ("scheduler_policy",)
    assert proposals[2].patch.scheduler_policy == LATENCY
    assert Advisor(AgentConfig(idle_after=1)).step(loads((0, 0))[0], plan_with(LATENCY)) is None

    hot = Advisor(AgentConfig(power_target_w=40, power_after=2, idle_after=1))
    steps = [hot.step(load, plan) for load in loads((1, 0), (0, 0), power=55.0)]
    assert steps[0] is None and steps[1].goal == "power"  # power comes before the idle rule
    assert steps[1].paths == ("limits.max_watts",) and steps[1].patch.limits.max_watts == 40
    assert hot.propose("power", loads((0, 0))[0], plan_with(watts=35)) is None  # already capped lower


def test_advisor_cools_down_after_a_verdict_and_is_deterministic():
    config = AgentConfig(busy_after=1, cooldown_s=10)
    plan = plan_with()
    trace = loads(*[(8, 8)] * 15)

    def run() -> list[float]:
        advisor, times = Advisor(config), []
        for load in trace:
            if advisor.step(load, plan) is not None:
                times.append(load.at)
                advisor.settled(load.at)
        return times

    assert run() == run() == [0.0, 10.0]


class InProcessClient:
    """What Agent uses of PlanEngineClient, answered by a reviewer in this process."""

    def __init__(self, reviewer: SuggestionReviewer, token: str):
        self.reviewer, self.token, self.metadata = reviewer, token, []
        self.stub = self

    def active_plan(self):
        return self.reviewer.control.store.active()

    def get_plan(self, plan_id, version=0):
        return self.reviewer.control.store.get(plan_id, version)

    def Suggest(self, requests, metadata=()):
        agent = self.reviewer.authenticate(self.token)
        for s in requests:
            yield _verdict(self.reviewer.review(agent, s))


def test_agent_proposes_and_rebases_on_a_stale_verdict(world):
    reviewer, control, _ = world
    agent = Agent(InProcessClient(reviewer, "tuner-token"), AgentConfig("tuner", busy_after=1, max_batch_size=64))
    # someone else moves the plan to version 2 after the agent's snapshot of version 1
    agent.on_load(Load(0, "default", 1, running=0, waiting=0))  # reads version 1
    review(reviewer, suggest(sid="other", batching__max_batch_size=48))
    exchange = agent.on_load(Load(1, "default", 1, running=32, waiting=12))
    first, second = agent.exchanges
    assert first.verdict.rejection == sg.REJECTION_STALE and first.verdict.current_version == 2
    assert second is exchange and second.suggestion.base_version == 2
    assert exchange.verdict.decision == sg.SuggestionVerdict.DECISION_ACCEPTED
    now = active(control)
    assert (now.version, now.scheduler_policy, now.batching.max_batch_size) == (3, THROUGHPUT, 64)
    assert agent.on_load(Load(2, "default", 3, running=32, waiting=12)) is None  # cooling down
    agent.close()


def test_reference_policy_example_in_the_docs_parses():
    text = (Path(__file__).resolve().parents[3] / "docs" / "05_weos_integration.md").read_text()
    block = text.split("```json\n", 1)[1].split("```", 1)[0]
    policy = AgentPolicy.from_dict(json.loads(block))
    assert policy.agents
