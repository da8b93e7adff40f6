"""The paged KV arena: allocation, contiguity, gather, release, exhaustion."""

from __future__ import annotations

import numpy as np
import pytest

from backends.cpu.backend import CpuBackend
from engine.errors import ContextOverflow
from engine.execution import kernel_settings
from engine.memory.paged import BlockArena, PagedKV, PagedStep


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


def test_paged_step_writes_every_token_and_tables_the_decoders():
    """One step: a prompt chunk and two decoders (one fragmented) written by one scatter; the
    decoders' block tables read back each sequence's own keys, what `read` returns."""
    a = arena(num_blocks=8, bs=4)
    prompt, d1, d2 = PagedKV(a, 64), PagedKV(a, 64), PagedKV(a, 64)
    fill_seq(d1, 4, 5)  # block 0, full
    fill_seq(d2, 2, 6)  # block 1
    assert prompt.reserve(3) and d1.reserve(5) and d2.reserve(3)  # d1 grows into block 3: fragmented
    assert d1.blocks == [0, 3]
    rng = np.random.default_rng(7)
    k, v = rng.standard_normal((2, 5, 3, 5)).astype(np.float32)  # 3 prompt tokens, then one per decoder
    step = PagedStep([prompt, d1, d2], [0, 4, 2], [3, 1, 1], decoders=[1, 2])
    step.write(1, k, v)
    np.testing.assert_array_equal(step.lengths, [5, 3])
    assert step.table.shape == (2, 2) and list(step.table[0]) == [0, 3] and step.table[1, 0] == 1
    np.testing.assert_array_equal(prompt.read(1, 3)[0], k[:3].transpose(1, 0, 2))
    np.testing.assert_array_equal(d1.read(1, 5)[1][:, 4], v[3])
    np.testing.assert_array_equal(d2.read(1, 3)[0][:, 2], k[4])
    # the backend contract's default (gather) and the C kernel agree with plain attention
    be = CpuBackend(kernel_settings(), kernels="numpy")
    q = rng.standard_normal((2, 6, 5)).astype(np.float32)
    got = be.paged_decode_attention(q, *step.pages(1), step.table, step.lengths)
    for row, (kv, n) in enumerate([(d1, 5), (d2, 3)]):
        kk, vv = kv.read(1, n)
        np.testing.assert_allclose(got[row], be.attention(q[row:row + 1], kk, vv, np.array([n - 1]))[0],
                                   rtol=1e-5, atol=1e-6)


def test_paged_step_refuses_unreserved_writes():
    a = arena()
    s = PagedKV(a, 64)
    assert s.reserve(4)
    with pytest.raises(ContextOverflow):
        PagedStep([s], [3], [2], decoders=[])


def test_layer_views_cover_consecutive_blocks_in_place_and_nothing_else():
    """The fused decode path's cache: the sequence's whole reservation as (n_kv, capacity, hd)
    views of the arena when its blocks are one run, None when they are not."""
    arena = BlockArena(n_layers=2, n_kv_heads=2, head_dim=4, num_blocks=6, block_size=4)
    kv = PagedKV(arena, 16)
    assert kv.layer_views(0) is None  # nothing reserved
    assert kv.reserve(8)  # blocks 0, 1
    k, v = kv.layer_views(1)
    assert k.shape == v.shape == (2, 8, 4) and np.shares_memory(k, arena.k[1])
    k[1, 5] = 7.0  # position 5 of kv head 1: block 1, slot 1
    assert (arena.k[1, 1, kv.blocks[1], 1] == 7.0).all()
    other = PagedKV(arena, 16)
    assert other.reserve(4)  # block 2
    assert kv.reserve(12)  # block 3: no longer one run
    assert kv.layer_views(0) is None


def test_layer_views_none_once_a_window_left_holes():
    arena = BlockArena(n_layers=1, n_kv_heads=1, head_dim=4, num_blocks=4, block_size=4)
    kv = PagedKV(arena, 16)
    assert kv.reserve(12) and kv.layer_views(0) is not None
    assert kv.forget_before(5) == 1  # block 0 out of every window: a hole
    assert kv.layer_views(0) is None
