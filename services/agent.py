"""The reference WeOS agent: watches serving metrics and proposes plan changes as Suggestions.

    plan-engine agent --server localhost:50051 --token T --agent-id tuner

Three parts, each usable alone:
  - `Advisor`: the decision logic. Plain and deterministic: the same snapshots and plans give
    the same proposals, so it is tested with hand-built `Load`s and no server.
        waiting >= busy_waiting for busy_after snapshots  -> scheduler_policy THROUGHPUT and a
                                                             larger batching.max_batch_size
        nothing running or waiting for idle_after          -> scheduler_policy LATENCY
        power_w > power_target_w for power_after           -> limits.max_watts = the target
    After any verdict except "stale" it stays quiet for cooldown_s (by snapshot time), so a
    change has time to show in the metrics and a refused proposal is not repeated at once.
  - `metric_loads`: snapshots from WatchMetrics, or by polling GetMetrics every interval
    when the server does not implement WatchMetrics.
  - `Agent`: the loop. It keeps one Suggest stream open, sends one suggestion at a time and
    waits for its verdict; a "stale" verdict makes it fetch the version the server names
    (`current_version`), recompute the patch against it and send again (up to max_rebases).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from engine.control import names
from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services.client import PlanEngineClient

log = logging.getLogger(__name__)

Policy = plan_pb2.SchedulerPolicy
Verdict = sg.SuggestionVerdict


@dataclass(frozen=True)
class Load:
    """What the agent reads from one MetricsSnapshot. `at` is unix time in seconds."""

    at: float
    plan_id: str = ""
    plan_version: int = 0
    running: int = 0
    waiting: int = 0
    tokens_per_s: float = 0.0
    power_w: float = 0.0
    kv_usage: float = 0.0

    @classmethod
    def from_snapshot(cls, s: pb.MetricsSnapshot) -> Load:
        at = s.at.ToNanoseconds() / 1e9 if s.HasField("at") else time.time()
        return cls(at, s.plan.id, s.plan.version, s.running, s.waiting, s.generation_tokens_per_s, s.power_w,
                   s.kv_cache_usage)


@dataclass(frozen=True)
class AgentConfig:
    """Thresholds of the decision logic; the defaults suit the default model on a small CPU."""

    agent_id: str = "weos-agent"
    busy_waiting: int = 4  # requests waiting that mean "busy"
    busy_after: int = 2  # consecutive busy snapshots before proposing throughput
    idle_after: int = 3  # consecutive idle snapshots before proposing latency
    max_batch_size: int = 64  # the largest batch it proposes
    power_target_w: float = 0.0  # 0: leave power alone
    power_after: int = 2  # consecutive snapshots above the target before capping
    cooldown_s: float = 10.0  # quiet time after a verdict (snapshot time)
    max_rebases: int = 3  # resends after "stale" verdicts for one proposal


@dataclass(frozen=True)
class Proposal:
    """A patch with its reasons: what the agent sends as a Suggestion."""

    goal: str  # "throughput", "latency" or "power"
    paths: tuple[str, ...]
    patch: plan_pb2.ExecutionPlan
    rationale: str
    expected_effect: str

    def suggestion(self, agent_id: str, plan: plan_pb2.ExecutionPlan, suggestion_id: str) -> sg.Suggestion:
        s = sg.Suggestion(suggestion_id=suggestion_id, agent_id=agent_id, plan_id=plan.id,
                          base_version=plan.version, rationale=self.rationale, expected_effect=self.expected_effect)
        s.update_mask.paths.extend(self.paths)
        s.patch.CopyFrom(self.patch)
        return s


class Advisor:
    """The decision logic: snapshots in, at most one proposal per snapshot out."""

    def __init__(self, config: AgentConfig = AgentConfig()):
        self.config = config
        self.busy = self.idle = self.hot = 0  # consecutive snapshots in each state
        self.quiet_until = -math.inf

    def observe(self, load: Load) -> str | None:
        """Update the streaks with one snapshot; the goal it calls for, if any (outside cooldown)."""
        c = self.config
        self.busy = self.busy + 1 if load.waiting >= c.busy_waiting else 0
        self.idle = self.idle + 1 if load.running == 0 and load.waiting == 0 else 0
        self.hot = self.hot + 1 if c.power_target_w > 0 and load.power_w > c.power_target_w else 0
        if load.at < self.quiet_until:
            return None
        if self.hot >= c.power_after:  # a power cap is a constraint: it comes before speed
            return "power"
        if self.busy >= c.busy_after:
            return "throughput"
        if self.idle >= c.idle_after:
            return "latency"
        return None

    def propose(self, goal: str, load: Load, plan: plan_pb2.ExecutionPlan) -> Proposal | None:
        """The patch reaching `goal` from `plan`; None when the plan already does."""
        c = self.config
        patch = plan_pb2.ExecutionPlan()
        policy = names.name(names.POLICIES, plan.scheduler_policy)
        if goal == "power":
            cap = plan.limits.max_watts
            if 0 < cap <= c.power_target_w:
                return None
            patch.limits.max_watts = c.power_target_w
            return Proposal(goal, ("limits.max_watts",), patch,
                            f"power {load.power_w:.1f} W above the target {c.power_target_w:g} W for {self.hot} "
                            f"snapshots (cap now {'none' if cap == 0 else f'{cap:g} W'})",
                            f"average power at or below {c.power_target_w:g} W; tokens/s may drop")
        if goal == "throughput":
            paths: list[str] = []
            if plan.scheduler_policy != Policy.SCHEDULER_POLICY_THROUGHPUT:
                patch.scheduler_policy = Policy.SCHEDULER_POLICY_THROUGHPUT
                paths.append("scheduler_policy")
            current = plan.batching.max_batch_size
            ceiling = min(c.max_batch_size, plan.batching.max_batched_tokens or c.max_batch_size)
            batch = min(ceiling, max(2 * current, load.running + load.waiting))
            if batch > current:
                patch.batching.max_batch_size = batch
                paths.append("batching.max_batch_size")
            if not paths:
                return None
            return Proposal(goal, tuple(paths), patch,
                            f"{load.waiting} requests waiting (>= {c.busy_waiting}) for {self.busy} snapshots with "
                            f"{load.running} running under {policy}, batch {current}",
                            f"higher tokens/s (now {load.tokens_per_s:.1f}) and a shorter queue: larger batches"
                            + (f" of up to {batch}" if batch > current else ""))
        if goal == "latency":
            if plan.scheduler_policy == Policy.SCHEDULER_POLICY_LATENCY:
                return None
            patch.scheduler_policy = Policy.SCHEDULER_POLICY_LATENCY
            return Proposal(goal, ("scheduler_policy",), patch,
                            f"idle for {self.idle} snapshots under {policy}",
                            "lower time to first token for the next requests")
        raise ValueError(f"unknown goal {goal!r}")

    def step(self, load: Load, plan: plan_pb2.ExecutionPlan) -> Proposal | None:
        """observe + propose: what to suggest after this snapshot, if anything."""
        goal = self.observe(load)
        return self.propose(goal, load, plan) if goal else None

    def settled(self, at: float) -> None:
        """A final verdict (not "stale") arrived for a proposal made at `at`: start the cooldown."""
        self.quiet_until = at + self.config.cooldown_s
        self.busy = self.idle = self.hot = 0


class MetricLoads:
    """Loads from WatchMetrics, or from polling GetMetrics when the server lacks WatchMetrics.
    Iterate it; `close()` (from any thread) ends the iteration."""

    def __init__(self, client: PlanEngineClient, interval_s: float = 1.0):
        self.client = client
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._call = None

    def __iter__(self) -> Iterator[Load]:
        stub, md = self.client.stub, self.client.metadata
        try:
            self._call = stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=self.interval_s), metadata=md)
            for snapshot in self._call:
                yield Load.from_snapshot(snapshot)
            return
        except grpc.RpcError as exc:
            if self._stop.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        log.info("the server has no WatchMetrics; polling GetMetrics every %.1f s", self.interval_s)
        while not self._stop.is_set():
            yield Load.from_snapshot(stub.GetMetrics(pb.GetMetricsRequest(), metadata=md, timeout=30))
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()


@dataclass
class Exchange:
    """One suggestion sent and the verdict it got."""

    proposal: Proposal
    suggestion: sg.Suggestion
    verdict: Verdict


class Agent:
    """Runs an Advisor against a server: loads in, suggestions out, one at a time."""

    def __init__(self, client: PlanEngineClient, config: AgentConfig = AgentConfig(),
                 report: Callable[[Exchange], None] = lambda exchange: None):
        self.client = client
        self.config = config
        self.advisor = Advisor(config)
        self.report = report
        self.exchanges: list[Exchange] = []
        self._plan: plan_pb2.ExecutionPlan | None = None
        self._ids = (f"{config.agent_id}-{int(time.time())}-{n}" for n in itertools.count(1))
        self._outbox: queue.Queue[sg.Suggestion | None] | None = None
        self._verdicts: Iterator[Verdict] | None = None

    def run(self, loads: Iterable[Load], stop: threading.Event | None = None) -> list[Exchange]:
        """Follow `loads` until they end or `stop` is set; returns every exchange."""
        try:
            for load in loads:
                if stop is not None and stop.is_set():
                    break
                self.on_load(load)
        finally:
            self.close()
        return self.exchanges

    def on_load(self, load: Load) -> Exchange | None:
        plan = self._current_plan(load)
        proposal = self.advisor.step(load, plan)
        if proposal is None:
            return None
        exchange = self._send(proposal, plan)
        for _ in range(self.config.max_rebases):
            v = exchange.verdict
            if v.rejection != sg.REJECTION_STALE or not v.current_version:
                break
            plan = self._fetch(exchange.suggestion.plan_id, v.current_version)
            proposal = self.advisor.propose(proposal.goal, load, plan)  # rebase: the same goal, the new plan
            if proposal is None:  # the current version already does what we wanted
                break
            exchange = self._send(proposal, plan)
        self.advisor.settled(load.at)
        return exchange

    def _current_plan(self, load: Load) -> plan_pb2.ExecutionPlan:
        if not load.plan_id:
            self._plan = self.client.active_plan()
        elif self._plan is None or (self._plan.id, self._plan.version) != (load.plan_id, load.plan_version):
            self._plan = self._fetch(load.plan_id, load.plan_version)
        return self._plan

    def _fetch(self, plan_id: str, version: int) -> plan_pb2.ExecutionPlan:
        self._plan = self.client.get_plan(plan_id, version)
        return self._plan

    def _send(self, proposal: Proposal, plan: plan_pb2.ExecutionPlan) -> Exchange:
        suggestion = proposal.suggestion(self.config.agent_id, plan, next(self._ids))
        if self._verdicts is None:  # one stream for the agent's life; verdicts come back in order
            self._outbox = queue.Queue()
            self._verdicts = self.client.stub.Suggest(iter(self._outbox.get, None), metadata=self.client.metadata)
        self._outbox.put(suggestion)
        try:
            verdict = next(self._verdicts)
        except (grpc.RpcError, StopIteration):
            self._outbox = self._verdicts = None  # the next proposal opens a new stream
            raise
        exchange = Exchange(proposal, suggestion, verdict)
        self.exchanges.append(exchange)
        self.report(exchange)
        return exchange

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put(None)  # half-close: the server ends the stream
        self._outbox = self._verdicts = None


def describe(exchange: Exchange) -> str:
    """One line for a person: what was proposed and what the server said."""
    s, v = exchange.suggestion, exchange.verdict
    decision = Verdict.Decision.Name(v.decision).removeprefix("DECISION_")
    return (f"{s.suggestion_id} {s.plan_id}@{s.base_version} [{', '.join(s.update_mask.paths)}] -> {decision}"
            + (f" {s.plan_id}@{v.resulting_version}" if v.resulting_version else "") + f": {v.reason}")


def run_agent(client: PlanEngineClient, config: AgentConfig = AgentConfig(), interval_s: float = 1.0,
              stop: threading.Event | None = None,
              report: Callable[[Exchange], None] = lambda exchange: None) -> list[Exchange]:
    """`plan-engine agent`: follow the server's metrics until `stop` is set (or the stream ends)."""
    loads = MetricLoads(client, interval_s)
    stop = stop or threading.Event()
    threading.Thread(target=lambda: (stop.wait(), loads.close()), name="agent-stop", daemon=True).start()
    try:
        return Agent(client, config, report).run(loads, stop)
    finally:
        stop.set()
