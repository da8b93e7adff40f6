"""`plan-engine tune --trace FILE`: the whole loop in one command, for anyone to rerun.

1. Start a server (in this process, a fresh store in a temporary directory) on the default plan
   plus an objective (`--goal`, `--max-ttft`, `--max-itl`, `--max-watts`) with a trial window
   (`--trial-requests`, `--trial-seconds`), and an agent policy letting the agent "tuner" change
   weights, scheduler_policy, batching limits and limits.max_watts in `auto` mode.
2. Replay the trace once on the default plan: the first trial's baseline.
3. `--bad-trial`: send a deliberately bad suggestion (batching.max_batch_size = 1) while the trace
   replays; the control plane applies it as a trial, sees the constraint break and rolls back.
4. Run the reference tuning agent (services/tuning_agent.py) while the trace replays in a loop,
   until it converges or `--max-trials`.
5. Replay the trace `--rounds` times on the default plan and on the final plan, interleaved
   (default, final, default, final, ...), activated by the operator between replays, and compare
   the objective with the same arithmetic the trials use (engine/control/objectives.py).

The report says how loaded the machine was (load average before and after): measurements on a
shared machine are only comparable within one run, which is why the last step interleaves.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.control.objectives import GOALS, Objective, check, gain, violations
from engine.errors import InvalidArgument
from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services.client import PlanEngineClient
from services.load_trace import Trace
from services.server import ServerConfig, create_server
from services.trace_replay import ReplayResult, replay
from services.tuning_agent import Step, TunerConfig, TuningAgent, describe

AGENT, AGENT_TOKEN = "tuner", "tune-agent-token"
TUNABLE = {"weights": {"values": ["NATIVE", "F32", "Q8_0"]}, "scheduler_policy": {},
           "batching.max_batch_size": {"min": 1, "max": 64}, "batching.max_batched_tokens": {"min": 64, "max": 8192},
           "execution.f32_kernel_rows": {"min": 0, "max": 1024}, "execution.energy_min_batch": {"min": 1, "max": 64},
           "execution.energy_max_wait_ms": {"min": 0, "max": 2000}, "limits.max_watts": {"min": 0, "max": 1000}}
GOAL_ENUM = {"max_tokens_per_s": 1, "min_joules_per_token": 2}


@dataclass(frozen=True)
class TuneConfig:
    objective: Objective
    model: str | None = None
    max_trials: int = 8
    rounds: int = 2
    bad_trial: bool = False
    speed: float = 1.0


def objective_plan(o: Objective, model: str | None) -> plan_pb2.ExecutionPlan:
    plan = plan_pb2.ExecutionPlan(id="default")
    if model:
        plan.model = model
    obj = plan.objective
    obj.goal = GOAL_ENUM[o.goal]
    for name in ("max_ttft_p99_s", "max_itl_p99_s", "max_watts"):
        if getattr(o, name) is not None:
            setattr(obj, name, getattr(o, name))
    if o.trial_requests:
        obj.trial_requests = o.trial_requests
    if o.trial_seconds:
        obj.trial_seconds = o.trial_seconds
    obj.tolerance = o.tolerance
    obj.min_requests = o.min_requests
    return plan


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def tune(trace: Trace, config: TuneConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns the report (also said line by line)."""
    problems = check(config.objective)
    if problems:
        raise InvalidArgument("objective: " + "; ".join(p for _, p in problems), field="objective")
    if config.objective.goal not in GOALS or not config.objective.trials:
        raise InvalidArgument("tune needs a goal and a trial window (--trial-requests or --trial-seconds)",
                              field="objective")
    report: dict[str, Any] = {"trace": trace.name, "objective": config.objective.describe(),
                              "load_average_start": _load(),
                              "note": "measured on a shared machine under load from other processes; ratios come "
                                      "from interleaved replays in this run"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "agents.json").write_text(json.dumps({"agents": {AGENT: {
            "token": AGENT_TOKEN, "mode": "auto", "rate_per_minute": 60, "fields": TUNABLE}}}))
        server = create_server(ServerConfig(
            port=0, store_path=Path(tmp) / "plans.sqlite3", initial_plan=objective_plan(config.objective, config.model),
            agent_policy=Path(tmp) / "agents.json", insecure_operator=True, max_workers=128, reserved_threads=8))
        target = f"127.0.0.1:{server.port}"

        def operator() -> PlanEngineClient:
            return PlanEngineClient(target, timeout=600)

        def run_once(label: str) -> ReplayResult:
            r = replay(operator, trace, speed=config.speed)
            s = r.summary()
            say(f"[{label}] {s['requests']} requests, {s['failed']} failed, {s['tokens_per_s']:.1f} tok/s per busy s, "
                f"{s['joules_per_token']:.4g} J/token, p99 ttft {s['ttft_p99_s']:.2f} s, p99 itl "
                f"{s['itl_p99_s']:.3f} s, plans {s['plans']}")
            return r

        try:
            default = server.control.store.active()
            say(f"server on {target}, plan {default.id}@{default.version}; objective: {config.objective.describe()}; "
                f"load average {report['load_average_start']}")
            failed = 0
            failed += run_once("baseline, default plan").measurement.failed
            agent_client = PlanEngineClient(target, token=AGENT_TOKEN, timeout=600)
            if config.bad_trial:
                report["bad_trial"], f = _bad_trial(agent_client, operator, trace, config, say)
                failed += f
            steps, f = _tune_under_load(agent_client, operator, trace, config, say)
            failed += f
            report["steps"] = [{"move": s.move.label(), "result": s.outcome.result, "gain": s.outcome.gain,
                                "reason": s.outcome.reason} for s in steps]
            final = server.control.store.active()
            report["final_plan"] = {"version": final.version, "weights": plan_pb2.WeightFormat.Name(final.weights),
                                    "scheduler_policy": plan_pb2.SchedulerPolicy.Name(final.scheduler_policy),
                                    "max_batch_size": final.batching.max_batch_size,
                                    "max_batched_tokens": final.batching.max_batched_tokens,
                                    "max_watts": final.limits.max_watts}
            say(f"final plan v{final.version}: {report['final_plan']}")
            report["failed_during_tuning"] = failed
            report["comparison"] = _compare(server, operator, run_once, default, final, config)
            history = server.control.history("default", 50)
            report["plan_history"] = [f"{e.action} v{e.version} by {e.actor}" for e in reversed(history)]
        finally:
            server.stop(5)
    report["load_average_end"] = _load()
    return report


def _bad_trial(agent: PlanEngineClient, operator, trace: Trace, config: TuneConfig, say) -> tuple[dict, int]:
    """A batch of 1 under the trace: applied as a trial, rolled back by the control plane."""
    plan = agent.active_plan()
    s = sg.Suggestion(suggestion_id="bad-1", agent_id=AGENT, plan_id=plan.id, base_version=plan.version,
                      rationale="deliberately bad: one sequence per step", expected_effect="the trial should fail")
    s.update_mask.paths.append("batching.max_batch_size")
    s.patch.batching.max_batch_size = 1
    box: dict[str, ReplayResult] = {}
    load = threading.Thread(target=lambda: box.setdefault("r", replay(operator, trace, speed=config.speed)))
    load.start()
    time.sleep(0.5)
    verdict = next(iter(agent.stub.Suggest(iter([s]), metadata=agent.metadata, timeout=60)))
    say(f"[bad trial] verdict: {verdict.reason}")
    trial = None
    while trial is None or trial.state == sg.TrialOutcome.STATE_RUNNING:
        time.sleep(1.0)
        records = agent._call("ListSuggestions", pb.ListSuggestionsRequest(limit=5)).suggestions
        trial = next((r.trial for r in records if r.id == verdict.audit_id and r.HasField("trial")), None)
        if trial is None:
            break
    load.join()
    out = {"verdict": verdict.reason}
    if trial is not None:
        out.update(state=sg.TrialOutcome.State.Name(trial.state), reason=trial.reason,
                   trial_requests_measured=trial.trial.requests)
        say(f"[bad trial] {out['state']}: {trial.reason} (after {trial.trial.requests} of its requests)")
    return out, box["r"].measurement.failed


def _tune_under_load(agent_client, operator, trace: Trace, config: TuneConfig, say) -> tuple[list[Step], int]:
    """The tuning agent, while the trace replays in a loop until the agent is done."""
    agent = TuningAgent(agent_client, TunerConfig(agent_id=AGENT, max_trials=config.max_trials),
                        report=lambda step: say(f"[tuner] {describe(step)}"))
    done = threading.Event()
    failed = [0]

    def loop() -> None:
        while not done.is_set():
            failed[0] += replay(operator, trace, speed=config.speed, stop=done).measurement.failed

    load = threading.Thread(target=loop, name="tune-load")
    load.start()
    try:
        steps = agent.run()
    finally:
        done.set()
        load.join()
    return steps, failed[0]


def _compare(server, operator, run_once, default, final, config: TuneConfig) -> dict[str, Any]:
    o = config.objective
    if (final.id, final.version) == (default.id, default.version):
        return {"note": "the agent kept no change: nothing to compare"}
    runs: dict[str, list] = {"default": [], "final": []}
    with operator() as op:
        for i in range(config.rounds):
            for name, plan in (("default", default), ("final", final)):
                if server.control.store.active().version != plan.version:
                    op.activate(plan.id, plan.version)
                runs[name].append(run_once(f"round {i + 1}, {name} plan v{plan.version}").measurement)
        op.activate(final.id, final.version)
    ratios = [gain(o, d, f) for d, f in zip(runs["default"], runs["final"])]
    out = {"ratios_per_round": [round(r, 2) for r in ratios], "ratio_median": round(statistics.median(ratios), 2),
           "default": [m.as_dict() for m in runs["default"]], "final": [m.as_dict() for m in runs["final"]],
           "final_constraints_broken": [v for m in runs["final"] for v in violations(o, m)],
           "default_constraints_broken": [v for m in runs["default"] for v in violations(o, m)]}
    return out


__all__ = ["TuneConfig", "objective_plan", "tune"]
