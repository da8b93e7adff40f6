"""The reviewer: how each WeOS agent suggestion is judged, applied and recorded.

An external agent streams Suggestions: a field-mask patch computed against one version of
one plan. The control plane never hands over control: `SuggestionReviewer.review` answers
every suggestion with exactly one verdict, checking in this order (the first failure is
the verdict, named by its `rejection` kind):

    rate_limit      more than the agent's `rate_per_minute` over the last 60 s (every
                    suggestion admitted counts, whatever its verdict; refused ones do not)
    malformed       (sizes, before anything is stored) a rationale or expected effect over
                    MAX_TEXT characters, a suggestion id over MAX_SUGGESTION_ID, a plan or
                    agent id over MAX_ID_LENGTH, a patch over MAX_PATCH_BYTES serialized, more
                    than MAX_PATHS mask paths or one over MAX_PATH_CHARS
    identity        the claimed `agent_id` is not the agent the token belongs to
    malformed       no plan id, no base version, an empty mask, a path naming no plan field
                    or an identity field (apply_patch's rules)
    not_authorised  the plan id or a path the agent's policy does not list
    out_of_bounds   a value outside the policy's min/max or allowed values for its path
    trial_running   (plans whose objective asks for trials) an earlier change is still on
                    trial, or the active version has not yet served a baseline window
    stale           the plan is not the active one, or base_version is not its active version
                    (`current_version` says which is, so the agent can rebase)
    invalid_plan    the patched plan fails full validation (normalize + validate)
    no_change       the patched plan has the active plan's hash

Then by the agent's mode: `auto` stores the result as a NEW plan version and activates it
through the control plane (a model change loads before it switches; requests in flight
finish); `review` leaves it pending until an operator approves (checked again from stale
on, then applied) or rejects it; `dry_run` reports the plan and hash it would create and
stores no plan. Plans are never changed in place; `plan rollback` undoes an accepted one.

Every suggestion is written to the audit log (audit_log.py) when it arrives, and every
verdict when it is given (a pending one and its later operator decision are both kept). The
rate and size checks run before that write, and a suggestion over a size limit is stored
truncated (`bounded`, sizes.py), so an agent cannot grow the log by more than a few kilobytes
a suggestion; listings return at most MAX_LIST records, their long fields cut to the same
limits. Who may propose what is the agent policy (policy.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from engine.control.agents.audit_log import SuggestionLog
from engine.control.agents.policy import AgentPolicy, AgentRule
from engine.control.agents.rate import RateLimiter
from engine.control.agents.sizes import MAX_TEXT, Suggestion, _cut, bounded, oversize
from engine.control.agents.verdicts import DECISIONS, SuggestionRecord, Verdict
from engine.control.objectives import objective_of
from engine.control.plan_store import PlanStore, label
from engine.control.plans import (
    MAX_DESCRIPTION_LENGTH,
    ExecutionPlan,
    InvalidPlan,
    PlanEnvironment,
    PreparedPlan,
    apply_patch,
    plan_hash,
)
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, shown

log = logging.getLogger(__name__)

__all__ = ["SuggestionReviewer", "Unauthenticated"]

MAX_LIST = 1000  # suggestions one ListSuggestions answers at most (default 100)
MAX_LIST_BYTES = 4 << 20  # ...and about this many bytes of them: well under the 16 MiB message limit


class Unauthenticated(EngineError):
    """No credentials, or credentials no agent in the policy holds."""

    code = "UNAUTHENTICATED"


# --------------------------------------------------------------------------- the reviewer


class PlanAuthority(Protocol):
    """What the reviewer needs of the control plane (engine.control.control_plane.ControlPlane)."""

    store: PlanStore
    env: PlanEnvironment

    def submit_plan(self, plan: ExecutionPlan | PreparedPlan, activate: bool = False,
                    actor: str = "") -> tuple[ExecutionPlan, bool]: ...

    def submit_if_active(self, plan: ExecutionPlan | PreparedPlan, base_version: int,
                         actor: str = "") -> tuple[ExecutionPlan, ExecutionPlan]: ...


class _Rejected(Exception):
    def __init__(self, rejection: str, reason: str, current_version: int = 0):
        super().__init__(reason)
        self.rejection, self.reason, self.current_version = rejection, reason, current_version


class SuggestionReviewer:
    """Judges suggestions against the agent policy and the active plan, applies accepted ones
    through the control plane, and records everything in the audit log.

    Judging and applying hold one lock, so two agents (or an agent and an operator approving)
    never both rebase on the same version. A plan change made outside it (SubmitPlan,
    ActivatePlan, RollbackPlan) between its staleness check and its activation is not
    excluded: the accepted version would then replace that change (it stays in the history).
    """

    def __init__(self, control: PlanAuthority, policy: AgentPolicy, log: SuggestionLog,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 trials: Any = None):
        """`trials` (engine.control.trials.Trials): accepted suggestions run as trials when the plan's
        objective asks for them; its lock is this reviewer's, so a rollback and a verdict never interleave."""
        self.control = control
        self.policy = policy
        self.log = log
        self.trials = trials
        self._clock = clock
        self._rates = RateLimiter(monotonic)
        self._lock = trials.lock if trials is not None else threading.Lock()

    def authenticate(self, token: str | None) -> AgentRule:
        """The agent holding `token`; Unauthenticated when none does."""
        if not self.policy.agents:
            raise Unauthenticated("this server accepts no agent suggestions: it has no agent policy "
                                  "(start it with --agent-policy FILE)")
        agent = self.policy.authenticate(token)
        if agent is None:
            raise Unauthenticated("missing or unknown agent token (send metadata 'authorization: Bearer <token>' "
                                  "with a token from the server's agent policy)")
        return agent

    # ----------------------------------------------------------------- one suggestion

    def review(self, agent: AgentRule, s: Suggestion) -> Verdict:
        """One verdict for one suggestion from the authenticated `agent`, recorded durably.
        Rate and sizes are checked before the write, which keeps only a bounded record."""
        wait = self._rates.admit(agent.id, agent.rate_per_minute)
        too_big = oversize(s)
        audit_id = self.log.received(agent.id, bounded(s), agent.mode, self._clock())
        try:
            if wait:
                raise _Rejected("rate_limit", f"rate limit: agent {agent.id!r} may send {agent.rate_per_minute} "
                                              f"suggestions per minute; retry in {math.ceil(wait)} s")
            if too_big:
                raise _Rejected("malformed", "malformed: " + "; ".join(too_big))
            self._admit(agent, s)
            with self._lock:
                verdict = self._judge(agent, s, agent.mode, audit_id)
        except _Rejected as r:
            verdict = self._verdict(s, "rejected", r.reason, audit_id, rejection=r.rejection,
                                    current_version=r.current_version)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, and still one verdict for the suggestion
            log.exception("reviewing suggestion #%d failed", audit_id)
            verdict = self._verdict(s, "rejected", _cut(f"internal error: {type(exc).__name__}: {exc}", MAX_TEXT),
                                    audit_id)
        self.log.decided(audit_id, verdict, "policy")
        return verdict

    def _admit(self, agent: AgentRule, s: Suggestion) -> None:
        """Identity, form, authority and bounds: the checks that need no plan (rate and sizes
        come first, in review)."""
        if s.agent_id != agent.id:
            raise _Rejected("identity", f"identity: agent_id {shown(s.agent_id)} is not the authenticated agent "
                                        f"{agent.id!r}")
        paths = list(s.update_mask.paths)
        problems = []
        if not s.plan_id:
            problems.append("plan_id is empty")
        if not s.base_version:
            problems.append("base_version is 0: give the plan version the patch was computed against")
        try:
            apply_patch(ExecutionPlan(), s.patch, paths)  # checks the paths only
        except InvalidPlan as exc:
            problems += [v.description for v in exc.violations]
        if problems:
            raise _Rejected("malformed", "malformed: " + "; ".join(problems))
        self._authorise(agent, s)

    @staticmethod
    def _authorise(agent: AgentRule, s: Suggestion) -> None:
        """The plan, every path and every bounded value are within the agent's policy."""
        paths = list(s.update_mask.paths)
        if not agent.may_change_plan(s.plan_id):
            raise _Rejected("not_authorised", f"not authorised: agent {agent.id!r} may not change plan "
                                              f"{shown(s.plan_id)} (it may change: {', '.join(sorted(agent.plans))})")
        denied = [p for p in paths if not agent.allows(p)]
        if denied:
            raise _Rejected("not_authorised", f"not authorised: agent {agent.id!r} may not change "
                                              f"{', '.join(map(repr, denied))} (it may change: "
                                              f"{', '.join(sorted(agent.fields))})")
        bad = agent.out_of_bounds(s.patch, paths)
        if bad:
            raise _Rejected("out_of_bounds", "out of bounds: " + "; ".join(bad))

    def _judge(self, agent: AgentRule, s: Suggestion, mode: str, audit_id: int, actor: str = "") -> Verdict:
        """Against the active plan: stale, valid, a change; then by mode. Holds self._lock."""
        active = self.control.store.active()
        if active is None or active.id != s.plan_id:
            raise _Rejected("stale", f"stale: plan {shown(s.plan_id)} is not the active plan "
                                     f"({label(active)}); suggest against the active one")
        running = self.trials.running(active.id) if self.trials is not None else None
        if running is not None:
            raise _Rejected("trial_running", f"trial running: {label(active)} (suggestion #{running.suggestion}) is "
                                             f"on trial; retry once ListSuggestions shows its outcome", active.version)
        objective = objective_of(active)  # the operator's, as it is before the change
        pending = self.trials.baseline_pending(active, objective) if self.trials and objective.trials else None
        if pending:
            raise _Rejected("trial_running", f"trial running: {pending}", active.version)
        if s.base_version != active.version:
            raise _Rejected("stale", f"stale: base version {s.base_version} is not the active version "
                                     f"{active.version} of plan {active.id!r}; rebase on version {active.version}",
                            active.version)
        paths = list(s.update_mask.paths)
        candidate = apply_patch(active, s.patch, paths)
        if "description" not in paths:
            note = f"suggestion #{audit_id} by agent {agent.id}: {s.rationale}"
            candidate.description = note[:MAX_DESCRIPTION_LENGTH]
        try:
            prepared = PreparedPlan.of(candidate, self.control.env)
        except InvalidPlan as exc:
            raise _Rejected("invalid_plan", f"invalid plan: {'; '.join(map(str, exc.violations))}",
                            active.version) from None
        plan = prepared.plan
        digest = plan_hash(plan)
        if digest == active.hash:
            raise _Rejected("no_change", f"no change: the patch leaves {label(active)} as it is", active.version)

        if mode == "dry_run":
            preview = self._preview(plan, digest)
            return self._verdict(s, "dry_run", f"dry run: would create {label(preview)} (#{digest[:12]}); "
                                 "nothing applied", audit_id, plan=preview, current_version=active.version)
        if mode == "review":
            return self._verdict(s, "pending_review", f"pending review: valid against {label(active)}; an operator "
                                 f"approves or rejects suggestion {audit_id}", audit_id, plan=plan,
                                 current_version=active.version)
        try:  # compare-and-swap: another replica sharing the store may have changed the plan since
            stored, _ = self.control.submit_if_active(prepared, active.version, actor=actor or f"agent:{agent.id}")
        except Exception as exc:  # noqa: BLE001 - nothing stored: a lost race, or a model that did not load
            if getattr(exc, "current_version", None) is not None:  # lost the race
                raise _Rejected("stale", str(exc), exc.current_version) from None
            current = self.control.store.active()
            raise _Rejected("activation_failed", f"activation failed: {exc}",
                            current.version if current is not None and current.id == s.plan_id else 0) from None
        if self.trials is not None and objective.trials:
            self.trials.start(audit_id, active, stored, objective)
            window = " or ".join(w for w in (f"{objective.trial_requests} requests" if objective.trial_requests else "",
                                             f"{objective.trial_seconds:g} s" if objective.trial_seconds else "") if w)
            return self._verdict(s, "accepted", f"accepted as a trial: {label(stored)} (#{stored.hash[:12]}) is "
                                 f"active for {window}, then kept or rolled back to {label(active)} "
                                 f"({objective.describe()})", audit_id, plan=stored, current_version=stored.version)
        return self._verdict(s, "accepted", f"accepted: {label(stored)} (#{stored.hash[:12]}) is active, "
                             f"was {label(active)}", audit_id, plan=stored, current_version=stored.version)

    def _preview(self, plan: ExecutionPlan, digest: str) -> ExecutionPlan:
        """The version a submit would create (the newest one when it has this content)."""
        preview = ExecutionPlan()
        preview.CopyFrom(plan)
        newest = self.control.store.get(plan.id)
        preview.version = newest.version if newest.hash == digest else newest.version + 1
        preview.hash = digest
        return preview

    def _verdict(self, s: Suggestion, decision: str, reason: str, audit_id: int, *, rejection: str = "",
                 plan: ExecutionPlan | None = None, current_version: int = 0) -> Verdict:
        return Verdict(s.suggestion_id, decision, reason, rejection,
                       resulting_version=plan.version if plan is not None else 0,
                       resulting_hash=(plan.hash or plan_hash(plan)) if plan is not None else "",
                       current_version=current_version, resulting_plan=plan, decided_at=self._clock(),
                       audit_id=audit_id)

    # ----------------------------------------------------------------- operators

    def decide(self, audit_id: int, approve: bool, actor: str, note: str = "") -> SuggestionRecord:
        """An operator's verdict on a pending suggestion. Approving checks it again against the
        active plan (it may have gone stale) and, if it still holds, applies it as `auto` would."""
        with self._lock:
            record = self.log.get(audit_id)
            if record.verdict is None or record.verdict.decision != "pending_review":
                state = record.verdict.decision if record.verdict else "undecided"
                raise FailedPrecondition(f"suggestion {audit_id} is not pending review (it is {state})")
            s = record.suggestion
            by = f" ({note})" if note else ""
            if not approve:
                verdict = self._verdict(s, "rejected", f"operator: rejected by {actor}{by}", audit_id,
                                        rejection="operator")
            else:
                agent = self.policy.agents.get(record.agent_id)
                try:
                    if agent is None:
                        raise _Rejected("not_authorised", f"not authorised: agent {record.agent_id!r} is no "
                                                          "longer in the agent policy")
                    self._authorise(agent, s)  # the policy may have changed since (a restart)
                    verdict = self._judge(agent, s, "auto", audit_id,
                                          actor=f"agent:{agent.id} approved by {actor}")
                except _Rejected as r:
                    verdict = self._verdict(s, "rejected", r.reason, audit_id, rejection=r.rejection,
                                            current_version=r.current_version)
            self.log.decided(audit_id, verdict, actor + by)
            return self.log.get(audit_id)

    def list(self, agent_id: str = "", decision: str = "", plan_id: str = "", limit: int = 100) -> list[SuggestionRecord]:
        """Newest first; `limit` 0 means 100; at most MAX_LIST records and about MAX_LIST_BYTES
        (each record's fields are bounded, so a reply always fits a message)."""
        if decision and decision not in DECISIONS:
            raise InvalidArgument(f"decision {shown(decision)} is not one of {', '.join(DECISIONS)}", field="decision")
        records, size = [], 0
        for record in self.log.list(agent_id, decision, plan_id, min(limit or 100, MAX_LIST)):
            size += record.suggestion.ByteSize() + len(record.patch_json) + \
                (len(record.verdict.reason) if record.verdict else 0) + 256
            if records and size > MAX_LIST_BYTES:
                break
            records.append(record)
        if self.trials is not None:
            trials = self.trials.log.for_suggestions([r.id for r in records])
            records = [replace(r, trial=trials.get(r.id)) for r in records]
        return records
