"""WeOS agents: who may propose what (policy), how often (rate), the size limits (sizes), the
answer to a suggestion (verdicts), the audit log, and the reviewer that judges and applies."""

from engine.control.agents.audit_log import SuggestionLog, patch_json
from engine.control.agents.policy import MODES, AgentPolicy, AgentRule, FieldRule
from engine.control.agents.rate import RateLimiter
from engine.control.agents.reviewer import MAX_LIST, MAX_LIST_BYTES, SuggestionReviewer, Unauthenticated
from engine.control.agents.sizes import MAX_PATCH_BYTES, MAX_TEXT, Suggestion, bounded, oversize
from engine.control.agents.verdicts import DECISIONS, REJECTIONS, SuggestionRecord, Verdict

__all__ = [
    "DECISIONS",
    "MAX_LIST",
    "MAX_LIST_BYTES",
    "MAX_PATCH_BYTES",
    "MAX_TEXT",
    "MODES",
    "REJECTIONS",
    "AgentPolicy",
    "AgentRule",
    "FieldRule",
    "RateLimiter",
    "Suggestion",
    "SuggestionLog",
    "SuggestionRecord",
    "SuggestionReviewer",
    "Unauthenticated",
    "Verdict",
    "bounded",
    "oversize",
    "patch_json",
]
