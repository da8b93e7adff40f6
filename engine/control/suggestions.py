"""WeOS agent suggestions: who may propose what, how each proposal is judged, and the audit log.

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

Every suggestion is written to the audit log when it arrives, and every verdict when it is
given (a pending one and its later operator decision are both kept), in the plan store's
database (its SQLite file, or its PostgreSQL database). The rate and size checks run before
that write, and a suggestion over a size limit is stored truncated (`bounded`), so an agent
cannot grow the log by more than a few kilobytes a suggestion; listings return at most
MAX_LIST records, their long fields cut to the same limits.

The policy file (JSON) maps tokens to agents and says what each may do:

    {"agents": {
       "tuner": {"token_sha256": "<hex sha256 of the token>",   (or "token": "<the token>")
                 "mode": "auto",                                 (auto | review | dry_run)
                 "rate_per_minute": 12,
                 "plans": ["default"],                           (optional; default: any)
                 "fields": {"scheduler_policy": {"values": ["LATENCY", "THROUGHPUT"]},
                            "batching.max_batch_size": {"min": 1, "max": 64},
                            "limits.max_watts": {"min": 5, "max": 300},
                            "sampling": {}}}}}                   (a message: its whole subtree)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers

from engine.control.objectives import objective_of
from engine.control.plan_store import PlanStore, SqliteDatabase, label
from engine.control.plans import (
    IDENTITY_FIELDS,
    MAX_DESCRIPTION_LENGTH,
    MAX_ID_LENGTH,
    ExecutionPlan,
    InvalidPlan,
    PlanEnvironment,
    apply_patch,
    plan_hash,
    prepare,
)
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound, shown
from protos.planengine.v1 import suggestion_pb2

Suggestion = suggestion_pb2.Suggestion
log = logging.getLogger(__name__)

__all__ = [
    "AgentPolicy",
    "AgentRule",
    "FieldRule",
    "SuggestionLog",
    "SuggestionRecord",
    "SuggestionReviewer",
    "Unauthenticated",
    "Verdict",
]

MODES = ("auto", "review", "dry_run")
DECISIONS = ("accepted", "rejected", "pending_review", "dry_run")
REJECTIONS = ("rate_limit", "identity", "malformed", "not_authorised", "out_of_bounds", "stale", "invalid_plan",
              "no_change", "activation_failed", "operator", "trial_running")
DEFAULT_RATE_PER_MINUTE = 30
RATE_WINDOW_S = 60.0
MAX_TEXT = 4000  # rationale, expected effect
MAX_SUGGESTION_ID = 128
MAX_PATHS = 64
MAX_PATH_CHARS = 200  # one field-mask path
MAX_PATCH_BYTES = 16 * 1024  # the patch, serialized: far above any real plan (a model path, a description)
MAX_LIST = 1000  # suggestions one ListSuggestions answers at most (default 100)
MAX_LIST_BYTES = 4 << 20  # ...and about this many bytes of them: well under the 16 MiB message limit


class Unauthenticated(EngineError):
    """No credentials, or credentials no agent in the policy holds."""

    code = "UNAUTHENTICATED"


# --------------------------------------------------------------------------- policy


def _field(path: str) -> FieldDescriptor:
    """The descriptor a dotted plan path names; ValueError when it names none."""
    message, found = ExecutionPlan.DESCRIPTOR, None
    for part in path.split("."):
        if message is None:
            raise ValueError(f"{path!r} names no plan field: {found.name} has no sub-fields")
        found = message.fields_by_name.get(part)
        if found is None:
            raise ValueError(f"{path!r} names no plan field: {message.name} has no field {part!r}")
        message = found.message_type
    return found


def _enum_number(enum_type, value: Any, path: str) -> int:
    """An enum value named in full ("SCHEDULER_POLICY_LATENCY"), short ("latency") or by number."""
    if isinstance(value, int) and not isinstance(value, bool) and value in enum_type.values_by_number:
        return value
    if isinstance(value, str):
        for v in enum_type.values:
            short = v.name.removeprefix(_enum_prefix(enum_type))
            if value in (v.name, short, short.lower()):
                return v.number
    known = ", ".join(v.name for v in enum_type.values if v.number)
    raise ValueError(f"{path}: {value!r} is not a {enum_type.name} value (known: {known})")


def _enum_prefix(enum_type) -> str:
    names = [v.name for v in enum_type.values]
    unspecified = next((n for n in names if n.endswith("_UNSPECIFIED")), "")
    return unspecified.removesuffix("UNSPECIFIED")


def _scalar(value: Any, fd: FieldDescriptor) -> Any:
    """A plan field's value as a person reads it: enums by name, float32 as its shortest decimal."""
    if fd.type == FieldDescriptor.TYPE_ENUM:
        v = fd.enum_type.values_by_number.get(value)
        return v.name if v else value
    if fd.type == FieldDescriptor.TYPE_FLOAT and math.isfinite(value):
        return float(type_checkers.ToShortestFloat(value))
    return value


@dataclass(frozen=True)
class FieldRule:
    """Bounds on one plan path: numeric `low`/`high` (inclusive), or a set of allowed values
    (enum numbers, strings, bools). None / empty: unbounded."""

    path: str
    low: float | None = None
    high: float | None = None
    values: frozenset = frozenset()

    def violation(self, value: Any, fd: FieldDescriptor) -> str | None:
        shown = _scalar(value, fd)
        if self.values and value not in self.values:
            allowed = ", ".join(sorted(str(_scalar(v, fd)) for v in self.values))
            return f"{self.path} {shown} is not allowed (allowed: {allowed})"
        if self.low is not None and not value >= self.low or self.high is not None and not value <= self.high:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"{self.path} {shown} is outside {low}..{high}"
        return None


_NUMERIC = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}


def _field_rule(path: str, spec: Any) -> FieldRule:
    if not isinstance(spec, Mapping):
        raise TypeError(f"fields.{path}: a rule is an object with min/max or values, got {spec!r}")
    if path.split(".")[0] in IDENTITY_FIELDS:
        raise ValueError(f"fields.{path}: identity fields are assigned by the server; no agent may change them")
    fd = _field(path)
    unknown = set(spec) - {"min", "max", "values"}
    if unknown:
        raise ValueError(f"fields.{path}: unknown keys {sorted(unknown)} (known: min, max, values)")
    if spec and fd.message_type is not None:
        raise ValueError(f"fields.{path}: a message field takes no bounds; bound its fields instead")
    low, high = spec.get("min"), spec.get("max")
    for name, bound in (("min", low), ("max", high)):
        if bound is not None and (fd.type not in _NUMERIC or isinstance(bound, bool)
                                  or not isinstance(bound, (int, float))):
            raise ValueError(f"fields.{path}: {name} {bound!r} needs a numeric field and a number")
    if low is not None and high is not None and low > high:
        raise ValueError(f"fields.{path}: min {low} is above max {high}")
    values = spec.get("values", [])
    if not isinstance(values, list):
        raise TypeError(f"fields.{path}: values must be a list, got {values!r}")
    if fd.type == FieldDescriptor.TYPE_ENUM:
        values = [_enum_number(fd.enum_type, v, f"fields.{path}") for v in values]
    return FieldRule(path, low, high, frozenset(values))


@dataclass(frozen=True)
class AgentRule:
    """One agent's authority: the paths it may patch (with bounds), its rate and mode."""

    id: str
    token_sha256: str
    mode: str = "review"
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE
    plans: frozenset[str] = frozenset()  # empty: any plan id
    fields: Mapping[str, FieldRule] = field(default_factory=dict)

    def may_change_plan(self, plan_id: str) -> bool:
        return not self.plans or plan_id in self.plans

    def allows(self, path: str) -> bool:
        """A path is allowed when the policy names it or a message above it."""
        return any(path == p or path.startswith(p + ".") for p in self.fields)

    def out_of_bounds(self, patch: ExecutionPlan, paths: Sequence[str]) -> list[str]:
        """Every bounded value the patch sets through `paths` that breaks its rule."""
        problems = []
        for rule in self.fields.values():
            if not (rule.values or rule.low is not None or rule.high is not None):
                continue
            if any(rule.path == p or rule.path.startswith(p + ".") for p in paths):
                value, fd = _value_at(patch, rule.path)
                if (problem := rule.violation(value, fd)) is not None:
                    problems.append(problem)
        return problems


class AgentPolicy:
    """Which agents exist (by token), and what each may do. Built from a JSON policy file."""

    def __init__(self, agents: Sequence[AgentRule] = ()):
        self.agents: dict[str, AgentRule] = {a.id: a for a in agents}
        digests = [a.token_sha256 for a in agents]
        if len(set(digests)) != len(digests):
            raise InvalidArgument("two agents share a token; each agent needs its own", field="agents")

    @classmethod
    def load(cls, path: str | Path) -> AgentPolicy:
        """Parse and check a policy file; every mistake is an InvalidArgument naming the file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path}: not valid JSON: {exc}", field="agent_policy") from None
        try:
            return cls.from_dict(doc)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"{path}: {exc}", field="agent_policy") from None

    @classmethod
    def from_dict(cls, doc: Any) -> AgentPolicy:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("agents"), Mapping):
            raise TypeError('the policy is an object {"agents": {"<agent id>": {...}, ...}}')
        return cls([_agent_rule(agent_id, spec) for agent_id, spec in doc["agents"].items()])

    def authenticate(self, token: str | None) -> AgentRule | None:
        """The agent holding `token`, or None."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        for agent in self.agents.values():
            if hmac.compare_digest(digest, agent.token_sha256):
                return agent
        return None


def _agent_rule(agent_id: str, spec: Any) -> AgentRule:
    where = f"agents.{agent_id}"
    if not agent_id or not isinstance(spec, Mapping):
        raise ValueError(f"{where}: an agent is a non-empty id mapped to an object")
    unknown = set(spec) - {"token", "token_sha256", "mode", "rate_per_minute", "plans", "fields"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if ("token" in spec) == ("token_sha256" in spec):
        raise ValueError(f"{where}: give exactly one of token, token_sha256")
    if "token" in spec:
        if not isinstance(spec["token"], str) or not spec["token"]:
            raise ValueError(f"{where}: token must be a non-empty string")
        digest = hashlib.sha256(spec["token"].encode()).hexdigest()
    else:
        digest = str(spec["token_sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: token_sha256 must be 64 hex digits")
    mode = spec.get("mode", "review")
    if mode not in MODES:
        raise ValueError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
    rate = spec.get("rate_per_minute", DEFAULT_RATE_PER_MINUTE)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ValueError(f"{where}: rate_per_minute {rate!r} must be an integer >= 1")
    plans = spec.get("plans", [])
    if not isinstance(plans, list) or not all(isinstance(p, str) and p for p in plans):
        raise ValueError(f"{where}: plans must be a list of plan ids")
    fields = spec.get("fields", {})
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(f"{where}: fields must name at least one plan path the agent may change")
    try:
        rules = {path: _field_rule(path, rule) for path, rule in fields.items()}
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    return AgentRule(agent_id, digest, mode, rate, frozenset(plans), rules)


class RateLimiter:
    """At most `n` events per agent in any RATE_WINDOW_S (a sliding window). Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, agent_id: str, n: int) -> float:
        """0 when admitted (and counted); else the seconds until one would be."""
        now = self._clock()
        with self._lock:
            seen = self._seen.setdefault(agent_id, deque())
            while seen and seen[0] <= now - RATE_WINDOW_S:
                seen.popleft()
            if len(seen) >= n:
                return seen[0] + RATE_WINDOW_S - now
            seen.append(now)
            return 0.0


# --------------------------------------------------------------------------- sizes


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def oversize(s: Suggestion) -> list[str]:
    """What in `s` is over a size limit; checked before anything is stored or parsed further."""
    problems = []
    for name, limit in (("suggestion_id", MAX_SUGGESTION_ID), ("agent_id", MAX_ID_LENGTH),
                        ("plan_id", MAX_ID_LENGTH), ("rationale", MAX_TEXT), ("expected_effect", MAX_TEXT)):
        if len(getattr(s, name)) > limit:
            problems.append(f"{name} is {len(getattr(s, name))} characters, at most {limit}")
    if (size := s.patch.ByteSize()) > MAX_PATCH_BYTES:
        problems.append(f"the patch is {size} bytes, at most {MAX_PATCH_BYTES}")
    paths = s.update_mask.paths
    if len(paths) > MAX_PATHS:
        problems.append(f"update_mask has {len(paths)} paths, at most {MAX_PATHS}")
    elif any(len(p) > MAX_PATH_CHARS for p in paths):
        problems.append(f"an update_mask path is over {MAX_PATH_CHARS} characters")
    return problems


def bounded(s: Suggestion) -> Suggestion:
    """`s` with every field cut to its size limit (an oversized patch dropped): what the audit
    log keeps of it, and what a listing returns of a row an older server stored in full."""
    if not oversize(s):
        return s
    out = Suggestion()
    out.CopyFrom(s)
    for name, limit in (("suggestion_id", MAX_SUGGESTION_ID), ("agent_id", MAX_ID_LENGTH),
                        ("plan_id", MAX_ID_LENGTH), ("rationale", MAX_TEXT), ("expected_effect", MAX_TEXT)):
        setattr(out, name, _cut(getattr(s, name), limit))
    if s.patch.ByteSize() > MAX_PATCH_BYTES:
        out.ClearField("patch")
    del out.update_mask.paths[:]
    out.update_mask.paths.extend(_cut(p, MAX_PATH_CHARS) for p in s.update_mask.paths[:MAX_PATHS])
    return out


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


def _value_at(message: Any, path: str) -> tuple[Any, FieldDescriptor]:
    fd = None
    for part in path.split("."):
        fd = message.DESCRIPTOR.fields_by_name[part]
        message = getattr(message, part)
    return message, fd


def patch_json(patch: ExecutionPlan, paths: Sequence[str]) -> str:
    """The values a patch sets, by path: {"scheduler_policy": "SCHEDULER_POLICY_THROUGHPUT"}.
    Paths that name no field are kept with a null value (the suggestion is malformed)."""
    out: dict[str, Any] = {}
    for path in paths:
        try:
            value, fd = _value_at(patch, path)
        except (KeyError, AttributeError):
            out[path] = None
            continue
        if fd.message_type is not None:
            out[path] = json_format.MessageToDict(value, preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True)
        else:
            value = _scalar(value, fd)
            out[path] = value if not isinstance(value, float) or math.isfinite(value) else str(value)
    return json.dumps(out, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- audit log


def _migrations(sqlite: bool) -> list[list[str]]:
    """The audit tables, in SQLite's or PostgreSQL's words (ids, blobs and doubles differ)."""
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT" if sqlite else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    ref, blob, double = ("INTEGER", "BLOB", "REAL") if sqlite else ("BIGINT", "BYTEA", "DOUBLE PRECISION")
    return [
        [  # 1: suggestions as received, and every verdict on them
            f"""CREATE TABLE suggestions (
                id {serial},
                agent_id TEXT NOT NULL,           -- the authenticated agent
                suggestion_id TEXT NOT NULL,      -- the agent's own id for it
                plan_id TEXT NOT NULL,
                base_version INTEGER NOT NULL,
                paths TEXT NOT NULL,              -- JSON list of field-mask paths
                patch TEXT NOT NULL,              -- JSON {{path: value}}
                rationale TEXT NOT NULL,
                expected_effect TEXT NOT NULL,
                mode TEXT NOT NULL,
                received_at {double} NOT NULL,
                body {blob} NOT NULL)             -- the Suggestion message as received""",
            "CREATE INDEX suggestions_by_agent ON suggestions (agent_id, id)",
            f"""CREATE TABLE suggestion_verdicts (
                seq {serial},
                suggestion {ref} NOT NULL REFERENCES suggestions (id),
                decision TEXT NOT NULL CHECK (decision IN ({", ".join(repr(d) for d in DECISIONS)})),
                rejection TEXT NOT NULL,
                reason TEXT NOT NULL,
                resulting_version INTEGER NOT NULL,
                resulting_hash TEXT NOT NULL,
                current_version INTEGER NOT NULL,
                decided_at {double} NOT NULL,
                decided_by TEXT NOT NULL)""",
            "CREATE INDEX suggestion_verdicts_by_suggestion ON suggestion_verdicts (suggestion, seq)",
        ],
    ]


_SELECT = """SELECT s.id, s.agent_id, s.body, s.received_at, s.mode, s.patch,
    v.decision, v.rejection, v.reason, v.resulting_version, v.resulting_hash, v.current_version, v.decided_at,
    v.decided_by
    FROM suggestions s LEFT JOIN suggestion_verdicts v
    ON v.seq = (SELECT MAX(seq) FROM suggestion_verdicts WHERE suggestion = s.id)"""


class SuggestionLog:
    """The durable audit log of suggestions and verdicts, in the plan store's database: a
    SqliteDatabase, or the PostgresDatabase of engine.control.postgres_store (anything with
    its `transaction()` and `ensure_schema()`; its SQL takes %s placeholders)."""

    SCHEMA_COMPONENT = "suggestions"

    def __init__(self, db: SqliteDatabase | Any):
        self.db = db
        self._sqlite = isinstance(db, SqliteDatabase)
        db.ensure_schema(self.SCHEMA_COMPONENT, _migrations(self._sqlite))

    def _sql(self, text: str) -> str:
        return text if self._sqlite else text.replace("?", "%s")

    def _rows(self, text: str, args: Sequence[Any]) -> list[tuple]:
        if self._sqlite:  # reads need no write lock
            return self.db.connection().execute(text, args).fetchall()
        with self.db.transaction(read_only=True) as conn:
            return conn.execute(self._sql(text), args).fetchall()

    def received(self, agent_id: str, s: Suggestion, mode: str, at: float) -> int:
        """Record a suggestion as it arrives; returns its audit id."""
        paths = list(s.update_mask.paths)
        with self.db.transaction() as conn:
            return conn.execute(self._sql(
                "INSERT INTO suggestions (agent_id, suggestion_id, plan_id, base_version, paths, patch, rationale, "
                "expected_effect, mode, received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"),
                (agent_id, s.suggestion_id, s.plan_id, s.base_version, json.dumps(paths), patch_json(s.patch, paths),
                 s.rationale, s.expected_effect, mode, at, s.SerializeToString(deterministic=True))).fetchone()[0]

    def decided(self, audit_id: int, v: Verdict, decided_by: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(self._sql(
                "INSERT INTO suggestion_verdicts (suggestion, decision, rejection, reason, resulting_version, "
                "resulting_hash, current_version, decided_at, decided_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (audit_id, v.decision, v.rejection, v.reason, v.resulting_version, v.resulting_hash,
                 v.current_version, v.decided_at, decided_by))

    def get(self, audit_id: int) -> SuggestionRecord:
        rows = self._rows(_SELECT + " WHERE s.id = ?", (audit_id,))
        if not rows:
            raise NotFound(f"no suggestion with id {audit_id}")
        return _record(rows[0])

    def list(self, agent_id: str = "", decision: str = "", plan_id: str = "", limit: int = 100) -> list[SuggestionRecord]:
        """Newest first, filtered by agent, latest decision and plan id when given."""
        where, args = [], []
        for column, value in (("s.agent_id", agent_id), ("v.decision", decision), ("s.plan_id", plan_id)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.id DESC LIMIT ?"
        return [_record(row) for row in self._rows(sql, (*args, max(0, limit)))]


def _record(row: tuple) -> SuggestionRecord:
    (audit_id, agent_id, body, received_at, mode, patch, decision, rejection, reason, version, digest, current,
     decided_at, decided_by) = row
    s = bounded(Suggestion.FromString(bytes(body)))
    patch = _cut(patch, MAX_PATCH_BYTES)
    reason = reason if reason is None else _cut(reason, MAX_TEXT)
    verdict = None if decision is None else Verdict(s.suggestion_id, decision, reason, rejection, version, digest,
                                                    current, None, decided_at, audit_id)
    return SuggestionRecord(audit_id, agent_id, s, received_at, mode, patch, verdict, decided_by or "")


# --------------------------------------------------------------------------- the reviewer


class PlanAuthority(Protocol):
    """What the reviewer needs of the control plane (engine.control.control_plane.ControlPlane)."""

    store: PlanStore
    env: PlanEnvironment

    def submit_plan(self, plan: ExecutionPlan, activate: bool = False,
                    actor: str = "") -> tuple[ExecutionPlan, bool]: ...

    def submit_if_active(self, plan: ExecutionPlan, base_version: int,
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
            plan = prepare(candidate, self.control.env)
        except InvalidPlan as exc:
            raise _Rejected("invalid_plan", f"invalid plan: {'; '.join(map(str, exc.violations))}",
                            active.version) from None
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
            stored, _ = self.control.submit_if_active(plan, active.version, actor=actor or f"agent:{agent.id}")
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
