"""The batched engine loop on the real model: same tokens as alone, cancel frees memory, admission."""

from __future__ import annotations

import pytest

from engine.errors import ContextOverflow, InvalidArgument, ResourceExhausted
from engine.memory.paged import BlockArena
from engine.runtime.sampling import SamplingParams
from engine.runtime.worker import EngineWorker, Final, RequestSpec, WorkerLimits
from engine.scheduler.base import FifoPolicy

pytestmark = pytest.mark.slow


@pytest.fixture
def worker(loaded_model):
    w = EngineWorker(loaded_model, FifoPolicy(), WorkerLimits(max_batched_tokens=24, max_queue=8,
                                                                max_tokens_per_request=64),
                     arena=BlockArena.for_model(loaded_model.config, 256, 16))
    yield w
    w.close()


def idle(worker) -> bool:
    stats = worker.stats()
    return stats["running"] == stats["waiting"] == stats["kv_bytes"] == stats["kv_blocks_used"] == 0


def test_concurrent_requests_match_reference(worker, generation_reference):
    """Five prompts batched together (prefill chunked at 24 tokens) give hf_f32's greedy tokens."""
    handles = [worker.submit(RequestSpec("", c["prompt_ids"], SamplingParams(max_tokens=32), ignore_eos=True))
               for c in generation_reference]
    for case, handle in zip(generation_reference, handles):
        events = list(handle.events())
        final = events[-1]
        assert isinstance(final, Final) and final.finish_reason == "length"
        assert final.ids == case["hf_f32"]["greedy"], case["prompt"]
        assert [e.token_id for e in events[:-1] if e.token_id is not None] == final.ids
        assert "".join(e.text for e in events[:-1]) == final.text
    assert idle(worker)


def test_cancel_mid_stream_frees_cache(worker, generation_reference):
    handle = worker.submit(RequestSpec("c1", generation_reference[0]["prompt_ids"], SamplingParams(max_tokens=64),
                                       ignore_eos=True))
    events = handle.events()
    next(events), next(events)
    assert worker.stats()["kv_bytes"] > 0
    assert handle.cancel() is True
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 64
    assert idle(worker)
    assert worker.cancel("c1") is False  # already gone


def test_disconnected_client_cancels(worker, generation_reference):
    handle = worker.submit(RequestSpec("", generation_reference[0]["prompt_ids"], SamplingParams(max_tokens=64),
                                       ignore_eos=True))
    alive = iter([True, True])
    events = list(handle.events(poll_s=0.001, alive=lambda: next(alive, False)))
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 64
    assert worker.stats()["kv_bytes"] == 0


def test_admission_limits(loaded_model):
    w = EngineWorker(loaded_model, FifoPolicy(), WorkerLimits(max_queue=2, max_tokens_per_request=8),
                     arena=BlockArena.for_model(loaded_model.config, 64, 16))
    try:
        with pytest.raises(InvalidArgument, match="max_tokens 9 exceeds the plan's limit 8"):
            w.submit(RequestSpec("", [1, 2], SamplingParams(max_tokens=9)))
        with pytest.raises(ContextOverflow):
            w.submit(RequestSpec("", list(range(loaded_model.context_length)), SamplingParams(max_tokens=1)))
        with w._lock:  # hold the loop so the queue cannot drain while we fill it
            w.submit(RequestSpec("a", [1, 2], SamplingParams(max_tokens=1)))
            w.submit(RequestSpec("b", [1, 2], SamplingParams(max_tokens=1)))
            with pytest.raises(ResourceExhausted, match="queue is full .* retry in"):
                w.submit(RequestSpec("c", [1, 2], SamplingParams(max_tokens=1)))
            with pytest.raises(InvalidArgument, match="already in use"):
                w.submit(RequestSpec("a", [1, 2], SamplingParams(max_tokens=1)))
    finally:
        w.close()


def _alone(loaded_model, prompts, max_tokens):
    """Each prompt run by itself on a fresh worker: the reference for batching tests."""
    out = []
    for p in prompts:
        w = EngineWorker(loaded_model, FifoPolicy(), WorkerLimits(), arena=BlockArena.for_model(loaded_model.config, 256, 16))
        try:
            out.append(list(w.submit(RequestSpec("", p, SamplingParams(max_tokens=max_tokens),
                                                 ignore_eos=True)).events())[-1].ids)
        finally:
            w.close()
    return out


@pytest.fixture(scope="module")
def invariant_model(model_path):
    from engine.runtime.generate import LoadedModel
    model = LoadedModel(model_path, batch_invariant=True)
    yield model
    model.close()


def _prompts(model, n, length=12):
    import numpy as np
    rng = np.random.default_rng(7)
    return [rng.integers(100, model.config.vocab_size, length).tolist() for _ in range(n)]


def test_eight_concurrent_greedy_requests_equal_each_alone(invariant_model):
    """With determinism.batch_invariant, batch mates cannot change a single bit of a request."""
    prompts = _prompts(invariant_model, 8)
    alone = _alone(invariant_model, prompts, 12)
    w = EngineWorker(invariant_model, FifoPolicy(), WorkerLimits(max_batched_tokens=40),
                     arena=BlockArena.for_model(invariant_model.config, 256, 16))
    try:
        handles = [w.submit(RequestSpec("", p, SamplingParams(max_tokens=12), ignore_eos=True)) for p in prompts]
        together = [list(h.events())[-1].ids for h in handles]
    finally:
        w.close()
    assert together == alone


def test_small_arena_preempts_and_completes_every_request_correctly(invariant_model):
    c = invariant_model.config
    prompts = _prompts(invariant_model, 6, length=20)
    alone = _alone(invariant_model, prompts, 24)
    # 6 sequences of 44 positions need 18 blocks of 16; the arena has 8
    arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks=8, block_size=16)
    w = EngineWorker(invariant_model, FifoPolicy(), WorkerLimits(max_batched_tokens=64), arena=arena)
    try:
        handles = [w.submit(RequestSpec("", p, SamplingParams(max_tokens=24), ignore_eos=True)) for p in prompts]
        finals = [list(h.events())[-1] for h in handles]
        assert w.preemptions > 0
        assert arena.used_blocks == 0
    finally:
        w.close()
    assert [f.ids for f in finals] == alone
    assert all(f.finish_reason == "length" for f in finals)
