"""Size limits on a request, checked before any work is done on it.

A request is measured before it is tokenized, queued or stored, so a hostile one costs the
server a length check, not seconds of tokenizer time or megabytes of memory. Every refusal is
INVALID_ARGUMENT naming the field, the value's size and the limit. docs/10_limits_and_failures.md
lists each limit with its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from engine.errors import InvalidArgument, shown

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class RequestLimits:
    """Server-wide request limits (`plan-engine serve` flags); the plan adds its own (max_tokens, context)."""

    max_prompt_bytes: int = 4 * 1024 * 1024  # UTF-8 bytes of a text prompt, of all chat contents, or to Tokenize
    max_request_id_bytes: int = 128
    max_stop_strings: int = 16
    max_stop_bytes: int = 256  # each stop string
    max_chat_messages: int = 1024
    max_logit_bias: int = 1024  # entries of logit_bias
    max_n: int = 16  # completions of one request
    max_stop_token_ids: int = 64

    def __post_init__(self) -> None:
        for name in ("max_prompt_bytes", "max_request_id_bytes", "max_stop_strings", "max_stop_bytes",
                     "max_chat_messages", "max_logit_bias", "max_stop_token_ids", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def prompt_byte_limit(limits: RequestLimits, context_length: int, max_token_bytes: int) -> int:
    """The most UTF-8 bytes a prompt may have: the server's limit, and never more than the model
    could possibly take (a text of more than `context_length * max_token_bytes` bytes tokenizes
    into more tokens than the context holds, whatever it says)."""
    return min(limits.max_prompt_bytes, context_length * max(1, max_token_bytes))


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text(text: str, limit: int, field: str = "prompt", label: str | None = None) -> None:
    """Refuse `text` over `limit` UTF-8 bytes, naming `label` (default: the field) and the sizes."""
    label = label or field
    if len(text) > limit:  # characters <= bytes: refused without encoding a huge text first
        raise InvalidArgument(f"{label} of {len(text):,}+ bytes exceeds the limit of {limit:,} bytes", field=field)
    size = _utf8_len(text)
    if size > limit:
        raise InvalidArgument(f"{label} of {size:,} bytes exceeds the limit of {limit:,} bytes", field=field)


def check_request(limits: RequestLimits, prompt_limit: int, request_id: str = "", text: str | None = None,
                  messages: Sequence[dict] | None = None, stop: Sequence[str] = (), logit_bias: Mapping = {},
                  stop_token_ids: Sequence[int] = (), n: int = 1) -> None:
    """Refuse a request whose sizes exceed the limits, before it is tokenized or queued."""
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"n {n} must be in 1..{limits.max_n}", field="n")
    check_text(request_id, limits.max_request_id_bytes, "request_id")  # before looking at each character
    if any(c < " " or c == "\x7f" for c in request_id):
        raise InvalidArgument("request_id must not contain control characters", field="request_id")
    if len(logit_bias) > limits.max_logit_bias:
        raise InvalidArgument(f"logit_bias has {len(logit_bias):,} entries; the limit is {limits.max_logit_bias}",
                              field="logit_bias")
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(f"{len(stop_token_ids):,} stop_token_ids exceed the limit of "
                              f"{limits.max_stop_token_ids}", field="stop_token_ids")
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(f"{len(stop):,} stop strings exceed the limit of {limits.max_stop_strings}",
                              field="stop")
    for i, s in enumerate(stop):
        check_text(s, limits.max_stop_bytes, "stop", label=f"stop[{i}]")
    if text is not None:
        check_text(text, prompt_limit)
    if messages is not None:
        if len(messages) > limits.max_chat_messages:
            raise InvalidArgument(f"{len(messages):,} chat.messages exceed the limit of {limits.max_chat_messages}",
                                  field="chat.messages")
        total = 0
        for i, m in enumerate(messages):
            role = m.get("role", "")
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"chat.messages[{i}].role {shown(role, 40)} is not one of "
                                      f"{', '.join(sorted(CHAT_ROLES))}", field=f"chat.messages[{i}].role")
            total += _utf8_len(m.get("content", ""))
            if total > prompt_limit:
                raise InvalidArgument(f"the contents of chat.messages exceed the prompt limit of {prompt_limit:,} "
                                      "bytes", field="chat.messages")
