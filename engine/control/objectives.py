"""Objectives: what "better" means for a plan, and how a plan version is measured against it.

An operator declares it in the plan (`ExecutionPlan.objective`, plan.proto):

    goal                 MAXIMIZE_TOKENS_PER_S | MINIMIZE_JOULES_PER_TOKEN
    max_ttft_p99_s       constraint: p99 time to first token (arrival to first token), seconds
    max_itl_p99_s        constraint: p99 inter-token latency, seconds
    max_watts            constraint: average power while busy (energy / busy time), watts
    trial_requests       a suggestion accepted under this objective runs as a trial until this
    trial_seconds        many of its requests finished, or this long, whichever comes first
    tolerance            a trial may score this fraction worse than the version before and be kept
    min_requests         fewer finished requests than this in a window: nothing can be concluded

Every figure comes from finished requests (`RequestSample`, one per Generate), so the same
arithmetic serves the control plane (samples labelled by plan version, engine/control/trials.py)
and a client replaying a trace (services/trace_replay.py):

    busy_s              the union of the requests' [arrival, end] intervals: time when at least one
                        request of the version was queued or running. Idle gaps in the load do not
                        count, so a version is not credited for traffic it was never offered.
    tokens_per_s        generated tokens / busy_s
    joules_per_token    energy attributed to the requests / generated tokens
    watts               energy / busy_s
    ttft_p99_s, itl_p99_s   over the requests (numpy's linear percentile)

`gain(objective, base, trial)` is how many times better `trial` is (> 1 better): tokens/s over
tokens/s, or joules/token the other way round. `judge` decides a trial: failed requests or a
broken constraint roll it back, so does a gain below 1 - tolerance; too few requests is
inconclusive (rolled back: a trial must show it is no worse).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["GOALS", "Judgement", "Measurement", "Objective", "RequestSample", "check", "gain", "judge", "measure",
           "objective_of", "violations"]

GOALS = ("max_tokens_per_s", "min_joules_per_token")
DEFAULT_MIN_REQUESTS = 4
DEFAULT_TOLERANCE = 0.05
MAX_TRIAL_S = 3600.0  # a trial with only a request window still ends by then
MAX_TRIAL_REQUESTS = 100_000
MAX_LATENCY_S = 3600.0
MAX_WATTS = 1e6


@dataclass(frozen=True)
class Objective:
    """The plan's objective in plain data; `goal` "" means the plan declares none."""

    goal: str = ""
    max_ttft_p99_s: float | None = None
    max_itl_p99_s: float | None = None
    max_watts: float | None = None
    trial_requests: int = 0
    trial_seconds: float = 0.0
    tolerance: float = DEFAULT_TOLERANCE
    min_requests: int = DEFAULT_MIN_REQUESTS

    @property
    def trials(self) -> bool:
        """Whether an accepted suggestion runs as a trial."""
        return bool(self.goal) and (self.trial_requests > 0 or self.trial_seconds > 0)

    @property
    def deadline_s(self) -> float:
        return self.trial_seconds if self.trial_seconds > 0 else MAX_TRIAL_S

    def describe(self) -> str:
        parts = [self.goal.replace("_", " ")]
        for name, value, unit in (("p99 TTFT", self.max_ttft_p99_s, "s"), ("p99 ITL", self.max_itl_p99_s, "s"),
                                  ("power", self.max_watts, "W")):
            if value is not None:
                parts.append(f"{name} <= {value:g} {unit}")
        return ", ".join(parts)


def check(obj: Objective) -> list[tuple[str, str]]:
    """(field, problem) for every value out of range; empty when the objective is sound."""
    out: list[tuple[str, str]] = []
    if obj.goal and obj.goal not in GOALS:
        out.append(("goal", f"goal {obj.goal!r} is not one of {', '.join(GOALS)}"))
    for name, value, high in (("max_ttft_p99_s", obj.max_ttft_p99_s, MAX_LATENCY_S),
                              ("max_itl_p99_s", obj.max_itl_p99_s, MAX_LATENCY_S),
                              ("max_watts", obj.max_watts, MAX_WATTS)):
        if value is not None and not (math.isfinite(value) and 0 < value <= high):
            out.append((name, f"{name} {value} must be a number in (0, {high:g}] (unset: no constraint)"))
    if not 0 <= obj.trial_requests <= MAX_TRIAL_REQUESTS:
        out.append(("trial_requests", f"trial_requests {obj.trial_requests} must be in 0..{MAX_TRIAL_REQUESTS}"))
    if not (math.isfinite(obj.trial_seconds) and 0 <= obj.trial_seconds <= MAX_TRIAL_S):
        out.append(("trial_seconds", f"trial_seconds {obj.trial_seconds} must be in 0..{MAX_TRIAL_S:g} (0: none)"))
    if not (math.isfinite(obj.tolerance) and 0 <= obj.tolerance < 1):
        out.append(("tolerance", f"tolerance {obj.tolerance} must be a fraction in [0, 1)"))
    if not 1 <= obj.min_requests <= MAX_TRIAL_REQUESTS:
        out.append(("min_requests", f"min_requests {obj.min_requests} must be in 1..{MAX_TRIAL_REQUESTS}"))
    if (obj.trial_requests or obj.trial_seconds) and not obj.goal:
        out.append(("goal", "a trial window needs a goal to judge trials by"))
    return out


@dataclass(frozen=True)
class RequestSample:
    """One finished request, as the metrics see it. Times are seconds on one clock."""

    start: float  # arrival
    end: float
    ttft_s: float | None  # None: no token was generated
    itl_s: tuple[float, ...]
    tokens: int
    energy_j: float = 0.0
    failed: bool = False


@dataclass(frozen=True)
class Measurement:
    """A window of finished requests, summarised (module docstring)."""

    requests: int = 0
    failed: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    tokens_per_s: float = 0.0
    joules_per_token: float = 0.0
    watts: float = 0.0
    ttft_p99_s: float = 0.0
    itl_p99_s: float = 0.0
    energy_j: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def value(self, goal: str) -> float:
        return self.tokens_per_s if goal == "max_tokens_per_s" else self.joules_per_token


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _p99(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 99)) if len(values) else 0.0


def measure(samples: Iterable[RequestSample]) -> Measurement:
    samples = list(samples)
    if not samples:
        return Measurement()
    ok = [s for s in samples if not s.failed]
    tokens = sum(s.tokens for s in ok)
    energy = sum(s.energy_j for s in ok)
    busy = busy_seconds((s.start, s.end) for s in samples)
    return Measurement(
        requests=len(samples), failed=len(samples) - len(ok), tokens=tokens, busy_s=busy,
        tokens_per_s=tokens / busy if busy > 0 else 0.0,
        joules_per_token=energy / tokens if tokens else 0.0,
        watts=energy / busy if busy > 0 else 0.0,
        ttft_p99_s=_p99([s.ttft_s for s in ok if s.ttft_s is not None]),
        itl_p99_s=_p99([x for s in ok for x in s.itl_s]), energy_j=energy)


def violations(obj: Objective, m: Measurement) -> list[str]:
    """The constraints `m` breaks, for people: "p99 TTFT 2.31 s > 1 s"."""
    out = []
    if m.failed:
        out.append(f"{m.failed} of {m.requests} requests failed")
    for name, limit, value, unit in (("p99 TTFT", obj.max_ttft_p99_s, m.ttft_p99_s, "s"),
                                     ("p99 ITL", obj.max_itl_p99_s, m.itl_p99_s, "s"),
                                     ("power", obj.max_watts, m.watts, "W")):
        if limit is not None and value > limit:
            out.append(f"{name} {value:.3g} {unit} > {limit:g} {unit}")
    return out


def gain(obj: Objective, base: Measurement, trial: Measurement) -> float:
    """How many times better `trial` scores than `base` under `obj.goal` (> 1: better)."""
    if obj.goal == "max_tokens_per_s":
        a, b = trial.tokens_per_s, base.tokens_per_s
    else:  # lower joules per token is better
        a, b = base.joules_per_token, trial.joules_per_token
    if b <= 0:
        return math.inf if a > 0 else 1.0
    return a / b


def format_value(goal: str, m: Measurement) -> str:
    return f"{m.tokens_per_s:.1f} tok/s" if goal == "max_tokens_per_s" else f"{m.joules_per_token:.3g} J/token"


@dataclass(frozen=True)
class Judgement:
    keep: bool
    reason: str
    gain: float | None = None  # None: no baseline to compare with


def judge(obj: Objective, base: Measurement | None, trial: Measurement, *, final: bool = True,
          base_label: str = "the version before") -> Judgement | None:
    """Decide a trial from its measurement and its base's (None: no baseline).

    `final=False` (the window is still open): roll back as soon as `min_requests` requests show a
    failure or a broken constraint, otherwise None (keep measuring). `final=True` (the window is
    over): always a judgement.
    """
    if trial.requests < obj.min_requests:
        if trial.failed:
            return Judgement(False, "; ".join(violations(obj, trial)))
        if not final:
            return None
        return Judgement(False, f"inconclusive: {trial.requests} requests finished in the window, "
                                f"{obj.min_requests} are needed to judge it")
    broken = violations(obj, trial)
    if broken:
        return Judgement(False, "constraint violated: " + "; ".join(broken))
    if not final:
        return None
    if base is None or base.requests < obj.min_requests:
        return Judgement(True, f"kept: {format_value(obj.goal, trial)}, constraints held; no baseline "
                               f"({base.requests if base else 0} requests of {base_label}) to compare with")
    g = gain(obj, base, trial)
    compared = f"{format_value(obj.goal, trial)} against {format_value(obj.goal, base)} for {base_label} (x{g:.2f})"
    if g < 1 - obj.tolerance:
        return Judgement(False, f"worse: {compared}", g)
    return Judgement(True, f"kept: {compared}, constraints held", g)


GOAL_NUMBERS = {1: "max_tokens_per_s", 2: "min_joules_per_token"}  # plan.proto Objective.Goal


def objective_of(plan) -> Objective:
    """The plan's `objective` (plan.proto) as an Objective; Objective() when it declares none.
    Unset optional fields take their defaults; an unknown goal number is kept so `check` names it."""
    if "objective" not in plan.DESCRIPTOR.fields_by_name or not plan.HasField("objective"):
        return Objective()
    o = plan.objective

    def opt(name: str, default=None):
        return getattr(o, name) if o.HasField(name) else default

    goal = GOAL_NUMBERS.get(o.goal, "" if o.goal == 0 else f"goal number {o.goal}")
    return Objective(goal=goal, max_ttft_p99_s=opt("max_ttft_p99_s"), max_itl_p99_s=opt("max_itl_p99_s"),
                     max_watts=opt("max_watts"), trial_requests=opt("trial_requests", 0),
                     trial_seconds=opt("trial_seconds", 0.0), tolerance=opt("tolerance", DEFAULT_TOLERANCE),
                     min_requests=opt("min_requests", DEFAULT_MIN_REQUESTS))
