"""Size limits on a suggestion: checked before anything is stored, and what the audit log keeps
of one over them (`bounded`), so an agent cannot grow the log by more than a few kilobytes a
suggestion."""

from __future__ import annotations

from engine.control.plans import MAX_ID_LENGTH
from protos.planengine.v1 import suggestion_pb2

Suggestion = suggestion_pb2.Suggestion

__all__ = ["bounded", "oversize"]

MAX_TEXT = 4000  # rationale, expected effect
MAX_SUGGESTION_ID = 128
MAX_PATHS = 64
MAX_PATH_CHARS = 200  # one field-mask path
MAX_PATCH_BYTES = 16 * 1024  # the patch, serialized: far above any real plan (a model path, a description)


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
