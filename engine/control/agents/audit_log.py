"""The audit log: every suggestion as it arrives and every verdict given on it (a pending one
and its later operator decision are both kept), in the plan store's database (its SQLite
file, or its PostgreSQL database); listings cut long fields to the size limits."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from engine.control.agents.policy import _scalar
from engine.control.agents.sizes import MAX_PATCH_BYTES, MAX_TEXT, Suggestion, _cut, bounded
from engine.control.agents.verdicts import DECISIONS, SuggestionRecord, Verdict
from engine.control.database import SqlDatabase
from engine.control.plans import ExecutionPlan, value_at
from engine.errors import NotFound

__all__ = ["SuggestionLog", "patch_json"]


def patch_json(patch: ExecutionPlan, paths: Sequence[str]) -> str:
    """The values a patch sets, by path: {"scheduler_policy": "SCHEDULER_POLICY_THROUGHPUT"}.
    Paths that name no field are kept with a null value (the suggestion is malformed)."""
    out: dict[str, Any] = {}
    for path in paths:
        try:
            value, fd = value_at(patch, path)
        except ValueError:
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


def _migrations(db: SqlDatabase) -> list[list[str]]:
    """The audit tables, in `db`'s column types."""
    return [
        [  # 1: suggestions as received, and every verdict on them
            db.ddl("""CREATE TABLE suggestions (
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
                body {blob} NOT NULL)             -- the Suggestion message as received"""),
            "CREATE INDEX suggestions_by_agent ON suggestions (agent_id, id)",
            db.ddl(f"""CREATE TABLE suggestion_verdicts (
                seq {{serial}},
                suggestion {{ref}} NOT NULL REFERENCES suggestions (id),
                decision TEXT NOT NULL CHECK (decision IN ({", ".join(repr(d) for d in DECISIONS)})),
                rejection TEXT NOT NULL,
                reason TEXT NOT NULL,
                resulting_version INTEGER NOT NULL,
                resulting_hash TEXT NOT NULL,
                current_version INTEGER NOT NULL,
                decided_at {{double}} NOT NULL,
                decided_by TEXT NOT NULL)"""),
            "CREATE INDEX suggestion_verdicts_by_suggestion ON suggestion_verdicts (suggestion, seq)",
        ],
    ]


_SELECT = """SELECT s.id, s.agent_id, s.body, s.received_at, s.mode, s.patch,
    v.decision, v.rejection, v.reason, v.resulting_version, v.resulting_hash, v.current_version, v.decided_at,
    v.decided_by
    FROM suggestions s LEFT JOIN suggestion_verdicts v
    ON v.seq = (SELECT MAX(seq) FROM suggestion_verdicts WHERE suggestion = s.id)"""


class SuggestionLog:
    """The durable audit log of suggestions and verdicts, in the plan store's database (a
    SqliteDatabase, or a PostgresDatabase that replicas share: every replica's suggestions and
    verdicts in one place, listed by any of them)."""

    SCHEMA_COMPONENT = "suggestions"

    def __init__(self, db: SqlDatabase):
        self.db = db
        db.ensure_schema(self.SCHEMA_COMPONENT, _migrations(db))

    def _rows(self, text: str, args: Sequence[Any]) -> list[tuple]:
        with self.db.snapshot() as conn:
            return self.db.execute(conn, text, args).fetchall()

    def received(self, agent_id: str, s: Suggestion, mode: str, at: float) -> int:
        """Record a suggestion as it arrives; returns its audit id."""
        paths = list(s.update_mask.paths)
        with self.db.transaction() as conn:
            return self.db.execute(
                conn, "INSERT INTO suggestions (agent_id, suggestion_id, plan_id, base_version, paths, patch, "
                      "rationale, expected_effect, mode, received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                      "RETURNING id",
                (agent_id, s.suggestion_id, s.plan_id, s.base_version, json.dumps(paths), patch_json(s.patch, paths),
                 s.rationale, s.expected_effect, mode, at, s.SerializeToString(deterministic=True))).fetchone()[0]

    def decided(self, audit_id: int, v: Verdict, decided_by: str) -> None:
        with self.db.transaction() as conn:
            self.db.execute(
                conn, "INSERT INTO suggestion_verdicts (suggestion, decision, rejection, reason, resulting_version, "
                      "resulting_hash, current_version, decided_at, decided_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
