"""Token sampling: the per-request sampler chain and streaming stop-string detection.

Sampler chain, applied in this order on every step (like llama.cpp's sampler chain):

0. bias        ``logit_bias`` added to its tokens' logits (OpenAI); before ``min_tokens`` tokens
               are generated, the stop tokens (end of turn, ``stop_token_ids``) are set to -inf.
1. penalties   On a float32 copy of the raw logits. Repetition (CTRL / HF / llama.cpp): for
               every distinct token in the window, a logit > 0 is divided by
               ``repetition_penalty`` and a logit <= 0 is multiplied by it (in float64, clamped
               to float32's range, so no penalty > 0 overflows). Then presence /
               frequency (OpenAI): ``logit -= count * frequency_penalty + (count > 0) *
               presence_penalty``, where ``count`` is how often the token was *generated*
               inside the window.
2. greedy      If ``temperature == 0``: argmax of the penalized logits, ties to the lowest id.
               Nothing below runs and no random number is drawn.
3. temperature ``(logits - max) / temperature`` (the same distribution as ``logits / temperature``,
               and safe for any temperature > 0: nothing overflows to +inf or NaN).
4. top-k       Keep the ``top_k`` highest logits (ties at the boundary go to the lowest ids).
5. top-p       Keep the smallest highest-first set whose probability mass is >= ``top_p``.
6. min-p       Drop tokens whose probability is < ``min_p`` * (probability of the best token).
7. softmax     Over the survivors: max subtracted first; exp in float32, every sum (top-p,
               normalization, the draw's running sum) in float64.
8. draw        One uniform from the request's own PCG64 generator, inverted through the CDF.

Penalty window: the last ``penalty_last_n`` tokens of prompt + generated tokens (``-1``: the
whole context, ``0``: penalties off). The repetition penalty looks at the whole window, prompt
included, as llama.cpp does; presence / frequency penalties count only the generated tokens in
that window, as OpenAI and vLLM do (they are about the model repeating itself, not the user).

Reproducibility: each :class:`Sampler` owns a ``Generator(PCG64(seed))`` and draws exactly one
uniform per non-greedy step, so a request's tokens depend only on its seed, prompt, parameters
and the logits it is fed -- never on other requests sharing a batch.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["InvalidSamplingParams", "NonFiniteLogits", "SamplingParams", "Sampler", "StopChecker"]

# Nucleus search without top-k: sort only the best few tokens and widen (x16) until their mass
# reaches top_p, so a peaked distribution never pays for sorting the whole vocabulary.
_NUCLEUS_FIRST = 64
_NUCLEUS_GROWTH = 16
# The draw sums weights in blocks of this size and scans only the block the uniform lands in.
_DRAW_BLOCK = 256


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; ``field`` names it (e.g. ``"top_p"``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class NonFiniteLogits(ValueError):
    """The model produced NaN or +inf logits (non-finite weights, or activations that overflowed):
    no token can be sampled. It ends that request only."""


# Penalized logits are clamped to the float32 range, so any positive repetition penalty (even
# 1e-38) yields finite values; the temperature then scales differences from the best logit.
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler; validated on construction.

    ``stop`` also accepts a single string or a list (normalized to a tuple), as OpenAI does.
    """

    temperature: float = 0.0  # 0 => greedy
    top_k: int = 0  # 0 => disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL style, over prompt + generated tokens in the window
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens in the window
    frequency_penalty: float = 0.0  # OpenAI style, over generated tokens in the window
    penalty_last_n: int = 64  # penalty window; -1 = whole context, 0 = penalties off
    seed: int | None = None  # None => the Sampler draws one and exposes it
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in -100..100)
    stop_token_ids: tuple[int, ...] = ()  # generation also ends at these (not returned)
    min_tokens: int = 0  # stop tokens cannot be sampled before this many are generated

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidSamplingParams` naming the first offending field."""

        def check(field: str, ok: bool, rule: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise InvalidSamplingParams(field, f"{field} must be {rule}, got {value!r}")

        def real(field: str) -> float:
            value = getattr(self, field)
            check(field, _is_real(value) and math.isfinite(value), "a finite number")
            return float(value)

        def integer(field: str) -> int:
            value = getattr(self, field)
            check(field, _is_int(value), "an integer")
            return int(value)

        check("temperature", real("temperature") >= 0, ">= 0")
        check("top_k", integer("top_k") >= 0, ">= 0 (0 disables it)")
        check("top_p", 0 < real("top_p") <= 1, "in (0, 1]")
        check("min_p", 0 <= real("min_p") <= 1, "in [0, 1]")
        check("repetition_penalty", real("repetition_penalty") > 0, "> 0")
        check("presence_penalty", -2 <= real("presence_penalty") <= 2, "in [-2, 2]")
        check("frequency_penalty", -2 <= real("frequency_penalty") <= 2, "in [-2, 2]")
        check("penalty_last_n", integer("penalty_last_n") >= -1, ">= -1 (-1 = whole context)")
        check("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0),
              "None or a non-negative integer")
        check("max_tokens", integer("max_tokens") >= 1, ">= 1")
        check("stop", isinstance(self.stop, tuple)
              and all(isinstance(s, str) and s for s in self.stop),
              "a sequence of non-empty strings")
        check("logit_bias", all(isinstance(e, tuple) and len(e) == 2 and _is_int(e[0]) and e[0] >= 0
                                and _is_real(e[1]) and -100 <= e[1] <= 100 for e in self.logit_bias),
              "token ids >= 0 mapped to biases in [-100, 100]")
        check("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "token ids >= 0")
        check("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
              f"an integer in [0, max_tokens={self.max_tokens}]")


def _top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values``, best first, ties broken by lowest index.

    A partition (O(n)) finds the kth value; only the k winners are sorted. Selecting by value
    rather than by ``argpartition``'s arbitrary pick among ties keeps the tie rule exact.
    """
    n = values.size
    if k < n:
        kth = np.partition(values, n - k)[n - k]
        ids = np.flatnonzero(values >= kth)
        if ids.size > k:  # more tokens tie at the kth value than fit: keep the lowest ids
            tied = values[ids] == kth
            ids = ids[~tied | (np.cumsum(tied) <= k - (ids.size - tied.sum()))]
    else:
        ids = np.arange(n)
    return ids[np.argsort(-values[ids], kind="stable")]


def _nucleus(values: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (best first) of the smallest set of ``values`` (logits) with mass >= ``top_p``."""
    weights = np.exp(values - values.max())
    target = top_p * weights.sum(dtype=np.float64)
    k = _NUCLEUS_FIRST
    while True:
        ids = _top_ids(values, min(k, values.size))
        cumulative = np.cumsum(weights[ids], dtype=np.float64)
        # The full set always qualifies: its summation order differs from weights.sum(), so
        # cumulative[-1] may fall a rounding error short of target when top_p is near 1.
        if cumulative[-1] >= target or ids.size == values.size:
            return ids[: min(int(np.searchsorted(cumulative, target)) + 1, ids.size)]
        k *= _NUCLEUS_GROWTH


def _pick(weights: np.ndarray, u: float) -> int:
    """Inverse CDF: the index where ``u`` (in [0, 1)) of the total mass falls in the running sum
    of ``weights``; never an index of weight 0.

    Sums blocks, then runs a cumulative sum inside one block only, instead of over the whole
    vocabulary (the float64 cumulative sum of 49152 weights would dominate a sampling step).
    """
    blocks = np.zeros(-(-weights.size // _DRAW_BLOCK) * _DRAW_BLOCK, weights.dtype)
    blocks[: weights.size] = weights
    blocks = blocks.reshape(-1, _DRAW_BLOCK)
    ends = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    target = u * ends[-1]
    b = int(np.searchsorted(ends, target, side="right"))  # u < 1 keeps target < ends[-1]
    inner = (ends[b - 1] if b else 0.0) + np.cumsum(blocks[b], dtype=np.float64)
    i = int(np.searchsorted(inner, target, side="right"))
    if i == _DRAW_BLOCK:
        # The block's running sum rounded below its pairwise sum and target fell in between:
        # take the block's last token with mass (the block has some, as ends[b] > target).
        i = int(np.flatnonzero(blocks[b])[-1])
    return b * _DRAW_BLOCK + i


def _log_softmax_at(logits: np.ndarray, ids: np.ndarray | int) -> np.ndarray | float:
    top = logits.max()
    log_total = math.log(np.exp(logits - top).sum(dtype=np.float64))
    return np.asarray(logits[ids], dtype=np.float64) - float(top) - log_total


def _logprobs(logits: np.ndarray, ids, log_z: float | None):
    if log_z is None:
        return _log_softmax_at(logits, ids)
    lp = np.asarray(logits[ids], dtype=np.float64) - log_z
    return float(lp) if lp.ndim == 0 else lp


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty (vocab,) array, got shape {logits.shape}")
    # max() propagates NaN, so this one check also rejects NaN, +inf and all -inf.
    if not math.isfinite(logits.max()):
        bad = "NaN" if np.isnan(logits).any() else "+inf" if np.isposinf(logits).any() else "only -inf"
        raise NonFiniteLogits(f"the model produced {bad} logits, so no token can be sampled (non-finite "
                              "weights or activations that overflowed)")
    return logits


class Sampler:
    """Per-request sampler: owns the request's RNG and penalty state.

    ``seed`` is the seed actually used: ``params.seed``, or one drawn at construction when that
    is None, so any result can be reproduced by passing it back.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), stop_ids: Sequence[int] = ()):
        """`stop_ids`: the tokens that end generation (end of turn and `params.stop_token_ids`),
        held back until `params.min_tokens` tokens are generated."""
        self.params = params
        self._min_stop_ids = np.array(sorted(set(stop_ids) | set(params.stop_token_ids)), dtype=np.int64)
        if params.logit_bias:
            self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
            self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._context: list[int] = [int(t) for t in prompt_ids]
        self._n_prompt = len(self._context)

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far (compare with ``params.max_tokens``)."""
        return len(self._context) - self._n_prompt

    @property
    def at_max_tokens(self) -> bool:
        """True once ``params.max_tokens`` tokens were sampled (finish reason "length")."""
        return self.num_generated >= self.params.max_tokens

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        """Steps 0 and 1 of the chain: a float32 copy of ``logits`` with the bias, the min-tokens
        mask and the penalties applied."""
        p = self.params
        out = np.array(logits, dtype=np.float32)
        if p.logit_bias:  # step 0
            out[self._bias_ids] += self._bias
        if self.num_generated < p.min_tokens and self._min_stop_ids.size:
            out[self._min_stop_ids[self._min_stop_ids < out.size]] = -np.inf
        if p.penalty_last_n == 0 or (p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                                     and p.frequency_penalty == 0.0):
            return out
        n = len(self._context)
        start = 0 if p.penalty_last_n == -1 else max(0, n - p.penalty_last_n)
        if p.repetition_penalty != 1.0 and start < n:
            ids = np.unique(np.asarray(self._context[start:], dtype=np.int64))
            seen = out[ids].astype(np.float64)  # float64: a tiny or huge penalty must not overflow
            out[ids] = np.clip(np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty),
                               -_F32_MAX, _F32_MAX)
        gen_start = max(start, self._n_prompt)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and gen_start < n:
            ids, counts = np.unique(np.asarray(self._context[gen_start:], dtype=np.int64),
                                    return_counts=True)
            out[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return out

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1-6 and the exponentials of step 7: ``(token_ids, unnormalized weights)``."""
        p = self.params
        x = self.apply_penalties(logits)
        if p.temperature == 0.0:
            return np.array([int(np.argmax(x))]), np.ones(1, np.float32)
        # Scale the differences from the best logit, not the logits: they are <= 0, so any
        # temperature > 0 (1e-38 included) gives values <= 0 -- the best token 0, others at worst
        # -inf (weight 0) -- never +inf or NaN.
        # (A temperature below float32's smallest subnormal would round to 0: clamp it there.)
        x -= x.max()
        with np.errstate(over="ignore"):
            x /= max(p.temperature, _F32_TINY)
        if 0 < p.top_k < x.size:
            ids = _top_ids(x, p.top_k)
            values = x[ids]
        else:
            ids, values = np.arange(x.size), x
        if p.top_p < 1.0:
            keep = _nucleus(values, p.top_p)
            ids, values = ids[keep], values[keep]
        if p.min_p > 0.0:
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
            keep = values >= values.max() + math.log(p.min_p)
            ids, values = ids[keep], values[keep]
        return ids, np.exp(values - values.max())

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1-7 of the chain: ``(token_ids, probs)`` the next draw would pick from.

        Pure: neither draws from the RNG nor records a token. Greedy yields a single token with
        probability 1. ``token_ids`` are best first when top-k or top-p ran, else ascending.
        """
        ids, weights = self._candidates(_check_logits(logits))
        return ids, weights / weights.sum(dtype=np.float64)

    def sample(self, logits: np.ndarray, log_z: float | None = None) -> tuple[int, float]:
        """Pick the next token from ``(vocab,)`` raw model logits and record it in the history.

        Returns ``(token_id, logprob)``; ``logprob`` is the log-softmax of the *raw* logits
        (before penalties and temperature) at the chosen token, as vLLM reports by default.
        ``log_z``, log(sum(exp(logits))), may come precomputed (the backend's `logsumexp`).
        """
        logits = _check_logits(logits)
        ids, weights = self._candidates(logits)
        if self.params.temperature == 0.0:
            token = int(ids[0])
        else:  # draw even from a single candidate: the RNG stream advances once per step
            token = int(ids[_pick(weights, self._rng.random())])
        self._context.append(token)
        return token, _logprobs(logits, token, log_z)

    def logprobs_top(self, logits: np.ndarray, k: int, log_z: float | None = None) -> list[tuple[int, float]]:
        """The ``k`` most likely ``(token_id, logprob)`` under the raw logits, best first."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k == 0:
            return []
        logits = _check_logits(logits)
        ids = _top_ids(logits, min(k, logits.size))
        return [(int(t), float(lp)) for t, lp in zip(ids, _logprobs(logits, ids, log_z))]


def _partial_stop(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class StopChecker:
    """Finds stop strings in streamed text, across token boundaries, and holds back text that
    might be the beginning of a stop string so the client never sees a partial stop string.

    When several stop strings occur, the one starting earliest wins; ``matched`` tells which.
    """

    def __init__(self, stop: Sequence[str]):
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._stops = tuple(stop)
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen; later pushes emit nothing."""
        return self.matched is not None

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Add streamed text; return ``(text safe to emit now, stopped?)``.

        On a stop, the text up to (excluding) the stop string is emitted and nothing after it.
        """
        if self.stopped:
            return "", True
        text = self._held + text_delta
        # Held text is shorter than the longest stop string, so searching it again with the
        # delta stays cheap and catches stop strings that span pushes.
        hits = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits, key=lambda hit: hit[0])
            self._held = ""
            return text[:i], True
        hold = max((_partial_stop(text, s) for s in self._stops), default=0)
        self._held = text[len(text) - hold:]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """At the end of generation, release the held-back text (empty after a stop)."""
        held, self._held = self._held, ""
        return held
