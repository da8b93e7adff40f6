"""Canary trials through the real ControlPlane on the tiny GGUF: a trial is kept, rolled back (by
ControlPlane.rollback, with the reason in PlanHistory and the trial log) or abandoned, judged on
recorded request samples and a fake clock: no timing assertion anywhere."""

from __future__ import annotations

import pytest
from clock import Clock

from engine.control.control_plane import ControlPlane, GenerateInput
from engine.control.objectives import Objective, RequestSample
from engine.control.plan_store import SqlitePlanStore
from engine.control.plans import PlanEnvironment
from engine.control.trials import TrialLog, Trials
from protos.planengine.v1 import plan_pb2


@pytest.fixture
def world(tmp_path, tiny):
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    control = ControlPlane(store, PlanEnvironment())
    control.start(plan_pb2.ExecutionPlan(id="default", model=str(tiny)))
    clock = Clock()
    trials = Trials(control, TrialLog(store.db), clock=clock, background=False)
    yield control, trials, clock
    trials.close()
    control.close(1)
    store.close()


def activate_change(control: ControlPlane, **batching) -> tuple[plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan]:
    """What an accepted suggestion does: the changed plan as the next version, through the control plane."""
    base = control.store.active()
    changed = plan_pb2.ExecutionPlan()
    changed.CopyFrom(base)
    for name in ("version", "hash", "created_at"):
        changed.ClearField(name)
    for k, v in batching.items():
        setattr(changed.batching, k, v)
    stored, _ = control.submit_if_active(changed, base.version, actor="agent:tuner")
    return base, stored


def feed(trials: Trials, plan: plan_pb2.ExecutionPlan, clock: Clock, n: int, *, tokens=10, seconds=1.0, ttft=0.1,
         failed=False) -> None:
    """Recorded requests of `plan`, one after another on the fake clock."""
    for _ in range(n):
        start = clock.t
        clock.t += seconds
        trials.samples.add(plan.id, plan.version, RequestSample(start, clock.t, ttft, (0.01,) * (tokens - 1), tokens,
                                                                0.5, failed))


OBJ = Objective("max_tokens_per_s", max_ttft_p99_s=1.0, trial_requests=6, tolerance=0.05, min_requests=3)


def test_a_better_trial_is_kept(world):
    control, trials, clock = world
    feed(trials, control.store.active(), clock, 6, tokens=10)  # 10 tok/s before
    base, version = activate_change(control, max_batch_size=4)
    trial = trials.start(7, base, version, OBJ)
    assert trials.running("default") == trial and trial.state == "running"
    feed(trials, version, clock, 5, tokens=20)
    assert trials.check() == []  # the window is 6 requests
    feed(trials, version, clock, 1, tokens=20)
    [done] = trials.check()
    assert done.state == "kept" and done.gain == pytest.approx(2.0) and "x2.00" in done.reason
    assert control.store.active().version == version.version and trials.running("default") is None
    assert trials.log.for_suggestions([7])[7].state == "kept"


def test_a_trial_that_breaks_a_constraint_is_rolled_back_within_its_window(world):
    control, trials, clock = world
    feed(trials, control.store.active(), clock, 6)
    base, version = activate_change(control, max_batch_size=1)
    trials.start(8, base, version, OBJ)
    feed(trials, version, clock, 3, tokens=40, ttft=5.0)  # faster, but first tokens come 5 s late
    [done] = trials.check()  # 3 of the 6 requests are enough to see it
    assert done.state == "rolled_back" and "p99 TTFT 5 s > 1 s" in done.reason
    assert done.trial.requests == 3
    active = control.store.active()
    assert active.version == base.version and control.runtime.plan.version == base.version
    assert control.runtime.worker._limits.max_batch_size == base.batching.max_batch_size  # applied live
    last = control.history("default")[0]
    assert last.action == "rollback" and last.version == base.version
    assert "trial #" in last.actor and "suggestion #8" in last.actor and "p99 TTFT" in last.actor
    record = trials.log.for_suggestions([8])[8]
    assert record.state == "rolled_back" and record.base.requests == 6 and record.trial.ttft_p99_s == 5.0


def test_a_worse_trial_is_rolled_back_at_the_end_of_its_window(world):
    control, trials, clock = world
    feed(trials, control.store.active(), clock, 6, tokens=20)
    base, version = activate_change(control, max_batch_size=2)
    trials.start(9, base, version, OBJ)
    feed(trials, version, clock, 6, tokens=10)
    [done] = trials.check()
    assert done.state == "rolled_back" and "worse: 10.0 tok/s against 20.0 tok/s for v1 (x0.50)" in done.reason
    assert control.store.active().version == base.version


def test_failed_requests_roll_a_trial_back(world):
    control, trials, clock = world
    base, version = activate_change(control, max_batch_size=2)
    trials.start(10, base, version, OBJ)
    feed(trials, version, clock, 1, tokens=0, ttft=None, failed=True)
    [done] = trials.check()
    assert done.state == "rolled_back" and "1 of 1 requests failed" in done.reason


def test_too_little_traffic_by_the_deadline_is_inconclusive_and_rolled_back(world):
    control, trials, clock = world
    base, version = activate_change(control, max_batch_size=2)
    trials.start(11, base, version, Objective("max_tokens_per_s", trial_seconds=30.0, min_requests=3))
    feed(trials, version, clock, 1)
    assert trials.check() == []
    clock.t += 30
    [done] = trials.check()
    assert done.state == "rolled_back" and "inconclusive" in done.reason


def test_an_operator_activation_during_the_trial_abandons_it(world):
    control, trials, clock = world
    base, version = activate_change(control, max_batch_size=2)
    trials.start(12, base, version, OBJ)
    control.rollback(actor="operator")  # someone else changed the plan
    [done] = trials.check()
    assert done.state == "abandoned" and control.store.active().version == base.version
    assert [e.action for e in control.history("default")].count("rollback") == 1  # nothing undone twice


def test_finished_requests_reach_the_trials_labelled_by_plan_version(world):
    control, trials, clock = world
    handle, stamp = control.generate(GenerateInput(ids=[1, 2, 3], max_tokens=3, ignore_eos=True))
    final = list(handle.events())[-1]
    assert final.completion_tokens == 3
    [sample] = trials.samples.since("default", stamp.version, 0)
    assert sample.tokens == 3 and not sample.failed and sample.ttft_s is not None


def test_trials_left_running_by_a_previous_process_are_abandoned_at_start(world, tmp_path):
    control, trials, clock = world
    base, version = activate_change(control, max_batch_size=2)
    trials.start(13, base, version, OBJ)
    again = Trials(control, TrialLog(control.store.db), clock=clock, background=False)
    assert again.log.for_suggestions([13])[13].state == "abandoned"
    assert again.running("default") is None


# --------------------------------------------------------------------------- through the reviewer

POLICY = {"agents": {"tuner": {"token": "t", "mode": "auto", "fields": {"batching.max_batch_size": {"min": 1}}}}}


def suggestion(plan, batch: int, sid: str = "s"):
    from protos.planengine.v1 import suggestion_pb2 as sg
    s = sg.Suggestion(suggestion_id=sid, agent_id="tuner", plan_id=plan.id, base_version=plan.version,
                      rationale="try it")
    s.update_mask.paths.append("batching.max_batch_size")
    s.patch.batching.max_batch_size = batch
    return s


def test_an_accepted_suggestion_runs_as_a_trial_and_its_outcome_is_listed(tmp_path, tiny):
    from engine.control.agents import AgentPolicy, SuggestionLog, SuggestionReviewer
    from protos.planengine.v1 import suggestion_pb2 as sg
    from services.servicer import _suggestion_record
    store = SqlitePlanStore(tmp_path / "plans.sqlite3")
    control = ControlPlane(store, PlanEnvironment())
    initial = plan_pb2.ExecutionPlan(id="default", model=str(tiny))
    o = initial.objective
    o.goal, o.max_ttft_p99_s, o.trial_requests, o.min_requests = 1, 1.0, 4, 2
    control.start(initial)
    clock = Clock()
    trials = Trials(control, TrialLog(store.db), clock=clock, background=False)
    reviewer = SuggestionReviewer(control, AgentPolicy.from_dict(POLICY), SuggestionLog(store.db), trials=trials)
    agent = reviewer.authenticate("t")
    try:
        base = store.active()
        v = reviewer.review(agent, suggestion(base, 1, "bad"))
        assert v.decision == "accepted" and v.reason.startswith("accepted as a trial: default@2")
        assert "for 4 requests" in v.reason and "p99 TTFT <= 1 s" in v.reason
        again = reviewer.review(agent, suggestion(store.active(), 2, "next"))
        assert again.rejection == "trial_running" and "on trial" in again.reason
        [listed_running] = [r for r in reviewer.list() if r.id == v.audit_id]
        assert listed_running.trial.state == "running"
        feed(trials, store.active(), clock, 2, ttft=9.0)
        [done] = trials.check()
        assert done.state == "rolled_back" and store.active().version == base.version
        record = next(r for r in reviewer.list() if r.id == v.audit_id)
        pb = _suggestion_record(record)
        assert pb.trial.state == sg.TrialOutcome.STATE_ROLLED_BACK and pb.trial.version == 2
        assert pb.trial.base_version == 1 and "p99 TTFT 9 s > 1 s" in pb.trial.reason
        assert pb.trial.trial.requests == 2 and pb.trial.trial.ttft_p99_s == 9.0
        assert "rolled back" in control.history("default")[0].actor
        # the base is active again; the next trial waits for a fresh baseline of it
        early = reviewer.review(agent, suggestion(store.active(), 2, "early"))
        assert early.rejection == "trial_running" and "baseline: v1 has served 0 of the 4 requests" in early.reason
        feed(trials, store.active(), clock, 4)
        after = reviewer.review(agent, suggestion(store.active(), 2, "after"))
        assert after.decision == "accepted" and after.reason.startswith("accepted as a trial")
        assert trials.running("default").base_since == done.ended_at
    finally:
        trials.close()
        control.close(1)
        store.close()


@pytest.mark.parametrize("field, value, words", [
    ("max_ttft_p99_s", float("nan"), "objective.max_ttft_p99_s"),
    ("max_itl_p99_s", -0.5, "objective.max_itl_p99_s"),
    ("max_watts", float("inf"), "objective.max_watts"),
    ("tolerance", 1.5, "objective.tolerance"),
    ("trial_seconds", 1e9, "objective.trial_seconds"),
    ("min_requests", 0, "objective.min_requests"),
    ("goal", 9, "objective.goal"),
])
def test_hostile_objectives_are_refused_and_store_nothing(world, field, value, words):
    from engine.control.plans import InvalidPlan
    control, _, _ = world
    before = control.store.history()
    plan = plan_pb2.ExecutionPlan(id="default", model=control.store.active().model)
    plan.objective.goal = 1
    setattr(plan.objective, field, value)
    with pytest.raises(InvalidPlan, match=words):
        control.submit_plan(plan, activate=True)
    assert control.store.history() == before


def test_a_plan_without_an_objective_keeps_its_hash():
    from engine.control.plans import canonical_json, plan_hash
    plan = plan_pb2.ExecutionPlan(id="x", model="m")
    before = plan_hash(plan)
    plan.objective.SetInParent()
    plan.objective.tolerance, plan.objective.min_requests = 0.05, 4  # the defaults: as if unset
    assert b"objective" not in canonical_json(plan) and plan_hash(plan) == before
    plan.objective.goal = 2
    plan.objective.max_ttft_p99_s = 3.0
    assert b'"objective":{"goal":"GOAL_MIN_JOULES_PER_TOKEN","max_ttft_p99_s":3.0}' in canonical_json(plan)


def test_every_objective_field_is_a_later_field():
    from engine.control.plans import LATER_FIELDS, LATER_SECTIONS
    fields = plan_pb2.Objective.DESCRIPTOR.fields
    assert {p.split(".")[1] for p in LATER_FIELDS if p.startswith("objective.")} == {f.name for f in fields}
    assert all(f.has_presence for f in fields) and "objective" in LATER_SECTIONS


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_trial_log_round_trips_on_both_databases(dialect, tmp_path, request):
    from engine.control.database import open_database
    from engine.control.objectives import Measurement
    from engine.control.trials import Trial
    target = tmp_path / "t.sqlite3" if dialect == "sqlite" else request.getfixturevalue("dsn")
    db = open_database(target)
    try:
        log = TrialLog(db)
        t = log.started(Trial(0, 41, "default", 3, 4, 1000.0, OBJ, reason="on trial"))
        assert [r.id for r in log.running()] == [t.id]
        done = Trial(t.id, 41, "default", 3, 4, 1000.0, OBJ, "rolled_back", "worse", Measurement(requests=6),
                     Measurement(requests=6, tokens_per_s=1.5), 0.5, 1010.0)
        log.ended(done)
        again = TrialLog(db).for_suggestions([41, 99])  # ensure_schema twice: no second table
        assert again == {41: done} and log.running() == []
    finally:
        db.close()
