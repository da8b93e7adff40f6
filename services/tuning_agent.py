"""The reference tuning agent: one plan change at a time, each tried as a trial, kept or undone
by the control plane on its measured outcome; the agent learns from each outcome.

    plan-engine tune --trace deploy/traces/bursty_batch.jsonl      (a server, a load and this agent)

Two parts:
  - `Tuner`: the decision logic, plain and deterministic: the same plans and the same outcomes give
    the same moves, so it is tested on recorded outcomes without a server.
      candidates   one-field changes of the knobs the plan exposes, in a fixed order: weights
                   (native, f32, q8_0), scheduler_policy (the other three), batching.max_batch_size
                   (x2, /2), batching.max_batched_tokens (x2, /2), the kernel settings that apply to
                   the plan (execution.f32_kernel_rows with f32 weights; execution.energy_min_batch
                   and energy_max_wait_ms under energy_balanced; x2, /2), and limits.max_watts
                   from `power_caps` when given. Changes that would make the plan invalid (a token
                   budget below the batch size) are never proposed.
      learning     each outcome is kept per (field, direction): a kept change with gain g makes
                   that direction g-preferred (after a doubled batch helped, doubling again comes
                   first); a rolled-back one is pushed last. Unknown directions keep the fixed order.
      cooldown     a change (field and value) that was rejected or rolled back is not proposed
                   again for `cooldown_trials` trials.
      no cycles    a change that leads back to a plan already visited is never proposed, so the
                   search ends: `next_move` returns None when nothing is left (converged), or after
                   `max_trials`.
  - `TuningAgent`: the loop against a server: read the active plan, send the next move as one
    Suggestion, wait for its trial's outcome in ListSuggestions, record it, repeat.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services.client import PlanEngineClient

log = logging.getLogger(__name__)

W = plan_pb2.WeightFormat
P = plan_pb2.SchedulerPolicy
WEIGHTS = {"native": W.WEIGHT_FORMAT_NATIVE, "f32": W.WEIGHT_FORMAT_F32, "q8_0": W.WEIGHT_FORMAT_Q8_0,
           "f16": W.WEIGHT_FORMAT_F16}
POLICIES = {"fifo": P.SCHEDULER_POLICY_FIFO, "latency": P.SCHEDULER_POLICY_LATENCY,
            "throughput": P.SCHEDULER_POLICY_THROUGHPUT, "energy_balanced": P.SCHEDULER_POLICY_ENERGY_BALANCED}
KNOBS = ("weights", "scheduler_policy", "batching.max_batch_size", "batching.max_batched_tokens",
         "execution.f32_kernel_rows", "execution.energy_min_batch", "execution.energy_max_wait_ms", "limits.max_watts")


@dataclass(frozen=True)
class TunerConfig:
    agent_id: str = "tuner"
    weights: tuple[str, ...] = ("native", "f32", "q8_0")
    policies: tuple[str, ...] = ("throughput", "energy_balanced", "latency", "fifo")
    batch_sizes: tuple[int, int] = (1, 64)  # max_batch_size bounds
    batched_tokens: tuple[int, int] = (64, 8192)  # max_batched_tokens bounds
    kernel_rows: tuple[int, int] = (16, 256)  # execution.f32_kernel_rows bounds (tried with f32 weights only)
    energy_min_batch: tuple[int, int] = (1, 16)  # execution.energy_* bounds (tried under energy_balanced only)
    energy_wait_ms: tuple[int, int] = (10, 400)
    power_caps: tuple[float, ...] = ()  # limits.max_watts values to try (0 = no cap); empty: leave it
    cooldown_trials: int = 6
    max_trials: int = 16


@dataclass(frozen=True)
class Move:
    """One field set to one value. `direction` groups moves for learning ("up", "down", or the value)."""

    path: str
    value: Any
    direction: str

    @property
    def key(self) -> tuple[str, Any]:
        return (self.path, self.value)

    def label(self) -> str:
        if self.path == "weights":
            return f"weights={W.Name(self.value).removeprefix('WEIGHT_FORMAT_').lower()}"
        if self.path == "scheduler_policy":
            return f"scheduler_policy={P.Name(self.value).removeprefix('SCHEDULER_POLICY_').lower()}"
        return f"{self.path}={self.value:g}" if isinstance(self.value, float) else f"{self.path}={self.value}"

    def patch(self) -> plan_pb2.ExecutionPlan:
        out = plan_pb2.ExecutionPlan()
        _set(out, self.path, self.value)
        return out


def _get(plan: plan_pb2.ExecutionPlan, path: str) -> Any:
    obj = plan
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(plan: plan_pb2.ExecutionPlan, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    obj = plan
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def knob_state(plan: plan_pb2.ExecutionPlan) -> tuple:
    """The tuned fields' values: plans with equal states are the same point of the search."""
    return tuple(_get(plan, k) for k in KNOBS)


@dataclass(frozen=True)
class Outcome:
    move: Move
    result: str  # "kept" | "rolled_back" | "rejected"
    gain: float | None = None
    reason: str = ""


@dataclass
class Tuner:
    """Moves in, outcomes back (module docstring). Deterministic: no clock, no randomness."""

    config: TunerConfig = field(default_factory=TunerConfig)
    outcomes: list[Outcome] = field(default_factory=list)
    learned: dict[tuple[str, str], float] = field(default_factory=dict)  # (path, direction) -> last gain
    blocked: dict[tuple[str, Any], int] = field(default_factory=dict)  # move key -> trial index it was refused at
    visited: set[tuple] = field(default_factory=set)

    def candidates(self, plan: plan_pb2.ExecutionPlan) -> list[Move]:
        c = self.config
        out = [Move("weights", WEIGHTS[w], w) for w in c.weights if WEIGHTS[w] != plan.weights]
        out += [Move("scheduler_policy", POLICIES[p], p) for p in c.policies if POLICIES[p] != plan.scheduler_policy]
        b, t = plan.batching.max_batch_size, plan.batching.max_batched_tokens
        ranges = [("batching.max_batch_size", c.batch_sizes, lambda v: v <= t),
                  ("batching.max_batched_tokens", c.batched_tokens, lambda v: v >= b)]
        if plan.weights == W.WEIGHT_FORMAT_F32:  # the kernel settings that matter for what the plan runs
            ranges.append(("execution.f32_kernel_rows", c.kernel_rows, lambda v: True))
        if plan.scheduler_policy == P.SCHEDULER_POLICY_ENERGY_BALANCED:
            ranges += [("execution.energy_min_batch", c.energy_min_batch, lambda v: True),
                       ("execution.energy_max_wait_ms", c.energy_wait_ms, lambda v: True)]
        for path, (low, high), other_ok in ranges:
            now = _get(plan, path)
            for direction, value in (("up", min(high, max(now * 2, low))), ("down", max(low, now // 2))):
                if value != now and other_ok(value):
                    out.append(Move(path, value, direction))
        out += [Move("limits.max_watts", float(w), f"{w:g}") for w in c.power_caps if float(w) != plan.limits.max_watts]
        return out

    def next_move(self, plan: plan_pb2.ExecutionPlan) -> Move | None:
        """The change to try from `plan`, or None: converged, or out of trials."""
        self.visited.add(knob_state(plan))
        if len(self.outcomes) >= self.config.max_trials:
            return None
        trial = len(self.outcomes)
        ranked = []
        for order, move in enumerate(self.candidates(plan)):
            refused_at = self.blocked.get(move.key)
            if refused_at is not None and trial - refused_at < self.config.cooldown_trials:
                continue
            after = plan_pb2.ExecutionPlan()
            after.CopyFrom(plan)
            _set(after, move.path, move.value)
            if knob_state(after) in self.visited:
                continue
            g = self.learned.get((move.path, move.direction))
            # known good first (best gain first), then untried in the fixed order, then known bad
            rank = (0, -g) if g is not None and g > 1 else (1, 0.0) if g is None else (2, -g)
            ranked.append((rank, order, move))
        return min(ranked, key=lambda r: (r[0], r[1]))[2] if ranked else None

    def record(self, outcome: Outcome) -> None:
        """What happened to the last move; the next `next_move` takes it into account."""
        trial = len(self.outcomes)
        self.outcomes.append(outcome)
        key = (outcome.move.path, outcome.move.direction)
        if outcome.result == "kept":
            self.learned[key] = outcome.gain if outcome.gain is not None and math.isfinite(outcome.gain) else 1.0
        else:
            self.blocked[outcome.move.key] = trial
            self.learned[key] = min(outcome.gain if outcome.gain is not None else 0.0, 0.999)


# --------------------------------------------------------------------------- against a server

TRIAL_STATES = {v.number: v.name.removeprefix("STATE_").lower() for v in sg.TrialOutcome.State.DESCRIPTOR.values}


@dataclass
class Step:
    """One move sent: the verdict, and the trial's outcome once it is known."""

    move: Move
    base_version: int
    verdict: sg.SuggestionVerdict
    outcome: Outcome
    trial: sg.TrialOutcome | None = None


class TuningAgent:
    """Runs a Tuner against a server, one trial at a time (module docstring)."""

    def __init__(self, client: PlanEngineClient, config: TunerConfig = TunerConfig(), *, poll_s: float = 1.0,
                 wait_s: float = 3.0, report: Callable[[Step], None] = lambda step: None,
                 sleep: Callable[[float], bool] | None = None):
        self.client = client
        self.tuner = Tuner(config)
        self.poll_s = poll_s  # between ListSuggestions reads while a trial runs
        self.wait_s = wait_s  # before suggesting again after "trial running" or "rate limit"
        self.report = report
        self.steps: list[Step] = []
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait  # returns True when stopped

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> list[Step]:
        """Until converged, out of trials, or stopped."""
        n = 0
        while not self._stop.is_set():
            plan = self.client.active_plan()
            move = self.tuner.next_move(plan)
            if move is None:
                break
            n += 1
            step = self.try_move(plan, move, f"{self.tuner.config.agent_id}-{int(time.time())}-{n}")
            if step is None:  # stopped, or the stream said to wait
                continue
            self.tuner.record(step.outcome)
            self.steps.append(step)
            self.report(step)
        return self.steps

    def try_move(self, plan: plan_pb2.ExecutionPlan, move: Move, suggestion_id: str) -> Step | None:
        s = sg.Suggestion(suggestion_id=suggestion_id, agent_id=self.tuner.config.agent_id, plan_id=plan.id,
                          base_version=plan.version, rationale=f"tuning: try {move.label()} (one change at a time)",
                          expected_effect="a better objective score; the trial decides")
        s.update_mask.paths.append(move.path)
        s.patch.CopyFrom(move.patch())
        verdict = next(iter(self.client.stub.Suggest(iter([s]), metadata=self.client.metadata, timeout=60)))
        if verdict.decision != sg.SuggestionVerdict.DECISION_ACCEPTED:
            if verdict.rejection == sg.REJECTION_STALE:
                return None  # someone else's change: look again at once
            if verdict.rejection in (sg.REJECTION_TRIAL_RUNNING, sg.REJECTION_RATE_LIMIT):
                self._sleep(self.wait_s)  # a trial or its baseline is being measured: not now
                return None
            return Step(move, plan.version, verdict, Outcome(move, "rejected", None, verdict.reason))
        trial = self._await_trial(verdict.audit_id)
        if trial is None:
            return None if self._stop.is_set() else Step(move, plan.version, verdict, Outcome(move, "kept", None,
                                                                                              verdict.reason))
        state = TRIAL_STATES.get(trial.state, "unspecified")
        result = "kept" if state == "kept" else "rolled_back"
        return Step(move, plan.version, verdict,
                    Outcome(move, result, trial.gain if trial.HasField("gain") else None, trial.reason), trial)

    def _await_trial(self, audit_id: int) -> sg.TrialOutcome | None:
        """The trial's final outcome (None: it was not a trial, or stopped)."""
        while True:
            records = self.client._call("ListSuggestions", pb.ListSuggestionsRequest(
                agent_id=self.tuner.config.agent_id, limit=20)).suggestions
            record = next((r for r in records if r.id == audit_id), None)
            if record is None or not record.HasField("trial"):
                return None
            if record.trial.state != sg.TrialOutcome.STATE_RUNNING:
                return record.trial
            if self._sleep(self.poll_s):
                return None


def describe(step: Step) -> str:
    o = step.outcome
    g = f" x{o.gain:.2f}" if o.gain is not None and math.isfinite(o.gain) else ""
    return f"v{step.base_version} + {step.move.label()}: {o.result}{g}: {o.reason}"


def run_tuner(client: PlanEngineClient, config: TunerConfig, stop: threading.Event | None = None,
              report: Callable[[Step], None] = lambda step: None, poll_s: float = 1.0) -> list[Step]:
    agent = TuningAgent(client, config, poll_s=poll_s, report=report)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), agent.stop()), daemon=True).start()
    try:
        return agent.run()
    except grpc.RpcError:
        if agent._stop.is_set():
            return agent.steps
        raise


__all__ = ["Move", "Outcome", "Step", "Tuner", "TunerConfig", "TuningAgent", "describe", "knob_state", "run_tuner"]
