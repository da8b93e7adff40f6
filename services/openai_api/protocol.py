"""OpenAI request bodies, validated, and turned into the engine's `GenerateInput`.

What is accepted, refused and ignored is decided here, in one place (docs/11_openai_api.md):
- the fields the engine runs (sampling, `stop`, `seed`, `max_tokens`, logprobs, streaming);
- `logit_bias` (token id strings to -100..100);
- vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
  `stop_token_ids`, `min_tokens`), which the `openai` SDK sends through `extra_body`;
- fields that change nothing here (`user`, `metadata`, `store`, ...), accepted and ignored;
- fields the engine cannot honour yet (`n` > 1, `response_format`, `tools`, ...):
  refused with a 400 naming the field when set to anything but their default;
- any other field: refused as unrecognized, as OpenAI does, rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.control.control_plane import GenerateInput
from engine.errors import InvalidArgument

# Set to anything but these, a field is refused: the engine cannot do it (yet).
UNSUPPORTED = {
    "n": (None, 1),
    "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "suffix": (None, ""),
    "echo": (None, False),
}
# Accepted and ignored: they describe the caller or OpenAI's own storage, not the generation.
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
           "parallel_tool_calls")  # the last means nothing without tools, which are refused


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> -100..100
    # refused unless default (UNSUPPORTED)
    n: int | None = None
    # accepted and ignored (IGNORED)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_supported(self) -> None:
        for name, defaults in UNSUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in defaults:
                raise InvalidArgument(f"'{name}' is not supported by this server yet (got {getattr(self, name)!r}); "
                                      f"leave it unset", field=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("'stream_options' is only allowed when 'stream' is true", field="stream_options")

    def generate_input(self, request_id: str, top_logprobs: int, **prompt: Any) -> GenerateInput:
        sampling = {f: getattr(self, f) for f in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                  "presence_penalty", "frequency_penalty")
                    if getattr(self, f) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return GenerateInput(request_id=request_id, sampling=sampling, max_tokens=self.requested_max_tokens() or 0,
                             stop=stop, seed=self.seed, top_logprobs=top_logprobs, ignore_eos=bool(self.ignore_eos),
                             logit_bias=self._logit_bias(), stop_token_ids=list(self.stop_token_ids or ()),
                             min_tokens=self.min_tokens or 0, **prompt)

    def _logit_bias(self) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidArgument(f"logit_bias keys must be token ids, got {key[:40]!r}", field="logit_bias")
            out[int(key)] = bias
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # any part parses; ChatCompletionRequest refuses non-text ones by name

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted and ignored: chat templates have no place for it
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidArgument(f"max_tokens {self.max_tokens} and max_completion_tokens "
                                  f"{self.max_completion_tokens} disagree; send one", field="max_completion_tokens")
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (0..20)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("'top_logprobs' needs 'logprobs' set to true", field="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_input(self, request_id: str) -> GenerateInput:
        self.check_supported()
        return self.generate_input(request_id, self.top_logprobs_wanted() or 0, messages=self.chat_messages())

    def chat_messages(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            if m.role in ("tool", "function") or m.tool_calls:
                raise InvalidArgument(f"{where}: tool calls and tool results are not supported by this server yet",
                                      field=where)
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise InvalidArgument(f"{where}.content[{j}]: only text parts are supported "
                                              f"(got type {part.type!r})", field=f"{where}.content[{j}]")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content or ""
            # "developer" is OpenAI's newer name for the system turn; templates know "system"
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def to_input(self, request_id: str) -> GenerateInput:
        self.check_supported()
        return self.generate_input(request_id, self.logprobs or 0, **self.prompt_fields())

    def prompt_fields(self) -> dict[str, Any]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):  # a batch of prompts
            if len(p) != 1:
                raise InvalidArgument(f"'prompt' holds {len(p)} prompts; this server takes one per request",
                                      field="prompt")
            p = p[0]
        if isinstance(p, str):
            return {"text": p}
        return {"ids": list(p)}


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
