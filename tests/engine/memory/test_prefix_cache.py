"""Automatic prefix caching: the arena's reference counts, hashes and LRU eviction, and the worker
reusing cached blocks without changing any token (issue 17, item 1)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.memory.paged import BlockArena, PagedKV, block_hashes
from engine.runtime.generate import LoadedModel
from engine.runtime.sampling import SamplingParams
from engine.runtime.worker import EngineWorker, Final, RequestSpec
from engine.scheduler.base import FifoPolicy


def arena(num_blocks=6, bs=4) -> BlockArena:
    return BlockArena(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=bs)


def test_block_hashes_chain_the_prefix_and_the_salt():
    h = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, b"m")
    assert len(h) == 2  # only full blocks
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"m") == h
    assert block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4, b"m")[1] != h[1]  # a block's hash covers all before it
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"other model") != h
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, b"m", start=h[:1])[:2] == h


def test_registered_blocks_are_shared_counted_and_kept_when_released():
    a = arena()
    first = PagedKV(a, 64)
    assert first.reserve(8)
    hashes = block_hashes(list(range(8)), 4)
    for b, h in zip(first.blocks, hashes):
        a.register(b, h)
    second = PagedKV(a, 64)
    found = a.lookup(hashes + [b"not cached"])
    assert found == first.blocks and all(a.refs(b) == 2 for b in found)
    second.adopt(found)
    assert second.length == 8 and second.reserve(12) and second.blocks[:2] == first.blocks
    first.release()
    assert all(a.refs(b) == 1 for b in found)
    second.release()
    # no sequence holds them, but they stay cached, and still count as free
    assert a.cached_blocks == 2 and a.free_blocks == 6 and a.used_blocks == 0
    assert a.lookup(hashes) == found


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_needed():
    a = arena(num_blocks=4)
    kvs = []
    for i in range(4):  # four one-block prefixes, released in order 0..3
        kv = PagedKV(a, 64)
        assert kv.reserve(4)
        a.register(kv.blocks[0], bytes([i]))
        kvs.append(kv)
    for kv in kvs:
        kv.release()
    a.free(a.lookup([bytes([0])]))  # prefix 0 used again: now the most recent
    taken = a.allocate(2)
    assert taken is not None and a.evictions == 2
    assert a.lookup([bytes([1])]) == [] and a.lookup([bytes([2])]) == []  # the two least recent went
    assert len(a.lookup([bytes([0])])) == 1 and len(a.lookup([bytes([3])])) == 1
    assert a.allocate(1) is None  # everything else is held


def test_a_block_is_never_freed_twice():
    a = arena()
    blocks = a.allocate(1)
    a.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(blocks)


# --- the worker, on the tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module", params=[False, True], ids=["default", "batch_invariant"])
def model(tiny, request):
    """The tiny model as the default plan runs it, and with batch-invariant kernels."""
    m = LoadedModel(tiny, batch_invariant=request.param)
    yield m
    m.close()


def worker(model, caching: bool, num_blocks=40, **kwargs) -> EngineWorker:
    c = model.config
    return EngineWorker(model, FifoPolicy(), arena=BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks, 4),
                        prefix_caching=caching, cache_salt=b"tiny", **kwargs)


def run(w: EngineWorker, prompts, max_tokens=6, temperature=0.0) -> list[list[int]]:
    handles = [w.submit(RequestSpec("", p, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i),
                                    ignore_eos=True)) for i, p in enumerate(prompts)]
    finals = [list(h.events())[-1] for h in handles]
    assert all(isinstance(f, Final) and f.finish_reason == "length" for f in finals)
    return [f.ids for f in finals]


def settled(w: EngineWorker) -> None:
    """No sequence holds a block: every block is either plainly free or cached and idle."""
    a = w.arena
    assert a.used_blocks == 0 and a.free_blocks == a.num_blocks and not a._refs


def test_a_shared_prefix_is_computed_once_and_gives_the_same_tokens(model):
    rng = np.random.default_rng(1)
    system = rng.integers(0, 6, 30).tolist()  # a shared "system prompt" of 30 tokens = 7 full blocks
    prompts = [system + rng.integers(0, 6, 5).tolist() for _ in range(4)]
    off, on = worker(model, False), worker(model, True)
    try:
        expected = run(off, prompts)
        assert run(on, prompts[:1]) == expected[:1]
        before = on.stats()
        assert run(on, prompts[1:]) == expected[1:]
        after = on.stats()
        assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * 28  # 7 blocks of 4, each request
        assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 3 * 35
        # sampled too: the same seeds give the same tokens with and without the cache
        assert run(on, prompts, temperature=0.9) == run(off, prompts, temperature=0.9)
        assert off.stats()["prefix_cache_hits"] == 0
        settled(on)
    finally:
        off.close(), on.close()


def test_a_fully_cached_prompt_still_computes_its_last_block(model):
    prompt = list(range(6)) * 4  # 24 tokens: exactly 6 blocks
    w = worker(model, True)
    try:
        first = run(w, [prompt])
        hits = w.stats()["prefix_cache_hits"]
        assert run(w, [prompt]) == first
        assert w.stats()["prefix_cache_hits"] - hits == 20  # 5 blocks reused, the last recomputed
        settled(w)
    finally:
        w.close()


def test_eviction_preemption_and_cancel_interleaved_keep_reference_counts_right(model):
    """A small arena (preemption and eviction every few steps) under random cancels: every block
    ends free or cached, and the requests that finish give the tokens they give without a cache."""
    rng = random.Random(7)
    shared = [rng.randrange(6) for _ in range(12)]
    prompts = [shared[:rng.choice([4, 8, 12])] + [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
               for _ in range(24)]
    off = worker(model, False, num_blocks=200)
    try:
        expected = {tuple(p): ids for p, ids in zip(prompts, run(off, prompts, max_tokens=10))}
    finally:
        off.close()
    w = worker(model, True, num_blocks=12)  # 48 positions for up to 24 requests of up to 29
    try:
        handles = []
        for i, p in enumerate(prompts):
            handles.append((p, w.submit(RequestSpec(f"r{i}", p, SamplingParams(max_tokens=10), ignore_eos=True))))
            if rng.random() < 0.3:
                handles[rng.randrange(len(handles))][1].cancel()
        done = 0
        for p, h in handles:
            final = list(h.events())[-1]
            if final.finish_reason == "length":
                assert final.ids == expected[tuple(p)]
                done += 1
        stats = w.stats()
        assert done >= 10 and stats["preemptions"] > 0 and stats["prefix_cache_evictions"] > 0, stats
        assert stats["prefix_cache_hits"] > 0
        settled(w)
    finally:
        w.close()
