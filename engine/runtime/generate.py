"""Loading a model and running it: prefill, decode_one_token, generate, score.

This is the single-sequence path the CLI uses; the batched server path drives
the same `Transformer.forward` through the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from backends import create_backend
from engine.errors import ContextOverflow, InvalidArgument
from engine.memory.kv_cache import SequenceKV
from engine.model.chat import ChatTemplate
from engine.model.gguf_file import ModelConfig, ModelFile
from engine.model.tokenizer import StreamDecoder, Tokenizer
from engine.runtime.model import Segment, Transformer, load_weights
from engine.runtime.sampling import Sampler, SamplingParams, StopChecker


class LoadedModel:
    """A model ready to run: its file, tokenizer and weights on a backend. `close()` releases them."""

    def __init__(self, path: str | Path, backend: str = "cpu", weights: str = "f32",
                 context_length: int | None = None):
        start = time.perf_counter()
        self.file = ModelFile(path)
        self.config: ModelConfig = self.file.config()
        self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
        self.chat_template = ChatTemplate.from_metadata(self.file.metadata)
        limit = self.config.context_length
        if context_length is not None and not 0 < context_length <= limit:
            raise InvalidArgument(f"context length {context_length} must be in 1..{limit} (the model's)",
                                  field="context_length")
        self.context_length = context_length or limit
        self.backend = create_backend(backend)
        self.weight_format = weights
        self.weights = load_weights(self.file, self.config, self.backend, weights)
        self.transformer = Transformer(self.config, self.weights, self.backend)
        self.load_seconds = time.perf_counter() - start

    def encode_prompt(self, text: str | None = None, ids: Sequence[int] | None = None,
                      messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a prompt given as exactly one of: text, ids, chat messages."""
        if sum(x is not None for x in (text, ids, messages)) != 1:
            raise InvalidArgument("give the prompt as exactly one of text, ids or messages", field="prompt")
        if messages is not None:
            text = self.chat_template.render(messages, add_generation_prompt=True)
            prompt = self.tokenizer.encode(text, parse_special=True)
        elif text is not None:
            prompt = self.tokenizer.encode(text, parse_special=True)
        else:
            prompt = [int(i) for i in ids]  # type: ignore[union-attr]
            bad = [i for i in prompt if not 0 <= i < self.config.vocab_size]
            if bad:
                raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})",
                                      field="prompt")
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
    return model.transformer.forward([Segment(kv, np.asarray(ids), 0, all_logits=True)])[0]


@dataclass
class TokenEvent:
    token_id: int | None  # None: text released at the end of the stream, no new token
    text: str  # the text this token makes visible (may be empty while UTF-8 or a stop string is pending)
    logprob: float


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
                 ignore_eos: bool = False):
        model.check_context(len(prompt_ids))
        self.model = model
        self.params = params
        self.ignore_eos = ignore_eos
        self.sampler = Sampler(params, prompt_ids)
        self.completion = Completion(prompt_ids=list(prompt_ids), seed=self.sampler.seed)

    def __iter__(self) -> Iterator[TokenEvent]:
        model, c = self.model, self.completion
        budget = min(self.params.max_tokens, model.context_length - len(c.prompt_ids))
        kv = model.transformer.new_kv(len(c.prompt_ids) + budget)
        detok = StreamDecoder(model.tokenizer)
        stops = StopChecker(self.params.stop)
        stop_ids = set() if self.ignore_eos else model.tokenizer.eot_ids

        start = time.perf_counter()
        logits = prefill(model, kv, c.prompt_ids)
        c.timings["prefill_s"] = time.perf_counter() - start
        c.finish_reason = "length"
        stopped = False
        while len(c.ids) < budget:
            token, logprob = self.sampler.sample(logits)
            if not c.ids:
                c.timings["ttft_s"] = time.perf_counter() - start
            if token in stop_ids:
                c.finish_reason = "stop"
                break
            c.ids.append(token)
            text, stopped = stops.push(detok.push(token))
            c.text += text
            yield TokenEvent(token, text, logprob)
            if stopped:
                c.finish_reason = "stop"
                break
            if len(c.ids) < budget:
                logits = decode_one_token(model, kv, token)
        if not stopped:
            # text held back for an incomplete UTF-8 sequence or a possible stop string
            tail, _ = stops.push(detok.flush())
            tail += stops.flush()
            if tail:
                c.text += tail
                yield TokenEvent(None, tail, 0.0)
        c.timings["total_s"] = time.perf_counter() - start
        c.timings["decode_s"] = c.timings["total_s"] - c.timings.get("ttft_s", c.timings["total_s"])
