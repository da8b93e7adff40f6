"""Canary trials: an accepted suggestion runs on probation, and the control plane undoes it by itself.

When the active plan declares an objective with a trial window (engine/control/objectives.py), a
suggestion accepted in `auto` mode (or approved by an operator) becomes the active version as
usual, and a trial starts:

    start    the base version's last window of finished requests is its baseline
    measure  every finished request of the trial version is a sample (labelled by plan version, as
             the metrics are); a failure or a broken constraint, once `min_requests` requests
             show it, ends the trial at once
    end      after `trial_requests` requests or `trial_seconds`, whichever comes first: kept if the
             constraints held and it scored no worse than the baseline (within `tolerance`),
             otherwise rolled back
    rollback through ControlPlane.rollback (load before commit, like an operator's), to the base
             version; PlanHistory's rollback event names the trial and the reason in its actor

While a trial runs, other suggestions for that plan are refused (`trial_running`): one change at
a time, each judged on its own. A trial whose version is replaced by another activation (an
operator's) is abandoned: nothing is undone. Every trial and its outcome is kept in the plan
store's database (table `plan_trials`) and shown with its suggestion (ListSuggestions).

Trials are judged on a thread of their own, never on the engine thread that reports a finished
request: a rollback may load a runtime and drain the current one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engine.control.objectives import Judgement, Measurement, Objective, RequestSample, judge, measure
from engine.control.database import SqlDatabase
from engine.control.plan_store import label

log = logging.getLogger(__name__)

__all__ = ["Trial", "TrialLog", "Trials", "VersionSamples"]

STATES = ("running", "kept", "rolled_back", "abandoned")
SAMPLES_PER_VERSION = 2048
CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Trial:
    id: int
    suggestion: int  # audit id
    plan_id: str
    base_version: int
    version: int
    started_at: float
    objective: Objective
    state: str = "running"
    reason: str = ""
    base: Measurement | None = None
    trial: Measurement | None = None
    gain: float | None = None
    ended_at: float | None = None
    base_since: float = -math.inf  # the base's requests that count arrived after this (in memory only)


class VersionSamples:
    """Finished requests per plan version (bounded), fed by the metrics hub. Thread-safe."""

    def __init__(self, per_version: int = SAMPLES_PER_VERSION):
        self._per_version = per_version
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, int], deque[RequestSample]] = {}

    def add(self, plan_id: str, version: int, sample: RequestSample) -> None:
        with self._lock:
            self._by_version.setdefault((plan_id, version), deque(maxlen=self._per_version)).append(sample)

    def since(self, plan_id: str, version: int, t0: float) -> list[RequestSample]:
        with self._lock:
            return [s for s in self._by_version.get((plan_id, version), ()) if s.end >= t0]

    def before(self, plan_id: str, version: int, t0: float, last: int = 0, window_s: float = 0.0,
               arrived_after: float = -math.inf) -> list[RequestSample]:
        """The version's requests that arrived after `arrived_after` and ended by `t0`: the `last`
        ones, or those of the last `window_s`."""
        with self._lock:
            done = [s for s in self._by_version.get((plan_id, version), ())
                    if s.end <= t0 and s.start >= arrived_after]
        if last:
            return done[-last:]
        return [s for s in done if s.end >= t0 - window_s] if window_s else done


# --------------------------------------------------------------------------- the durable record


def _migrations(db: SqlDatabase) -> list[list[str]]:
    """The trials table, in `db`'s column types."""
    states = ", ".join(repr(s) for s in STATES)
    return [[
        db.ddl(f"""CREATE TABLE plan_trials (
            id {{serial}},
            suggestion BIGINT NOT NULL,       -- the suggestion's audit id
            plan_id TEXT NOT NULL,
            base_version INTEGER NOT NULL,
            version INTEGER NOT NULL,
            objective TEXT NOT NULL,          -- JSON: the objective it was judged by
            started_at {{double}} NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            reason TEXT NOT NULL,
            base TEXT NOT NULL,               -- JSON measurement of the base version ('' while running)
            trial TEXT NOT NULL,              -- JSON measurement of the trial version
            gain {{double}},
            ended_at {{double}})"""),
        "CREATE INDEX plan_trials_by_suggestion ON plan_trials (suggestion)",
    ]]


def _objective_json(o: Objective) -> str:
    return json.dumps(o.__dict__, sort_keys=True)


def _measurement(text: str) -> Measurement | None:
    return Measurement(**json.loads(text)) if text else None


class TrialLog:
    """Trials in the plan store's database (engine/control/database.py: SQLite or PostgreSQL)."""

    SCHEMA_COMPONENT = "trials"

    def __init__(self, db: SqlDatabase):
        self.db = db
        db.ensure_schema(self.SCHEMA_COMPONENT, _migrations(db))

    def _sql(self, text: str) -> str:
        return self.db.sql(text)

    def started(self, t: Trial) -> Trial:
        with self.db.transaction() as conn:
            trial_id = conn.execute(self._sql(
                "INSERT INTO plan_trials (suggestion, plan_id, base_version, version, objective, started_at, state, "
                "reason, base, trial) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, '', '') RETURNING id"),
                (t.suggestion, t.plan_id, t.base_version, t.version, _objective_json(t.objective), t.started_at,
                 t.reason)).fetchone()[0]
        return replace(t, id=trial_id)

    def ended(self, t: Trial) -> None:
        with self.db.transaction() as conn:
            conn.execute(self._sql(
                "UPDATE plan_trials SET state = ?, reason = ?, base = ?, trial = ?, gain = ?, ended_at = ? "
                "WHERE id = ?"),
                (t.state, t.reason[:4000], json.dumps(t.base.as_dict()) if t.base else "",
                 json.dumps(t.trial.as_dict()) if t.trial else "", t.gain, t.ended_at, t.id))

    def _select(self, where: str, args: Sequence[Any]) -> list[Trial]:
        sql = self._sql("SELECT id, suggestion, plan_id, base_version, version, objective, started_at, state, reason, "
                        "base, trial, gain, ended_at FROM plan_trials " + where)
        with self.db.snapshot() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [Trial(r[0], r[1], r[2], r[3], r[4], r[6], Objective(**json.loads(r[5])), r[7], r[8],
                      _measurement(r[9]), _measurement(r[10]), r[11], r[12]) for r in rows]

    def for_suggestions(self, ids: Sequence[int]) -> dict[int, Trial]:
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        return {t.suggestion: t for t in self._select(f"WHERE suggestion IN ({marks}) ORDER BY id", list(ids))}

    def running(self) -> list[Trial]:
        return self._select("WHERE state = 'running' ORDER BY id", ())


# --------------------------------------------------------------------------- the judge


class Trials:
    """Starts, measures and ends trials against a ControlPlane (anything with `store`, `metrics`
    and `rollback(plan_id, version, actor)`). `lock` is shared with the suggestion reviewer, so no
    suggestion is judged while a trial is being rolled back.

    `background=False` (tests): nothing runs on its own; call `check()`. `clock` is unix time.
    """

    def __init__(self, control: Any, log_: TrialLog, *, clock: Callable[[], float] = time.time,
                 background: bool = True, lock: threading.Lock | None = None):
        self.control = control
        self.log = log_
        self.lock = lock or threading.Lock()
        self.samples = VersionSamples()
        self._clock = clock
        self._running: dict[str, Trial] = {}  # plan id -> its running trial
        # plan id -> (version, since when it is active) as far as trials know: a baseline counts only
        # requests that arrived after its version became active (none of a trial's, none of a reload's)
        self._since: dict[str, tuple[int, float]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        # A restart ends what the previous process left running (its samples were in memory). Only
        # in a SQLite store, which one server owns: replicas sharing PostgreSQL judge their own.
        for t in log_.running() if log_.db.name == "sqlite" else ():
            self._finish(t, "abandoned", "the server restarted during the trial; nothing was undone")
        hub = getattr(control, "metrics", None)
        if hub is not None and hasattr(hub, "add_listener"):
            hub.add_listener(self.on_finish)
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="plan-trials", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------- samples

    def on_finish(self, final: Any) -> None:
        """A request finished (engine thread): record it under its plan version; judge elsewhere."""
        stamp, t = final.tag, final.timings
        if stamp is None:
            return
        end = self._clock()
        ttft = t.get("ttft_s") if final.completion_tokens else None
        self.samples.add(stamp.id, stamp.version, RequestSample(
            end - t["total_s"], end, ttft, tuple(final.itl_s), final.completion_tokens, final.energy_j,
            final.finish_reason == "error"))
        if stamp.id in self._running:
            self._wake.set()

    # ----------------------------------------------------------------- lifecycle

    def running(self, plan_id: str) -> Trial | None:
        return self._running.get(plan_id)

    def _arrived_after(self, plan_id: str, version: int) -> float:
        since = self._since.get(plan_id)
        return since[1] if since is not None and since[0] == version else -math.inf

    def baseline_pending(self, plan: Any, objective: Objective) -> str | None:
        """Why a trial could not be judged against `plan` yet (it has not served a baseline window
        since it became active), or None when it has."""
        if plan.id not in self._since or self._since[plan.id][0] != plan.version:
            return None  # active since before trials knew it: all its requests count
        since = self._since[plan.id][1]
        fresh = len(self.samples.before(plan.id, plan.version, self._clock(), arrived_after=since))
        need = max(objective.trial_requests, objective.min_requests) if objective.trial_requests \
            else objective.min_requests
        waited = self._clock() - since
        if fresh >= need and (objective.trial_requests or waited >= objective.trial_seconds):
            return None
        return (f"baseline: v{plan.version} has served {fresh} of the {need} requests"
                + (f" and {waited:.0f} of the {objective.trial_seconds:g} s" if not objective.trial_requests else "")
                + " a trial is compared with since it became active; retry later")

    def start(self, suggestion: int, base: Any, version: Any, objective: Objective) -> Trial:
        """`version` (just activated, replacing `base`) goes on trial. Call with `lock` held."""
        now = self._clock()
        trial = self.log.started(Trial(0, suggestion, base.id, base.version, version.version, now, objective,
                                       reason=f"on trial against {label(base)}: {objective.describe()}",
                                       base_since=self._arrived_after(base.id, base.version)))
        self._running[base.id] = trial
        self._since[base.id] = (version.version, now)
        log.info("trial %d: %s on trial (suggestion #%d), base %s", trial.id, label(version), suggestion, label(base))
        return trial

    def check(self) -> list[Trial]:
        """Judge every running trial once; returns those that ended."""
        ended = []
        for trial in list(self._running.values()):
            done = self._check(trial)
            if done is not None:
                ended.append(done)
        return ended

    def _measure(self, trial: Trial) -> tuple[Measurement | None, Measurement]:
        o = trial.objective
        base = self.samples.before(trial.plan_id, trial.base_version, trial.started_at, last=o.trial_requests,
                                   window_s=o.trial_seconds,
                                   arrived_after=trial.base_since)
        samples = self.samples.since(trial.plan_id, trial.version, trial.started_at)
        if o.trial_requests:
            samples = samples[:o.trial_requests]
        return (measure(base) if base else None), measure(samples)

    def _check(self, trial: Trial) -> Trial | None:
        o = trial.objective
        active = self.control.store.active()
        if active is None or (active.id, active.version) != (trial.plan_id, trial.version):
            with self.lock:
                return self._finish(trial, "abandoned", f"{label(active)} was activated during the trial; "
                                                        "nothing was undone")
        base, measured = self._measure(trial)
        over = (o.trial_requests and measured.requests >= o.trial_requests) or \
            self._clock() - trial.started_at >= o.deadline_s
        verdict = judge(o, base, measured, final=bool(over), base_label=f"v{trial.base_version}")
        if verdict is None:
            return None
        return self._conclude(trial, verdict, base, measured)

    def _conclude(self, trial: Trial, verdict: Judgement, base: Measurement | None,
                  measured: Measurement) -> Trial:
        trial = replace(trial, base=base, trial=measured, gain=verdict.gain)
        if verdict.keep:
            with self.lock:
                return self._finish(trial, "kept", verdict.reason)
        with self.lock:  # no suggestion is judged meanwhile
            active = self.control.store.active()
            if active is None or (active.id, active.version) != (trial.plan_id, trial.version):
                return self._finish(trial, "abandoned", f"{label(active)} was activated during the trial; "
                                                        "nothing was undone")
            reason = f"rolled back to v{trial.base_version}: {verdict.reason}"
            actor = f"control-plane: trial #{trial.id} of suggestion #{trial.suggestion} rolled back: {verdict.reason}"
            try:
                self.control.rollback(trial.plan_id, trial.base_version, actor=actor[:500])
            except Exception as exc:  # noqa: BLE001 - recorded; the trial version stays active
                log.exception("trial %d: the rollback failed", trial.id)
                return self._finish(trial, "abandoned", f"rollback to v{trial.base_version} failed ({exc}) after: "
                                                        f"{verdict.reason}")
            return self._finish(trial, "rolled_back", reason)

    def _finish(self, trial: Trial, state: str, reason: str) -> Trial:
        trial = replace(trial, state=state, reason=reason, ended_at=self._clock())
        self.log.ended(trial)
        if self._running.get(trial.plan_id, trial).id == trial.id:
            self._running.pop(trial.plan_id, None)
            if state == "rolled_back":
                self._since[trial.plan_id] = (trial.base_version, trial.ended_at)
            elif state == "abandoned":
                self._since.pop(trial.plan_id, None)
        log.info("trial %d (%s@%d): %s: %s", trial.id, trial.plan_id, trial.version, state, reason)
        return trial

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(CHECK_INTERVAL_S)
            self._wake.clear()
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bug must not stop the judging of later trials
                log.exception("checking trials failed")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
