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
        token, _ = sampler.sample(logits, float(model.backend.logsumexp(logits[None])[0]))  # as TokenStream does
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
    report = getattr(model.backend, "weights_report", None)
    if report is not None:  # what the weights became at load: kept, repacked, requantized; which kernels
        from backends.cpu.quantized import extension_status
        result["weights_report"] = ", ".join(f"{k}: {v}" for k, v in sorted(report().items()))
        result["kernels"] = extension_status()
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


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def bench_concurrency(model: LoadedModel, levels: list[int], prompt_len: int = 32, gen_len: int = 64,
                      policy: str = "throughput") -> list[dict[str, Any]]:
    """In-process continuous batching: `n` requests at once for each level in `levels`.

    Every request has its own random prompt of `prompt_len` tokens and decodes `gen_len`
    tokens (end-of-turn ignored). Aggregate tok/s is all generated tokens over the wall
    time from submission to the last token; TTFT and ITL come from each request's timings.
    """
    from engine.memory.paged import BlockArena
    from engine.runtime.worker import EngineWorker, RequestSpec, WorkerLimits
    from engine.scheduler.base import create_policy

    c = model.config
    rows = []
    for n in [1] + list(levels):  # the first run warms up (pages in weights, allocates) and is not reported
        block = 16
        arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, n * -(-(prompt_len + gen_len) // block) + n, block)
        worker = EngineWorker(model, create_policy(policy),
                              WorkerLimits(max_batch_size=max(n, 1), max_batched_tokens=max(512, n),
                                           max_queue=n, max_tokens_per_request=gen_len), arena=arena)
        try:
            rng = np.random.default_rng(n)
            start = time.perf_counter()
            handles = [worker.submit(RequestSpec("", rng.integers(0, c.vocab_size, prompt_len).tolist(),
                                                 SamplingParams(max_tokens=gen_len), ignore_eos=True))
                       for _ in range(n)]
            finals = [list(h.events())[-1] for h in handles]
            wall = time.perf_counter() - start
        finally:
            worker.close()
        ttft = [f.timings["ttft_s"] for f in finals]
        itl = [x for f in finals for x in f.itl_s]
        tokens = sum(f.completion_tokens for f in finals)
        rows.append({"concurrency": n, "tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
                     "ttft_p50_s": round(_percentile(ttft, 50), 3), "ttft_p99_s": round(_percentile(ttft, 99), 3),
                     "itl_p50_s": round(_percentile(itl, 50), 4), "itl_p99_s": round(_percentile(itl, 99), 4),
                     "steps": worker.steps, "wall_s": round(wall, 2)})
    rows = rows[1:]
    base = rows[0]["aggregate_tok_s"] if rows else 1.0
    for r in rows:
        r["vs_first_level"] = round(r["aggregate_tok_s"] / base, 2)
    return rows


def bench_prefix_cache(model: LoadedModel, prefix_len: int = 1000, suffix_len: int = 16, rounds: int = 3,
                       weights_note: str = "") -> dict[str, Any]:
    """Time to first token of two requests sharing a `prefix_len`-token prefix (each with its own
    `suffix_len`-token end), one after the other, with prefix caching on and off (interleaved,
    `rounds` times, medians). With the cache on, the second request computes only its suffix."""
    from engine.memory.paged import BlockArena
    from engine.runtime.worker import EngineWorker, RequestSpec, WorkerLimits
    from engine.scheduler.base import create_policy

    if prefix_len + suffix_len + 2 > model.context_length:
        raise ValueError(f"prefix {prefix_len} + suffix {suffix_len} must fit the context length {model.context_length}")
    c, block = model.config, 16
    rng = np.random.default_rng(0)

    def ttfts(caching: bool) -> tuple[float, float]:
        prefix = rng.integers(0, c.vocab_size, prefix_len).tolist()  # a fresh prefix each time: nothing cached
        arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, 4 * -(-(prefix_len + suffix_len + 2) // block), block)
        worker = EngineWorker(model, create_policy("fifo"), WorkerLimits(max_batched_tokens=2048), arena=arena,
                              prefix_caching=caching, cache_salt=b"bench")
        try:
            out = []
            for _ in range(2):
                prompt = prefix + rng.integers(0, c.vocab_size, suffix_len).tolist()
                final = list(worker.submit(RequestSpec("", prompt, SamplingParams(max_tokens=1))).events())[-1]
                out.append(final.timings["ttft_s"])
            return out[0], out[1]
        finally:
            worker.close()

    ttfts(True)  # warm-up
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(rounds):
        for caching in (True, False):
            runs[caching].append(ttfts(caching))
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
    return {"model": str(model.file.path), "weights": model.weight_format, "prefix_len": prefix_len,
            "suffix_len": suffix_len, "rounds": rounds,
            "cache_on_first_ttft_s": round(med[True][0], 4), "cache_on_second_ttft_s": round(med[True][1], 4),
            "cache_off_first_ttft_s": round(med[False][0], 4), "cache_off_second_ttft_s": round(med[False][1], 4),
            "second_vs_first_with_cache": round(med[True][0] / med[True][1], 1)}


# A long JSON output (40 records) so every stream is still inside the grammar after `gen_len` tokens.
STRUCTURED_BENCH_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["records"],
    "properties": {"records": {"type": "array", "minItems": 40, "maxItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "score", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 12},
                       "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
                       "score": {"type": "number", "minimum": -1, "maximum": 1},
                       "ok": {"type": "boolean"}}}}}}


def bench_structured(model: LoadedModel, levels: list[int], gen_len: int = 48, repeats: int = 3) -> list[dict[str, Any]]:
    """Per-step cost of structured output at each concurrency level (docs/12_structured_output.md).

    `n` requests share a chat prompt and sample (temperature 1) `gen_len` tokens under
    STRUCTURED_BENCH_SCHEMA, batched by one worker; each request's Constraint times its mask and
    advance per step. The step's cost is the sum over the `n` streams (they run one after another
    on the engine thread). The same requests without the schema give the baseline inter-token
    latency. Medians over `repeats` runs of the per-step medians: the machine is shared and noisy.
    """
    import json
    from unittest import mock

    from engine.memory.paged import BlockArena
    from engine.runtime import worker as worker_module
    from engine.runtime.constraints import ResponseFormat, compile_format
    from engine.runtime.worker import EngineWorker, RequestSpec, WorkerLimits
    from engine.scheduler.base import create_policy

    c = model.config
    prompt = model.encode_prompt(messages=[{"role": "user", "content": "List forty records as JSON."}])
    fmt = ResponseFormat("json_schema", json.dumps(STRUCTURED_BENCH_SCHEMA))
    compile_format(model.tokenizer, fmt)  # the llguidance tokenizer and the compiled schema: once per process

    def run(n: int, structured: bool) -> tuple[list[float], list[float]]:
        made = []

        def recording(tokenizer, f):
            made.append(compile_format(tokenizer, f))
            return made[-1]

        block = 16
        arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, n * -(-(len(prompt) + gen_len) // block) + n, block)
        worker = EngineWorker(model, create_policy("throughput"),
                              WorkerLimits(max_batch_size=n, max_batched_tokens=max(512, n * len(prompt)),
                                           max_queue=n, max_tokens_per_request=gen_len), arena=arena)
        try:
            with mock.patch.object(worker_module, "compile_format", recording):
                handles = [worker.submit(RequestSpec("", prompt, SamplingParams(temperature=1.0, seed=i,
                                                                               max_tokens=gen_len),
                                                     ignore_eos=not structured,
                                                     response_format=fmt if structured else None))
                           for i in range(n)]
            finals = [list(h.events())[-1] for h in handles]
        finally:
            worker.close()
        itl = [x for f in finals for x in f.itl_s]
        steps = min((len(m.step_seconds) for m in made), default=0)
        per_step = [sum(m.step_seconds[k] for m in made) for k in range(1, steps)]  # step 0 rides on the prefill
        return per_step, itl

    rows = []
    run(1, True)  # warm-up: pages in weights
    for n in levels:
        cost, per_token, itl_on, itl_off = [], [], [], []
        for _ in range(repeats):
            per_step, itl = run(n, True)
            cost.append(float(np.median(per_step)))
            per_token.append(float(np.median(per_step)) / n)
            itl_on.append(float(np.median(itl)))
            itl_off.append(float(np.median(run(n, False)[1])))
        mask_ms, step_ms = float(np.median(cost)) * 1e3, float(np.median(itl_on)) * 1e3
        rows.append({"concurrency": n, "mask_ms_per_step": round(mask_ms, 3),
                     "mask_us_per_stream": round(float(np.median(per_token)) * 1e6, 1),
                     "step_ms_structured": round(step_ms, 1),
                     "step_ms_free": round(float(np.median(itl_off)) * 1e3, 1),
                     "mask_share_of_step": round(mask_ms / step_ms, 4) if step_ms else 0.0})
    return rows
