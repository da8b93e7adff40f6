"""`plan-engine bench`: prefill and decode throughput, load time, memory, and where the time goes.

pp (prompt processing) runs one prompt of N tokens in one batched pass, as
llama.cpp's `llama-bench -p N` does; tg (text generation) decodes N tokens one
at a time after a one-token prompt, as `-n N` does. Both use random token ids
from a fixed seed so runs are comparable. The per-op profile comes from a
separate, timed pass, so its overhead never touches the throughput figures.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from backends.base import OpProfile, ProfiledBackend
from engine.runtime.generate import LoadedModel, decode_one_token, prefill
from engine.runtime.sampling import Sampler, SamplingParams


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prompt(model: LoadedModel, n: int) -> list[int]:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, n).tolist()


def run_pp(model: LoadedModel, n: int) -> float:
    """Seconds to prefill n tokens."""
    kv = model.transformer.new_kv(n)
    start = time.perf_counter()
    prefill(model, kv, _prompt(model, n))
    return time.perf_counter() - start


def run_tg(model: LoadedModel, n: int, sample_profile: OpProfile | None = None) -> float:
    """Seconds to decode n tokens greedily (sampling included) after a one-token prompt."""
    kv = model.transformer.new_kv(n + 1)
    sampler = Sampler(SamplingParams(temperature=0.0, max_tokens=n))
    logits = prefill(model, kv, _prompt(model, 1))
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        token, _ = sampler.sample(logits)
        if sample_profile is not None:
            sample_profile.add("sampling", time.perf_counter() - t0)
        logits = decode_one_token(model, kv, token)
    return time.perf_counter() - start


def bench(model: LoadedModel, pp: int = 512, tg: int = 128, repeats: int = 2, profile: bool = True) -> dict[str, Any]:
    """Best of `repeats` runs (after a warm-up) for pp and tg; per-op shares of one profiled run."""
    if pp >= model.context_length or tg + 1 > model.context_length:
        raise ValueError(f"pp {pp} and tg {tg} must fit the context length {model.context_length}")
    run_pp(model, min(pp, 64)), run_tg(model, 4)  # warm-up: page in weights, allocate
    pp_s = min(run_pp(model, pp) for _ in range(repeats))
    tg_s = min(run_tg(model, tg) for _ in range(repeats))
    result: dict[str, Any] = {
        "model": str(model.file.path),
        "backend": model.backend.name,
        "weights": model.weight_format,
        "load_s": round(model.load_seconds, 3),
        f"pp{pp}_tok_s": round(pp / pp_s, 1),
        f"tg{tg}_tok_s": round(tg / tg_s, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if profile:
        result["profile"] = {}
        inner = model.transformer.backend
        try:
            for phase, runner in (("prefill", lambda: run_pp(model, pp)), ("decode", None)):
                ops = OpProfile()
                model.transformer.backend = ProfiledBackend(inner, ops)  # type: ignore[assignment]
                wall = runner() if runner else run_tg(model, tg, sample_profile=ops)
                rows = ops.rows()
                timed = sum(r["seconds"] for r in rows)
                rows.append({"op": "other (python, copies, cache writes)", "count": 0,
                             "seconds": round(max(wall - timed, 0.0), 6), "share": None})
                total = sum(r["seconds"] for r in rows)
                for r in rows:
                    r["share"] = round(r["seconds"] / total, 4)
                result["profile"][phase] = {"wall_s": round(wall, 4), "ops": rows}
        finally:
            model.transformer.backend = inner
    return result
