"""Structured output: a request's response format, compiled once, masks each step's logits.

A :class:`ResponseFormat` (plain data: a JSON schema, any JSON object, a regular expression, a
Lark or GBNF grammar, or a list of choices) is compiled by :func:`compile_format` into a
:class:`Constraint` for one request. Each step the request's ``TokenStream`` asks the
constraint to :meth:`~Constraint.mask` the logits (tokens the grammar does not allow become
-inf) and, once a token is sampled, to :meth:`~Constraint.advance` on it. The grammar engine is
llguidance (MIT; docs/12_structured_output.md compares it with xgrammar and outlines-core): its
Earley parser and lexer compute the allowed-token bitmask lazily per step, so compiling a
format takes about a millisecond and nothing is precomputed over the vocabulary.

- The llguidance tokenizer is built once per model tokenizer from our GGUF vocabulary (each
  id's bytes, special tokens marked so text can never match them) and kept while the
  tokenizer lives. Compiled formats are cached per (tokenizer, format) and each request gets a
  copy of the compiled matcher (``deep_copy``: microseconds).
- End of sequence: the end-of-turn ids are allowed only where the grammar accepts; a grammar
  that admits nothing more (``is_finished``) ends the request with reason "stop".
- JSON is generated compact (``", "`` and ``": "`` separators, no other whitespace), which
  saves the token budget; a schema's own ``x-guidance`` options override that.
- llguidance's parser limits bound the work of one mask (lexer fuel, Earley items), so a
  hostile grammar fails its own request instead of stalling the batch.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidArgument, shown
from engine.model.tokenizer import Tokenizer

__all__ = ["FORMAT_KINDS", "Constraint", "ConstraintError", "ResponseFormat", "compile_format"]

#: what a ResponseFormat may be, as the API names it
FORMAT_KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf", "choice")
MAX_FORMAT_BYTES = 256 * 1024  # a schema or grammar larger than this is refused before compiling
MAX_CHOICES = 1024
_CACHE_SIZE = 128  # compiled formats kept per process (least recently used dropped)
# JSON as a compact single line; a schema's "x-guidance" options come after these and win.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(RuntimeError):
    """The grammar engine refused a token it had allowed, or failed (e.g. a parser limit):
    that request ends with an error; the others go on."""


@dataclass(frozen=True)
class ResponseFormat:
    """What a request's output must match. ``value``: the schema's JSON text (json_schema), the
    pattern (regex), the grammar text (lark, gbnf), the strings (choice), or "" (json_object)."""

    kind: str
    value: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if isinstance(self.value, list):
            object.__setattr__(self, "value", tuple(self.value))

    def describe(self) -> str:
        return f"{self.kind} {shown(self.value, 60)}" if self.value else self.kind


def _field(fmt: ResponseFormat) -> str:
    return f"response_format.{fmt.kind}"


def _grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar for `fmt`, or InvalidArgument naming what is wrong with it."""
    import llguidance as llg

    kind, value, field = fmt.kind, fmt.value, _field(fmt)
    if kind not in FORMAT_KINDS:
        raise InvalidArgument(f"response_format kind {kind!r} is not one of {', '.join(FORMAT_KINDS)}",
                              field="response_format")
    if kind == "choice":
        if not isinstance(value, tuple) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidArgument("response_format.choice must list at least one non-empty string", field=field)
        if len(value) > MAX_CHOICES:
            raise InvalidArgument(f"response_format.choice lists {len(value):,} strings; the limit is {MAX_CHOICES}",
                                  field=field)
        size = sum(len(c.encode("utf-8", "surrogatepass")) for c in value)
    elif kind == "json_object":
        value, size = '{"type": "object"}', 0
    else:
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{field} is empty", field=field)
        size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_FORMAT_BYTES:
        raise InvalidArgument(f"{field} of {size:,} bytes exceeds the limit of {MAX_FORMAT_BYTES:,} bytes", field=field)

    if kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{field} is not valid JSON: {exc}", field=field) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(f"{field} must be a JSON object (a schema), got {type(schema).__name__}",
                                  field=field)
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        except ValueError as exc:
            raise InvalidArgument(f"{field} is not a valid schema: {exc}", field=field) from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    if kind == "lark":
        return llg.LLMatcher.grammar_from_lark(value)
    if kind == "gbnf":
        try:
            return llg.grammar_from("gbnf", value)
        except ValueError as exc:
            raise InvalidArgument(f"{field} is not a valid grammar: {exc}", field=field) from None
    # choice: a Lark alternation of JSON-quoted literals (Lark strings take JSON escapes)
    return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))


class _GGUFVocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, EOS, specials, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eot_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_bos=False)


_lock = threading.Lock()
_ll_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()
_compiled: "OrderedDict[tuple[int, str, str | tuple[str, ...]], tuple[weakref.ref, object]]" = OrderedDict()


def _ll_tokenizer(tokenizer: Tokenizer):
    """The llguidance tokenizer of a model's tokenizer, built on first use (~0.3 s for 49k ids)."""
    import llguidance as llg

    with _lock:
        lt = _ll_tokenizers.get(tokenizer)
        if lt is None:
            eos = sorted(tokenizer.eot_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else None)
            lt = llg.LLTokenizer(llg.TokenizerWrapper(_GGUFVocabulary(tokenizer)), n_vocab=tokenizer.vocab_size,
                                 eos_token=eos)
            _ll_tokenizers[tokenizer] = lt
        return lt


def compile_format(tokenizer: Tokenizer, fmt: ResponseFormat) -> Constraint:
    """A fresh :class:`Constraint` for one request; InvalidArgument (naming the problem and the
    field) for a schema, pattern or grammar that does not compile. Compiled formats are cached
    per (tokenizer, format); each call returns its own copy of the matcher."""
    import llguidance as llg

    key = (id(tokenizer), fmt.kind, fmt.value)
    with _lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0]() is tokenizer:
            _compiled.move_to_end(key)
            return Constraint(tokenizer, hit[1].deep_copy(), fmt)
    grammar = _grammar_text(fmt)
    lt = _ll_tokenizer(tokenizer)
    matcher = llg.LLMatcher(lt, grammar, log_level=0)  # drops the GIL while it compiles
    if matcher.is_error():
        raise InvalidArgument(f"{_field(fmt)} does not compile: {_first_lines(matcher.get_error())}",
                              field=_field(fmt))
    with _lock:
        _compiled[key] = (weakref.ref(tokenizer), matcher)
        _compiled.move_to_end(key)
        while len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
    return Constraint(tokenizer, matcher.deep_copy(), fmt)


def _first_lines(message: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


class Constraint:
    """One request's grammar state: per step, :meth:`mask` then :meth:`advance`."""

    def __init__(self, tokenizer: Tokenizer, matcher, fmt: ResponseFormat):
        self.format = fmt
        self._matcher = matcher
        self._eot_ids = tokenizer.eot_ids
        self._bitmask = np.full((1, (tokenizer.vocab_size + 31) // 32), -1, dtype=np.int32)
        self._n_vocab = tokenizer.vocab_size
        self.step_seconds: list[float] = []  # time in mask + advance, per step (what the bench reports)

    @property
    def is_finished(self) -> bool:
        """True once the grammar admits nothing more: the output is complete."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean (vocab,) mask of the tokens allowed next (the library's bitmask, unpacked)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            raise ConstraintError(f"the {self.format.kind} constraint failed: {_first_lines(self._matcher.get_error())}")
        return np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little", count=self._n_vocab).view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of ``(vocab,)`` logits where every token the grammar does not allow is -inf.
        Logit rows wider than the tokenizer's vocabulary (padding) are -inf past it."""
        start = time.perf_counter()
        allowed = self.allowed()
        if not allowed.any():
            raise ConstraintError(f"the {self.format.kind} constraint allows no token here")
        out = np.full(logits.shape[-1], -np.inf, dtype=np.float32)
        n = min(out.size, allowed.size)
        np.copyto(out[:n], logits[:n], where=allowed[:n])  # one vectorized select, ~12 us for 49k ids
        self.step_seconds.append(time.perf_counter() - start)
        return out

    def advance(self, token: int) -> None:
        """Consume the sampled token (it was allowed; anything else is a bug, raised)."""
        start = time.perf_counter()
        ok = self._matcher.consume_token(int(token))
        if self.step_seconds:
            self.step_seconds[-1] += time.perf_counter() - start
        if not ok:
            raise ConstraintError(f"the {self.format.kind} constraint refused token {token}: "
                                  f"{_first_lines(self._matcher.get_error())}")

    def is_end(self, token: int) -> bool:
        """True when `token` ends the turn (the mask allowed it only because the grammar accepts)."""
        return token in self._eot_ids
