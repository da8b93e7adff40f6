"""The answer to a suggestion (`Verdict`: its decision and rejection kind) and the audit
record of one (`SuggestionRecord`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.control.plans import ExecutionPlan
from protos.planengine.v1 import suggestion_pb2

Suggestion = suggestion_pb2.Suggestion

__all__ = ["DECISIONS", "REJECTIONS", "SuggestionRecord", "Verdict", "enum_names"]

def enum_names(enum: Any, prefix: str) -> tuple[str, ...]:
    """A wire enum's set values as the domain spells them: DECISION_PENDING_REVIEW -> "pending_review"."""
    return tuple(v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values if v.number)


# The names are suggestion.proto's enums: one list, which the audit log's CHECK, the servicer's
# conversion and the CLI's choices all follow.
DECISIONS = enum_names(suggestion_pb2.SuggestionVerdict.Decision, "DECISION_")
REJECTIONS = enum_names(suggestion_pb2.Rejection, "REJECTION_")


# --------------------------------------------------------------------------- verdicts and records


@dataclass(frozen=True)
class Verdict:
    """The answer to one suggestion. `decision` is one of DECISIONS, `rejection` one of
    REJECTIONS (empty unless rejected). `resulting_plan` is set for accepted, dry-run and
    pending ones (for a pending one, the plan as it would be if approved now)."""

    suggestion_id: str
    decision: str
    reason: str
    rejection: str = ""
    resulting_version: int = 0
    resulting_hash: str = ""
    current_version: int = 0
    resulting_plan: ExecutionPlan | None = None
    decided_at: float = 0.0
    audit_id: int = 0


@dataclass(frozen=True)
class SuggestionRecord:
    """One audit-log entry: the suggestion as received and its latest verdict (None only if the
    server stopped between receiving and judging it)."""

    id: int
    agent_id: str
    suggestion: Suggestion
    received_at: float
    mode: str
    patch_json: str
    verdict: Verdict | None
    decided_by: str
    trial: Any = None  # engine.control.trials.Trial, when the accepted suggestion ran as a trial
