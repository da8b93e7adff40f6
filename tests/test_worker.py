"""The batched engine loop on the real model: same tokens as alone, cancel frees memory, admission."""

from __future__ import annotations

import pytest

from engine.errors import ContextOverflow, InvalidArgument, ResourceExhausted
from engine.runtime.sampling import SamplingParams
from engine.runtime.worker import EngineWorker, Final, RequestSpec, WorkerLimits
from engine.scheduler.base import FifoPolicy

pytestmark = pytest.mark.slow


@pytest.fixture
def worker(loaded_model):
    w = EngineWorker(loaded_model, FifoPolicy(), WorkerLimits(max_batched_tokens=24, max_queue=8,
                                                                max_tokens_per_request=64))
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
    assert events[-1].finish_reason in ("cancelled", "length")
    assert worker.stats()["kv_bytes"] == 0


def test_admission_limits(loaded_model):
    w = EngineWorker(loaded_model, FifoPolicy(), WorkerLimits(max_queue=2, max_tokens_per_request=8))
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
