"""The agent policy: which agents exist (by token), the plans and paths each may patch, the
bounds on each value, its mode and rate.

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers

from engine.control.plans import IDENTITY_FIELDS, ExecutionPlan, field_at, value_at
from engine.errors import InvalidArgument

__all__ = ["AgentPolicy", "AgentRule", "FieldRule"]

MODES = ("auto", "review", "dry_run")
DEFAULT_RATE_PER_MINUTE = 30


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
    try:
        fd = field_at(path)
    except ValueError as exc:
        raise ValueError(f"fields.{path}: {exc}") from None
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
                value, fd = value_at(patch, rule.path)
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
