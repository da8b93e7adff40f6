import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos.planengine.v1 import plan_pb2 as _plan_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Rejection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_UNSPECIFIED: _ClassVar[Rejection]
    REJECTION_RATE_LIMIT: _ClassVar[Rejection]
    REJECTION_IDENTITY: _ClassVar[Rejection]
    REJECTION_MALFORMED: _ClassVar[Rejection]
    REJECTION_NOT_AUTHORISED: _ClassVar[Rejection]
    REJECTION_OUT_OF_BOUNDS: _ClassVar[Rejection]
    REJECTION_STALE: _ClassVar[Rejection]
    REJECTION_INVALID_PLAN: _ClassVar[Rejection]
    REJECTION_NO_CHANGE: _ClassVar[Rejection]
    REJECTION_ACTIVATION_FAILED: _ClassVar[Rejection]
    REJECTION_OPERATOR: _ClassVar[Rejection]
    REJECTION_TRIAL_RUNNING: _ClassVar[Rejection]
REJECTION_UNSPECIFIED: Rejection
REJECTION_RATE_LIMIT: Rejection
REJECTION_IDENTITY: Rejection
REJECTION_MALFORMED: Rejection
REJECTION_NOT_AUTHORISED: Rejection
REJECTION_OUT_OF_BOUNDS: Rejection
REJECTION_STALE: Rejection
REJECTION_INVALID_PLAN: Rejection
REJECTION_NO_CHANGE: Rejection
REJECTION_ACTIVATION_FAILED: Rejection
REJECTION_OPERATOR: Rejection
REJECTION_TRIAL_RUNNING: Rejection

class Suggestion(_message.Message):
    __slots__ = ("suggestion_id", "agent_id", "plan_id", "base_version", "update_mask", "patch", "rationale", "expected_effect")
    SUGGESTION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EFFECT_FIELD_NUMBER: _ClassVar[int]
    suggestion_id: str
    agent_id: str
    plan_id: str
    base_version: int
    update_mask: _field_mask_pb2.FieldMask
    patch: _plan_pb2.ExecutionPlan
    rationale: str
    expected_effect: str
    def __init__(self, suggestion_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., base_version: _Optional[int] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., patch: _Optional[_Union[_plan_pb2.ExecutionPlan, _Mapping]] = ..., rationale: _Optional[str] = ..., expected_effect: _Optional[str] = ...) -> None: ...

class SuggestionVerdict(_message.Message):
    __slots__ = ("suggestion_id", "decision", "reason", "resulting_version", "resulting_hash", "current_version", "resulting_plan", "decided_at", "audit_id", "rejection")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[SuggestionVerdict.Decision]
        DECISION_ACCEPTED: _ClassVar[SuggestionVerdict.Decision]
        DECISION_REJECTED: _ClassVar[SuggestionVerdict.Decision]
        DECISION_PENDING_REVIEW: _ClassVar[SuggestionVerdict.Decision]
        DECISION_DRY_RUN: _ClassVar[SuggestionVerdict.Decision]
    DECISION_UNSPECIFIED: SuggestionVerdict.Decision
    DECISION_ACCEPTED: SuggestionVerdict.Decision
    DECISION_REJECTED: SuggestionVerdict.Decision
    DECISION_PENDING_REVIEW: SuggestionVerdict.Decision
    DECISION_DRY_RUN: SuggestionVerdict.Decision
    SUGGESTION_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESULTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTING_HASH_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTING_PLAN_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    suggestion_id: str
    decision: SuggestionVerdict.Decision
    reason: str
    resulting_version: int
    resulting_hash: str
    current_version: int
    resulting_plan: _plan_pb2.ExecutionPlan
    decided_at: _timestamp_pb2.Timestamp
    audit_id: int
    rejection: Rejection
    def __init__(self, suggestion_id: _Optional[str] = ..., decision: _Optional[_Union[SuggestionVerdict.Decision, str]] = ..., reason: _Optional[str] = ..., resulting_version: _Optional[int] = ..., resulting_hash: _Optional[str] = ..., current_version: _Optional[int] = ..., resulting_plan: _Optional[_Union[_plan_pb2.ExecutionPlan, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., audit_id: _Optional[int] = ..., rejection: _Optional[_Union[Rejection, str]] = ...) -> None: ...

class TrialMeasurement(_message.Message):
    __slots__ = ("requests", "failed", "tokens", "busy_s", "tokens_per_s", "joules_per_token", "watts", "ttft_p99_s", "itl_p99_s")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    JOULES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WATTS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_S_FIELD_NUMBER: _ClassVar[int]
    ITL_P99_S_FIELD_NUMBER: _ClassVar[int]
    requests: int
    failed: int
    tokens: int
    busy_s: float
    tokens_per_s: float
    joules_per_token: float
    watts: float
    ttft_p99_s: float
    itl_p99_s: float
    def __init__(self, requests: _Optional[int] = ..., failed: _Optional[int] = ..., tokens: _Optional[int] = ..., busy_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., joules_per_token: _Optional[float] = ..., watts: _Optional[float] = ..., ttft_p99_s: _Optional[float] = ..., itl_p99_s: _Optional[float] = ...) -> None: ...

class TrialOutcome(_message.Message):
    __slots__ = ("state", "base_version", "version", "started_at", "ended_at", "window_requests", "window_s", "reason", "base", "trial", "gain")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[TrialOutcome.State]
        STATE_RUNNING: _ClassVar[TrialOutcome.State]
        STATE_KEPT: _ClassVar[TrialOutcome.State]
        STATE_ROLLED_BACK: _ClassVar[TrialOutcome.State]
        STATE_ABANDONED: _ClassVar[TrialOutcome.State]
    STATE_UNSPECIFIED: TrialOutcome.State
    STATE_RUNNING: TrialOutcome.State
    STATE_KEPT: TrialOutcome.State
    STATE_ROLLED_BACK: TrialOutcome.State
    STATE_ABANDONED: TrialOutcome.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    state: TrialOutcome.State
    base_version: int
    version: int
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    window_requests: int
    window_s: float
    reason: str
    base: TrialMeasurement
    trial: TrialMeasurement
    gain: float
    def __init__(self, state: _Optional[_Union[TrialOutcome.State, str]] = ..., base_version: _Optional[int] = ..., version: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_requests: _Optional[int] = ..., window_s: _Optional[float] = ..., reason: _Optional[str] = ..., base: _Optional[_Union[TrialMeasurement, _Mapping]] = ..., trial: _Optional[_Union[TrialMeasurement, _Mapping]] = ..., gain: _Optional[float] = ...) -> None: ...

class SuggestionRecord(_message.Message):
    __slots__ = ("id", "agent_id", "suggestion", "verdict", "received_at", "mode", "decided_by", "patch_json", "trial")
    ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SUGGESTION_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    PATCH_JSON_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    id: int
    agent_id: str
    suggestion: Suggestion
    verdict: SuggestionVerdict
    received_at: _timestamp_pb2.Timestamp
    mode: str
    decided_by: str
    patch_json: str
    trial: TrialOutcome
    def __init__(self, id: _Optional[int] = ..., agent_id: _Optional[str] = ..., suggestion: _Optional[_Union[Suggestion, _Mapping]] = ..., verdict: _Optional[_Union[SuggestionVerdict, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mode: _Optional[str] = ..., decided_by: _Optional[str] = ..., patch_json: _Optional[str] = ..., trial: _Optional[_Union[TrialOutcome, _Mapping]] = ...) -> None: ...
