"""The reference tuning agent's decisions on recorded measurements, without a server or a clock.

Each test drives `Tuner` with a table of measurements per plan point (what trials of those plans
measured) and judges each move with the control plane's own `judge`, as a trial would."""

from __future__ import annotations

import pytest

from engine.control.objectives import Measurement, Objective, judge
from protos.planengine.v1 import plan_pb2
from services.tuning_agent import POLICIES, WEIGHTS, Move, Outcome, Tuner, TunerConfig, knob_state

NATIVE, F32, Q8 = WEIGHTS["native"], WEIGHTS["f32"], WEIGHTS["q8_0"]


def default_plan() -> plan_pb2.ExecutionPlan:
    plan = plan_pb2.ExecutionPlan(id="default", version=1, weights=F32,
                                  scheduler_policy=plan_pb2.SCHEDULER_POLICY_FIFO)
    plan.batching.max_batch_size, plan.batching.max_batched_tokens = 32, 2048
    return plan


def apply(plan: plan_pb2.ExecutionPlan, move: Move) -> plan_pb2.ExecutionPlan:
    out = plan_pb2.ExecutionPlan()
    out.CopyFrom(plan)
    out.MergeFrom(move.patch()) if move.path != "scheduler_policy" else None
    if move.path == "scheduler_policy":
        out.scheduler_policy = move.value
    out.version = plan.version + 1
    return out


# Recorded per-point figures (tokens per busy second, p99 TTFT s) of the bursty trace under load:
# native weights are ~2.4x f32; batch 64 helps native a little; batch <= 8 breaks the TTFT bound.
def recorded(plan: plan_pb2.ExecutionPlan) -> Measurement:
    speed = {NATIVE: 180.0, F32: 75.0, Q8: 140.0}[plan.weights]
    b = plan.batching.max_batch_size
    speed *= {64: 1.1, 32: 1.0, 16: 0.8}.get(b, 0.5)
    ttft = 4.0 if b >= 16 else 30.0
    if plan.scheduler_policy == POLICIES["latency"]:
        speed *= 0.9
    return Measurement(requests=16, tokens=1000, busy_s=1000 / speed, tokens_per_s=speed, ttft_p99_s=ttft)


OBJECTIVE = Objective("max_tokens_per_s", max_ttft_p99_s=10.0, trial_requests=16, tolerance=0.05)


def tune(config: TunerConfig, plan=None, table=recorded):
    """Run the tuner to convergence against the table; returns (final plan, outcomes, moves)."""
    tuner, plan = Tuner(config), plan or default_plan()
    moves = []
    while (move := tuner.next_move(plan)) is not None:
        moves.append(move)
        trial = apply(plan, move)
        j = judge(OBJECTIVE, table(plan), table(trial), base_label=f"v{plan.version}")
        tuner.record(Outcome(move, "kept" if j.keep else "rolled_back", j.gain, j.reason))
        if j.keep:
            plan = trial
    return plan, tuner.outcomes, moves


def test_from_the_default_plan_it_finds_native_weights_and_a_larger_batch():
    final, outcomes, moves = tune(TunerConfig())
    assert moves[0].label() == "weights=native"  # the first knob in the fixed order
    assert outcomes[0].result == "kept" and outcomes[0].gain == pytest.approx(2.4)
    assert final.weights == NATIVE and final.batching.max_batch_size == 64
    assert recorded(final).tokens_per_s / recorded(default_plan()).tokens_per_s >= 1.3
    assert not OBJECTIVE.max_ttft_p99_s < recorded(final).ttft_p99_s  # constraints held


def test_it_is_deterministic_given_the_same_measurements():
    a, b = tune(TunerConfig()), tune(TunerConfig())
    assert [m.label() for m in a[2]] == [m.label() for m in b[2]]
    assert [o.result for o in a[1]] == [o.result for o in b[1]]


def test_a_rolled_back_change_is_not_repeated_within_its_cooldown():
    config = TunerConfig(cooldown_trials=3, max_trials=40)
    _, outcomes, _ = tune(config)
    refused = {}
    for i, o in enumerate(outcomes):
        if o.move.key in refused:
            assert i - refused[o.move.key] >= config.cooldown_trials, o.move.label()
        if o.result != "kept":
            refused[o.move.key] = i


def test_it_never_proposes_a_plan_it_has_already_visited_so_it_converges():
    final, outcomes, moves = tune(TunerConfig(max_trials=100))
    assert len(moves) < 100  # converged on its own
    seen, plan = {knob_state(default_plan())}, default_plan()
    for o in outcomes:
        nxt = apply(plan, o.move)
        assert knob_state(nxt) not in seen
        seen.add(knob_state(nxt))
        if o.result == "kept":
            plan = nxt


def test_a_direction_that_helped_is_tried_again_first_and_one_that_hurt_last():
    tuner = Tuner(TunerConfig(weights=(), policies=(), batch_sizes=(1, 256)))
    plan = default_plan()
    first = tuner.next_move(plan)
    assert first.label() == "batching.max_batch_size=64"  # the fixed order
    tuner.record(Outcome(first, "kept", 1.3))
    plan = apply(plan, first)
    assert tuner.next_move(plan).label() == "batching.max_batch_size=128"  # up again, before anything untried
    tuner = Tuner(TunerConfig(weights=(), policies=(), cooldown_trials=0))
    plan = default_plan()
    first = tuner.next_move(plan)
    tuner.record(Outcome(first, "rolled_back", 0.5))
    order = []
    while (m := tuner.next_move(plan)) is not None and len(order) < 3:
        order.append(m.label())
        tuner.record(Outcome(m, "rolled_back", 0.9))
    assert order[0] == "batching.max_batch_size=16"  # untried directions come before the one that hurt


def test_rejected_changes_and_invalid_combinations_are_not_proposed():
    tuner = Tuner(TunerConfig(weights=("native",), policies=()))
    plan = default_plan()
    plan.batching.max_batched_tokens = 40  # a batch of 64 would not fit the token budget: invalid
    labels = [m.label() for m in tuner.candidates(plan)]
    assert "batching.max_batch_size=64" not in labels and "batching.max_batch_size=16" in labels
    assert "batching.max_batched_tokens=20" not in labels  # below the batch size of 32
    move = tuner.next_move(default_plan())
    tuner.record(Outcome(move, "rejected", None, "out of bounds"))
    assert tuner.next_move(default_plan()).key != move.key


def test_power_caps_are_tried_only_when_configured():
    assert not [m for m in Tuner(TunerConfig()).candidates(default_plan()) if m.path == "limits.max_watts"]
    caps = [m.label() for m in Tuner(TunerConfig(power_caps=(0, 15))).candidates(default_plan())
            if m.path == "limits.max_watts"]
    assert caps == ["limits.max_watts=15"]  # 0 is the plan's own value


def test_kernel_settings_are_tried_where_they_apply():
    plan = default_plan()  # f32 weights, fifo
    plan.execution.f32_kernel_rows = 64
    labels = [m.label() for m in Tuner(TunerConfig()).candidates(plan)]
    assert "execution.f32_kernel_rows=128" in labels and "execution.f32_kernel_rows=32" in labels
    assert not [x for x in labels if x.startswith("execution.energy")]
    plan.weights, plan.scheduler_policy = NATIVE, POLICIES["energy_balanced"]
    plan.execution.energy_min_batch, plan.execution.energy_max_wait_ms = 4, 50
    labels = [m.label() for m in Tuner(TunerConfig()).candidates(plan)]
    assert not [x for x in labels if x.startswith("execution.f32")]
    assert {"execution.energy_min_batch=8", "execution.energy_min_batch=2", "execution.energy_max_wait_ms=100",
            "execution.energy_max_wait_ms=25"} <= set(labels)
