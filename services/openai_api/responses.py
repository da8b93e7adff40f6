"""Engine events → OpenAI response objects: whole completions, and chunks for streaming.

One `Formatter` per request. `ChatFormat` writes `chat.completion` / `chat.completion.chunk`
objects, `CompletionFormat` writes `text_completion` ones. Both take the events of one request
(TokenEvent..., then its Final) and know nothing of HTTP.
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

    def token(self, token_id: int) -> tuple[str, bytes]:
        raw = self.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw


def usage(final: Final) -> dict[str, int]:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


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
        """The whole response object, once the request has finished."""
        tokens: list[TokenEvent] = []
        async for event in events:
            if isinstance(event, Final):
                if event.error or event.finish_reason == "error":
                    raise failed(event)
                body = self._envelope(self.object_name, [self._choice(event, tokens)])
                body["usage"] = usage(event)
                return body
            if event.token_id is not None:
                tokens.append(event)
        raise ApiError(500, "the request ended without a final event")  # pragma: no cover - the worker always ends one

    async def chunks(self, events: AsyncIterator[TokenEvent | Final]) -> AsyncIterator[dict[str, Any]]:
        """The streamed objects, ending with the one that carries the finish reason (and usage if asked)."""
        first = self._first_chunk()
        if first is not None:
            yield self._with_usage(first)
        async for event in events:
            if isinstance(event, Final):
                if event.error or event.finish_reason == "error":
                    raise failed(event)
                yield self._with_usage(self._chunk(self._finish_delta(), None, event.finish_reason))
                if self.ctx.include_usage:  # OpenAI's: one more chunk, no choices, with the usage
                    tail = self._envelope(self.chunk_name, [])
                    tail["usage"] = usage(event)
                    yield tail
                return
            if not event.text and (event.token_id is None or self.ctx.logprobs is None):
                continue  # nothing visible yet (a pending UTF-8 sequence or stop string), nothing to report
            lp = self._logprobs([event]) if self.ctx.logprobs is not None and event.token_id is not None else None
            yield self._with_usage(self._chunk(self._text_delta(event.text), lp, None))

    def _with_usage(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.include_usage:  # as OpenAI: every chunk says usage null but the extra last one
            chunk["usage"] = None
        return chunk

    def _chunk(self, delta: Any, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _first_chunk(self) -> dict[str, Any] | None:
        return None

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        raise NotImplementedError

    def _text_delta(self, text: str) -> Any:
        raise NotImplementedError

    def _finish_delta(self) -> Any:
        raise NotImplementedError

    def _logprobs(self, tokens: list[TokenEvent]) -> Any:
        raise NotImplementedError


class ChatFormat(Formatter):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": final.text, "refusal": None},
                "logprobs": self._logprobs(tokens) if self.ctx.logprobs is not None else None,
                "finish_reason": final.finish_reason}

    def _first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def _chunk(self, delta: Any, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish_reason}])

    def _text_delta(self, text: str) -> dict[str, str]:
        return {"content": text}

    def _finish_delta(self) -> dict[str, str]:
        return {}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.ctx.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any]:
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs[:self.ctx.logprobs]]}
                            for e in tokens], "refusal": None}


class CompletionFormat(Formatter):
    object_name = chunk_name = "text_completion"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._offset = 0  # text_offset of the next token, across chunks

    def _choice(self, final: Final, tokens: list[TokenEvent]) -> dict[str, Any]:
        return {"index": 0, "text": final.text,
                "logprobs": self._logprobs(tokens) if self.ctx.logprobs is not None else None,
                "finish_reason": final.finish_reason}

    def _chunk(self, text: Any, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": 0, "text": text, "logprobs": logprobs,
                                                 "finish_reason": finish_reason}])

    def _text_delta(self, text: str) -> str:
        return text

    def _finish_delta(self) -> str:
        return ""

    def _logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in tokens:
            text, _ = self.ctx.token(e.token_id)
            # the sampled token is always among them, so there may be logprobs + 1 (as OpenAI documents)
            top = {self.ctx.token(t)[0]: lp for t, lp in e.top_logprobs[:self.ctx.logprobs]}
            top.setdefault(text, e.logprob)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out
