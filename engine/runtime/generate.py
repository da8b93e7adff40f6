"""Loading a model and running it: prefill, decode_one_token, generate, score.

This is the single-sequence path the CLI uses; the batched server path drives
the same `Transformer.forward` through the scheduler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from backends import create_backend
from backends.base import KernelSettings
from engine.errors import ContextOverflow, InvalidArgument
from engine.execution import DEFAULT_EXECUTION
from engine.memory.kv_cache import SequenceKV
from engine.model.chat import chat_template_for, no_chat_template
from engine.model.gguf_file import ModelConfig, ModelFile
from engine.model.integrity import check_finite
from engine.model.tokenizer import StreamDecoder, Tokenizer
from engine.runtime.constraints import Constraint
from engine.runtime.model import Segment, Transformer, load_weights
from engine.runtime.sampling import Sampler, SamplingParams, StopChecker

log = logging.getLogger(__name__)


class LoadedModel:
    """A model ready to run: its file, tokenizer and weights on a backend. `close()` releases them.

    `chat_template`: a llama.cpp built-in template name that renders chat messages in place of
    the file's own (the plan's model_options.chat_template); "": the file's own, if any."""

    def __init__(self, path: str | Path, backend: str = "cpu", weights: str = "f32",
                 context_length: int | None = None, batch_invariant: bool = False,
                 settings: KernelSettings = DEFAULT_EXECUTION.kernels, chat_template: str = ""):
        start = time.perf_counter()
        self.file = ModelFile(path)
        try:
            self.config: ModelConfig = self.file.config()
            check_finite(self.file)  # NaN or inf weights: refused here, not on the first request
            self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
            self.set_chat_template(chat_template)
        except BaseException:
            self.file.close()
            raise
        limit = self.config.context_length
        if context_length is not None and not 0 < context_length <= limit:
            raise InvalidArgument(f"context length {context_length} must be in 1..{limit} (the model's)",
                                  field="context_length")
        self.context_length = context_length or limit
        self.backend = create_backend(backend, settings)
        self.backend.batch_invariant = batch_invariant
        self.weight_format = weights
        self.weights = load_weights(self.file, self.config, self.backend, weights)
        self.transformer = Transformer(self.config, self.weights, self.backend)
        self.load_seconds = time.perf_counter() - start

    def set_chat_template(self, name: str = "") -> None:
        """Render chat messages with the built-in template `name`, or ("") the file's own."""
        self.chat_template = chat_template_for(self.file.metadata, name)
        if self.chat_template is None:
            log.warning("%s has no chat template (tokenizer.chat_template) and none is declared: chat messages "
                        "will be refused; text prompts work", self.file.path.name)

    def tokenize(self, text: str, parse_special: bool = False) -> tuple[list[int], list[str]]:
        """Token ids of `text` and each token's piece."""
        ids = self.tokenizer.encode(text, parse_special=parse_special)
        return ids, [self.tokenizer.id_to_piece(i) for i in ids]

    def encode_prompt(self, text: str | None = None, ids: Sequence[int] | None = None,
                      messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a prompt given as exactly one of: text, ids, chat messages."""
        if sum(x is not None for x in (text, ids, messages)) != 1:
            raise InvalidArgument("give the prompt as exactly one of text, ids or messages", field="prompt")
        if messages is not None:
            template = self.chat_template  # once: a live plan change may swap it (set_chat_template)
            if template is None:
                raise no_chat_template(self.file.path.name)
            text = template.render(messages, add_generation_prompt=True)
            prompt = self.tokenizer.encode(text, parse_special=True)
        elif text is not None:
            prompt = self.tokenizer.encode(text, parse_special=True)
        else:
            self.check_context(len(ids))  # type: ignore[arg-type] - before touching a huge list
            arr = np.asarray(ids, dtype=np.int64)
            bad = np.flatnonzero((arr < 0) | (arr >= self.config.vocab_size))
            if bad.size:
                raise InvalidArgument(f"token id {arr[bad[0]]} is outside the vocabulary "
                                      f"(0..{self.config.vocab_size - 1})", field="prompt")
            prompt = arr.tolist()
        if not prompt:
            raise InvalidArgument("the prompt is empty", field="prompt")
        return prompt

    def check_context(self, n_prompt: int) -> None:
        if n_prompt >= self.context_length:
            raise ContextOverflow(f"prompt of {n_prompt} tokens does not fit the context length "
                                  f"{self.context_length} (at least one position must remain to generate)")

    def close(self) -> None:
        self.backend.close()
        self.file.close()


def prefill(model: LoadedModel, kv: SequenceKV, ids: Sequence[int]) -> np.ndarray:
    """Run the whole prompt in one batched pass; logits (vocab,) predicting the next token."""
    return model.transformer.forward([Segment(kv, np.asarray(ids), 0)])[0][-1]


def decode_one_token(model: LoadedModel, kv: SequenceKV, token: int) -> np.ndarray:
    """Run one token at the next position; logits (vocab,) predicting the one after it."""
    return model.transformer.forward([Segment(kv, np.array([token]), kv.length)])[0][-1]


def score(model: LoadedModel, ids: Sequence[int]) -> np.ndarray:
    """Logits (n, vocab) at every position of `ids` (row i predicts token i+1)."""
    if not ids:
        raise InvalidArgument("nothing to score: the input is empty", field="prompt")
    if len(ids) > model.context_length:
        raise ContextOverflow(f"input of {len(ids)} tokens exceeds the context length {model.context_length}")
    kv = model.transformer.new_kv(len(ids))
    return model.transformer.forward([Segment(kv, np.asarray(ids), 0, logits="all")])[0]


@dataclass
class TokenEvent:
    token_id: int | None  # None: text released at the end of the stream, no new token
    text: str  # the text this token makes visible (may be empty while UTF-8 or a stop string is pending)
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    index: int = 0  # which of the request's completions (n > 1)


class TokenStream:
    """One request's output side: sample a token, turn it into text, decide whether to stop.

    Shared by the single-sequence `Generation` and the batched worker, so both stop,
    detokenize and count identically.
    """

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], params: SamplingParams,
                 ignore_eos: bool = False, top_logprobs: int = 0, constraint: Constraint | None = None):
        model.check_context(len(prompt_ids))
        vocab = model.config.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidArgument(f"{name}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                      field=name)
        # with a constraint the grammar decides the end: end-of-turn is allowed only where it accepts
        eot = frozenset() if ignore_eos and constraint is None else frozenset(model.tokenizer.eot_ids)
        self.sampler = Sampler(params, prompt_ids, stop_ids=eot)
        self.budget = min(params.max_tokens, model.context_length - len(prompt_ids))
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" once finished
        self._top_logprobs = top_logprobs
        self._detok = StreamDecoder(model.tokenizer)
        self._stops = StopChecker(params.stop)
        self._stop_ids = eot | frozenset(params.stop_token_ids)
        self._log_z = model.backend.logsumexp
        self.constraint = constraint  # structured output (engine/runtime/constraints.py)

    def accept(self, logits: np.ndarray) -> TokenEvent | None:
        """Sample the next token from `logits`; the event to stream, or None (nothing to show).

        At an end-of-turn token the event carries only text held back until then (token_id None).
        """
        # the normalizer of the reported logprobs, from the backend (numpy's float32 exp is slow)
        log_z = float(self._log_z(np.asarray(logits, dtype=np.float32)[None])[0])
        if self.constraint is None:
            token, logprob = self.sampler.sample(logits, log_z)
        else:  # tokens the grammar forbids become -inf; the logprob stays the raw logits' (log_z)
            token, logprob = self.sampler.sample(self.constraint.mask(logits), log_z)
            self.constraint.advance(token)
        if token in self._stop_ids:
            tail = self.finish("stop")
            self.text += tail
            return TokenEvent(None, tail, 0.0) if tail else None
        self.ids.append(token)
        text, stopped = self._stops.push(self._detok.push(token))
        top = self.sampler.logprobs_top(logits, self._top_logprobs, log_z) if self._top_logprobs else []
        if stopped:
            self.finish_reason = "stop"
        elif self.constraint is not None and self.constraint.is_finished:
            text += self.finish("stop")  # the grammar is complete: nothing more may follow
        elif len(self.ids) >= self.budget:
            text += self.finish("length")
        self.text += text
        return TokenEvent(token, text, logprob, top)

    def finish(self, reason: str) -> str:
        """End the stream; returns text still held back (none after a stop string)."""
        self.finish_reason = reason
        if self._stops.stopped:
            return ""
        tail, _ = self._stops.push(self._detok.flush())
        return tail + self._stops.flush()


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (end of turn or stop string), "length" (max tokens or context)
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class Generation:
    """One request's token stream: iterate for TokenEvents; `completion` holds the result."""

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], params: SamplingParams,
                 ignore_eos: bool = False, constraint: Constraint | None = None):
        self.model = model
        self.stream = TokenStream(model, prompt_ids, params, ignore_eos, constraint=constraint)
        self.completion = Completion(prompt_ids=list(prompt_ids), seed=self.stream.sampler.seed)

    def __iter__(self) -> Iterator[TokenEvent]:
        model, c, stream = self.model, self.completion, self.stream
        kv = model.transformer.new_kv(len(c.prompt_ids) + stream.budget)
        start = time.perf_counter()
        logits = prefill(model, kv, c.prompt_ids)
        c.timings["prefill_s"] = time.perf_counter() - start
        while True:
            event = stream.accept(logits)
            if "ttft_s" not in c.timings:
                c.timings["ttft_s"] = time.perf_counter() - start
            if event is not None:
                yield event
            if stream.finish_reason is not None:
                break
            logits = decode_one_token(model, kv, stream.ids[-1])
        c.ids, c.text, c.finish_reason = stream.ids, stream.text, stream.finish_reason
        c.timings["total_s"] = time.perf_counter() - start
        c.timings["decode_s"] = c.timings["total_s"] - c.timings["ttft_s"]
