"""Engine events → OpenAI response objects: whole completions, and chunks for streaming.

One `Formatter` per request. `ChatFormat` writes `chat.completion` / `chat.completion.chunk`
objects, `CompletionFormat` writes `text_completion` ones. Both take the events of one request
(TokenEvents and a Final for each of its `n` choices, told apart by `index`) and know nothing
of HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.runtime.generate import TokenEvent
from engine.runtime.worker import Final
from services.openai_api.errors import ApiError


@dataclass
class Context:
    """What every object of one response repeats."""

    request_id: str
    model: str
    fingerprint: str  # the plan that ran it: id@version#hash
    token_bytes: Callable[[int], bytes]  # the tokenizer's, for logprob token strings
    logprobs: int | None  # None: no logprobs; n: the sampled token's, plus n alternatives
    include_usage: bool = False
    n: int = 1  # choices
    tools: bool = False  # the request offered tools: answers are parsed, not streamed as raw JSON

    def token(self, token_id: int) -> tuple[str, bytes]:
        raw = self.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw


def usage(finals: list[Final]) -> dict[str, int]:
    """The prompt once, the completions of every choice (as OpenAI counts n > 1)."""
    prompt, completion = finals[0].prompt_tokens, sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failed(final: Final) -> ApiError:
    return ApiError(500, f"the engine failed while generating: {final.error or 'unknown error'}",
                    code="engine_error")


class Formatter:
    object_name = ""
    chunk_name = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.created = int(time.time())

    def _envelope(self, name: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.ctx.request_id, "object": name, "created": self.created, "model": self.ctx.model,
                "system_fingerprint": self.ctx.fingerprint, "choices": choices}

    async def complete(self, events: AsyncIterator[TokenEvent | Final]) -> dict[str, Any]:
        """The whole response object, once every choice has finished."""
        tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(self.ctx.n)}
        finals: dict[int, Final] = {}
        async for event in events:
            if isinstance(event, Final):
                if event.error or event.finish_reason == "error":
                    raise failed(event)
                finals[event.index] = event
                if len(finals) == self.ctx.n:
                    done = [finals[i] for i in sorted(finals)]
                    body = self._envelope(self.object_name, [self._choice(f, tokens[f.index]) for f in done])
                    body["usage"] = usage(done)
                    return body
            elif event.token_id is not None:
                tokens[event.index].append(event)
        raise ApiError(500, "the request ended without a final event")  # pragma: no cover - the worker always ends one

    async def chunks(self, events: AsyncIterator[TokenEvent | Final]) -> AsyncIterator[dict[str, Any]]:
        """The streamed objects, each choice ending with the one that carries its finish reason;
        then, if asked, one with the usage."""
        for index in range(self.ctx.n):
            first = self._first_chunk(index)
            if first is not None:
                yield self._with_usage(first)
        finals: list[Final] = []
        async for event in events:
            if isinstance(event, Final):
                if event.error or event.finish_reason == "error":
                    raise failed(event)
                if self.ctx.tools:  # the parsed answer, in one delta (the raw JSON was not streamed)
                    delta, finish = self._tools_delta(event)
                    yield self._with_usage(self._chunk(delta, None, None, event.index))
                    yield self._with_usage(self._chunk(self._finish_delta(), None, finish, event.index))
                else:
                    yield self._with_usage(self._chunk(self._finish_delta(), None, event.finish_reason, event.index))
                finals.append(event)
                if len(finals) < self.ctx.n:
                    continue
                if self.ctx.include_usage:  # OpenAI's: one more chunk, no choices, with the usage
                    tail = self._envelope(self.chunk_name, [])
                    tail["usage"] = usage(finals)
                    yield tail
                return
            if self.ctx.tools:
                continue  # JSON of the tool-call format: the parsed answer comes with the Final
            if not event.text and (event.token_id is None or self.ctx.logprobs is None):
                continue  # nothing visible yet (a pending UTF-8 sequence or stop string), nothing to report
            lp = (self._logprobs([event], event.index) if self.ctx.logprobs is not None and event.token_id is not None
                  else None)
            yield self._with_usage(self._chunk(self._text_delta(event.text), lp, None, event.index))

    def _tools_delta(self, final: Final) -> tuple[Any, str]:
        raise NotImplementedError  # tools are offered on chat completions only

    def _with_usage(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.include_usage:  # as OpenAI: every chunk says usage null but the extra last one
            chunk["usage"] = None
        return chunk

    def _chunk(self, delta: Any, logprobs: Any, finish_reason: str | None, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _first_chunk(self, index: int) -> dict[str, Any] | None:
        return None

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        raise NotImplementedError

    def _text_delta(self, text: str) -> Any:
        raise NotImplementedError

    def _finish_delta(self) -> Any:
        raise NotImplementedError

    def _logprobs(self, tokens: list[TokenEvent], index: int) -> Any:
        raise NotImplementedError


def _tool_calls(final: Final) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in final.tool_calls]


class ChatFormat(Formatter):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": final.text, "refusal": None}
        finish = final.finish_reason
        if self.ctx.tools:  # the answer was a tool call or a reply in the generic format
            message["content"] = final.content if not final.tool_calls else None
            if final.tool_calls:
                message["tool_calls"] = _tool_calls(final)
                finish = "tool_calls"
        return {"index": final.index, "message": message,
                "logprobs": self._logprobs(tokens, final.index) if self.ctx.logprobs is not None else None,
                "finish_reason": finish}

    def _first_chunk(self, index: int) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, None, index)

    def _chunk(self, delta: Any, logprobs: Any, finish_reason: str | None, index: int) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": index, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish_reason}])

    def _text_delta(self, text: str) -> dict[str, str]:
        return {"content": text}

    def _tools_delta(self, final: Final) -> tuple[dict[str, Any], str]:
        if final.tool_calls:
            return {"tool_calls": [{"index": i, **c} for i, c in enumerate(_tool_calls(final))]}, "tool_calls"
        return {"content": final.content if final.content is not None else final.text}, final.finish_reason

    def _finish_delta(self) -> dict[str, str]:
        return {}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.ctx.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _logprobs(self, tokens: list[TokenEvent], index: int) -> dict[str, Any]:
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs[:self.ctx.logprobs]]}
                            for e in tokens], "refusal": None}


class CompletionFormat(Formatter):
    object_name = chunk_name = "text_completion"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._offset: dict[int, int] = {}  # text_offset of each choice's next token, across chunks

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        return {"index": final.index, "text": final.text,
                "logprobs": self._logprobs(tokens, final.index) if self.ctx.logprobs is not None else None,
                "finish_reason": final.finish_reason}

    def _chunk(self, text: Any, logprobs: Any, finish_reason: str | None, index: int) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": index, "text": text, "logprobs": logprobs,
                                                 "finish_reason": finish_reason}])

    def _text_delta(self, text: str) -> str:
        return text

    def _finish_delta(self) -> str:
        return ""

    def _logprobs(self, tokens: list[TokenEvent], index: int) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in tokens:
            text, _ = self.ctx.token(e.token_id)
            # the sampled token is always among them, so there may be logprobs + 1 (as OpenAI documents)
            top = {self.ctx.token(t)[0]: lp for t, lp in e.top_logprobs[:self.ctx.logprobs]}
            top.setdefault(text, e.logprob)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
            offset = self._offset.get(index, 0)
            out["text_offset"].append(offset)
            self._offset[index] = offset + len(text)
        return out
