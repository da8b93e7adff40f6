"""The paged KV arena: allocation, contiguity, gather, release, exhaustion."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ContextOverflow
from engine.memory.paged import BlockArena, PagedKV


def arena(num_blocks=8, bs=4, dtype=np.float32):
    return BlockArena(n_layers=2, n_kv_heads=3, head_dim=5, num_blocks=num_blocks, block_size=bs, dtype=dtype)


def fill_seq(kv: PagedKV, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, 3, 5)).astype(np.float32)
    v = rng.standard_normal((n, 3, 5)).astype(np.float32)
    assert kv.reserve(n)
    for layer in range(2):
        kv.write(layer, 0, k, v)
    return k, v


def test_roundtrip_contiguous_and_fragmented():
    a = arena()
    s1, s2 = PagedKV(a, 64), PagedKV(a, 64)
    k1, v1 = fill_seq(s1, 3, 1)  # block 0
    k2, v2 = fill_seq(s2, 6, 2)  # blocks 1, 2
    rng = np.random.default_rng(3)
    more = rng.standard_normal((4, 3, 5)).astype(np.float32)
    assert s1.reserve(7)  # grows into block 3: not next to block 0
    s1.write(0, 3, more, more)
    assert s1.blocks == [0, 3]
    k, v = s1.read(0, 7)
    np.testing.assert_array_equal(k, np.concatenate([k1, more]).transpose(1, 0, 2))
    k, v = s2.read(1, 6)
    assert np.shares_memory(k, a.k)  # consecutive blocks: a view, no copy
    np.testing.assert_array_equal(v, v2.transpose(1, 0, 2))


def test_exhaustion_is_a_return_value_and_release_frees():
    a = arena(num_blocks=3)
    s1, s2 = PagedKV(a, 64), PagedKV(a, 64)
    assert s1.reserve(8) and a.free_blocks == 1
    assert s2.reserve(8) is False and s2.blocks == [] and a.free_blocks == 1  # nothing taken
    s1.release()
    assert a.free_blocks == 3 and s2.reserve(12) and a.stats()["blocks_used"] == 3
    taken = list(s2.blocks)
    s2.release()
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(taken[:1])


def test_limits_and_stats():
    a = arena(num_blocks=4, bs=4)
    s = PagedKV(a, 10)
    with pytest.raises(ContextOverflow):
        s.reserve(11)
    assert s.reserve(5) and s.nbytes == 2 * a.block_bytes
    assert a.stats()["bytes_used"] == 2 * a.block_bytes == 2 * (2 * 2 * 3 * 4 * 5 * 4)
    with pytest.raises(ContextOverflow):
        s.write(0, 6, np.zeros((3, 3, 5), np.float32), np.zeros((3, 3, 5), np.float32))


def test_f16_arena_reads_f32():
    a = arena(dtype=np.float16)
    s = PagedKV(a, 64)
    k, _ = fill_seq(s, 5, 4)
    got, _ = s.read(0, 5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, k.transpose(1, 0, 2), atol=2e-3)
