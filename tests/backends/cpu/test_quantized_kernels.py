"""The quantized-resident kernels against dequantize-then-matmul (backends/quants.py).

Every kernel type, awkward shapes (1 row, non-power-of-two rows, many blocks, batch 1 and
batch > 1, fused parts of mixed types), both matmul paths, the numpy fallback, and the C
decoder-layer ops against the numpy code they replace.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from backends.base import TensorData
from backends.cpu import quantized as qz
from backends.cpu.backend import CpuBackend
from backends.cpu.quantized import BlockPart, QuantizedMatmul, activation_block, quantize_activations
from backends.quants import dequantize, quant_type
from engine.errors import InvalidArgument
from engine.execution import DEFAULT_EXECUTION, kernel_settings

INT8_ALWAYS = kernel_settings(gemm_rows_x8=0)  # 0: never dequantize-into-GEMM

ops = qz._EXTENSION
needs_ext = pytest.mark.skipif(ops is None, reason=f"ops_avx2 unavailable: {qz._WHY_NOT}")

TYPES = tuple(qz.KERNEL_TYPES)  # every block type: Q4_0 .. IQ4_XS
# (rows, k, batch): one row, odd row counts (tile remainders), 33 rows, many blocks, batch 1..>4
SHAPES = [(1, 256, 1), (7, 512, 3), (37, 768, 5), (33, 256, 7), (64, 1536, 1), (130, 256, 16), (5, 2048, 2),
          (19, 256, 9)]
# Offsets and ranges of each random-byte type's fp16 fields (the others are quantized by gguf-py).
F16_FIELDS = {
    T.Q2_K: [(80, 1e-4, 1e-2), (82, 1e-4, 1e-2)],  # d, dmin
    T.Q3_K: [(108, -1e-2, 1e-2)],
    T.Q4_K: [(0, 1e-4, 1e-2), (2, 1e-4, 1e-2)],
    T.Q5_K: [(0, 1e-4, 1e-2), (2, 1e-4, 1e-2)],
    T.Q6_K: [(208, -1e-2, 1e-2)],
    T.IQ4_NL: [(0, -1e-2, 1e-2)],
    T.IQ4_XS: [(0, -1e-2, 1e-2)],
}


def random_blocks(qtype: T, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) uint8 of valid blocks: gguf's quantizer where it has one, else random
    bytes with finite fp16 scales."""
    if qtype not in F16_FIELDS:
        x = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 2.0, (rows, 1)).astype(np.float32)
        return gguf_quantize(x, qtype).reshape(rows, -1)
    qt = quant_type(qtype)
    blocks = rng.integers(0, 256, (rows * k // qt.block_size, qt.type_size), dtype=np.uint8)
    for offset, lo, hi in F16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(lo, hi, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def int8_reference(x: np.ndarray, parts: list[BlockPart]) -> np.ndarray:
    """What the quantized-dot kernels compute, in float64 numpy: the activations quantized
    exactly as the kernels do (per 32 or 256 weights: activation_block), times the dequantized
    weights."""
    n, k = x.shape
    q, d, _, _ = quantize_activations(x, activation_block([p.qtype for p in parts]))
    xq = (q.reshape(n, -1, 32).astype(np.float64) * d[..., None]).reshape(n, k)
    return np.concatenate([xq @ dequantize(p.blocks, p.qtype, (p.rows, k)).astype(np.float64).T for p in parts], axis=1)


def _close(got: np.ndarray, want: np.ndarray, rtol: float, scale: float | None = None) -> None:
    """max |got - want| within rtol of `scale` (default: the largest |want|)."""
    scale = (np.abs(want).max() if scale is None else scale) + 1e-30
    err = np.abs(got - want).max() / scale
    assert err < rtol, f"max error {err:.2e} of the scale (limit {rtol:.0e})"


def _float_close(got: np.ndarray, x: np.ndarray, w: np.ndarray, rtol: float) -> None:
    """Against x @ w.T, relative to sum |x_i w_i| (outputs can cancel to near zero)."""
    _close(got, x @ w.T, rtol, scale=(np.abs(x) @ np.abs(w).T).max())


@needs_ext
@pytest.mark.parametrize("per", [32, 256])
def test_activation_quantization_matches_numpy_reference(per):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32) * 3
    x[2, :per] = 0.0  # an all-zero scale block: scale 0, no division
    x[3, 40] = 1e4  # an outlier dominating its block
    q = np.empty((6, 512), np.int8)
    d, s = np.empty((6, 16), np.float32), np.empty((6, 16), np.float32)
    isum = np.empty((6, 16), np.int32)
    ops.quantize_act(x, q, d, s, isum, 2, per)
    rq, rd, rs, ri = quantize_activations(x, per)
    if per > 32:  # one scale a scale block, repeated for each of its 32-blocks
        assert (d.reshape(6, -1, per // 32) == d.reshape(6, -1, per // 32)[..., :1]).all()
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(isum, ri)


def test_activation_block_is_256_with_any_super_block_part():
    assert activation_block([T.Q4_0, T.Q8_0]) == 32
    assert activation_block([T.Q4_K]) == activation_block([T.Q8_0, T.Q6_K]) == activation_block([T.IQ4_XS]) == 256


@needs_ext
def test_quantize_act_refuses_another_scale_block():
    x = np.ones((1, 256), np.float32)
    q, d = np.empty((1, 256), np.int8), np.empty((1, 8), np.float32)
    with pytest.raises(ValueError, match="32 or 256"):
        ops.quantize_act(x, q, d, d.copy(), np.empty((1, 8), np.int32), 1, 64)


@needs_ext
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    rng = np.random.default_rng(2)
    qm = QuantizedMatmul("avx2", kernel_settings())
    for rows, k, _ in SHAPES:
        blocks = random_blocks(qtype, rows, k, rng)
        w = qm.handle([BlockPart(blocks, qtype, rows)], k)
        out = np.empty((rows, k), np.float32)
        qm.dequantize_rows(w, 0, rows, out)
        np.testing.assert_array_equal(out, dequantize(blocks, qtype, (rows, k)))


@pytest.fixture(params=["avx2", "vnni"])
def isa(request):
    """The int8 kernels on AVX2, then on AVX512-VNNI where this CPU has it (the default there)."""
    if not ops.use_vnni(request.param == "vnni") and request.param == "vnni":
        pytest.skip("this CPU lacks AVX512-VNNI")
    yield request.param
    ops.use_vnni(True)


@needs_ext
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantized_dot_matches_dequantize_then_matmul(qtype, isa):
    rng = np.random.default_rng(3)
    qm = QuantizedMatmul("avx2", INT8_ALWAYS)  # always the int8 kernels
    for rows, k, n in SHAPES:
        blocks = random_blocks(qtype, rows, k, rng)
        part = BlockPart(blocks, qtype, rows)
        x = rng.standard_normal((n, k)).astype(np.float32)
        got = qm.linear(x, qm.handle([part], k))
        assert got.shape == (n, rows) and got.dtype == np.float32
        # exact up to float32 summation order against the same quantized activations
        _close(got, int8_reference(x, [part]), 1e-5)
        # and within the int8 activation error of the float product
        _float_close(got, x, dequantize(blocks, qtype, (rows, k)), 5e-3)


@needs_ext
def test_fused_parts_of_mixed_types():
    """q/k/v-style fusion: parts of different types stacked along the output axis."""
    rng = np.random.default_rng(4)
    k = 512
    parts = [BlockPart(random_blocks(t, r, k, rng), t, r)
             for t, r in [(T.Q4_K, 33), (T.Q6_K, 16), (T.Q4_1, 5), (T.Q8_0, 17), (T.Q4_0, 1)]]
    qm = QuantizedMatmul("avx2", INT8_ALWAYS)
    w = qm.handle(parts, k)
    dense = np.concatenate([dequantize(p.blocks, p.qtype, (p.rows, k)) for p in parts])
    for n in (1, 4, 6):
        x = rng.standard_normal((n, k)).astype(np.float32)
        got = qm.linear(x, w)
        _close(got, int8_reference(x, parts), 1e-5)
        _float_close(got, x, dense, 5e-3)
    # the GEMM path dequantizes across part boundaries (tiles never align with parts)
    qm.configure(kernel_settings(gemm_rows_x8=1))
    x = rng.standard_normal((3, k)).astype(np.float32)
    _float_close(qm.linear(x, w), x, dense, 1e-6)


@needs_ext
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_vnni_and_avx2_kernels_give_the_same_bits(qtype):
    """Both instruction sets compute the same integer dot products exactly, then the same float
    operations: the results do not depend on which one the CPU has."""
    if not ops.use_vnni(True):
        pytest.skip("this CPU lacks AVX512-VNNI")
    rng = np.random.default_rng(15)
    qm = QuantizedMatmul("avx2", INT8_ALWAYS)
    w = qm.handle([BlockPart(random_blocks(qtype, 37, 768, rng), qtype, 37)], 768)
    x = rng.standard_normal((29, 768)).astype(np.float32)  # VNNI tiles of 8, 4 and 1 rows; AVX2 of 4 and 1
    try:
        vnni = qm.linear(x, w)
        ops.use_vnni(False)
        np.testing.assert_array_equal(qm.linear(x, w), vnni)
    finally:
        ops.use_vnni(True)


def _batch_matches_reference_and_rows_alone(qtype, rows, k, n, check_rows, seed):
    """n activation rows against a random (rows, k) matrix of qtype: all within the reference's
    tolerance, and each of check_rows the same bits as that row multiplied alone."""
    rng = np.random.default_rng(seed)
    qm = QuantizedMatmul("avx2", INT8_ALWAYS)
    part = BlockPart(random_blocks(qtype, rows, k, rng), qtype, rows)
    w = qm.handle([part], k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = qm.linear(x, w)
    _close(got, int8_reference(x, [part]), 1e-5)
    for i in check_rows:
        np.testing.assert_array_equal(qm.linear(x[i:i + 1], w)[0], got[i])


@needs_ext
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_prompt_sized_batches_span_several_activation_chunks(qtype):
    """A prefill-sized batch is taken in chunks of activation rows (256 KB of int8 each: 128 rows
    at k = 2048); every row still matches the reference and its own one-row result."""
    _batch_matches_reference_and_rows_alone(qtype, 21, 2048, 301, (0, 127, 128, 255, 300), seed=16)


@needs_ext
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prepared_groups_give_the_bits_of_per_tile_unpacking(qtype):
    """From 16 activation rows a chunk on (X8_PREP_ROWS), the AVX2 kernels unpack each weight group
    once into a thread's scratch and every tile reads it there; a row alone is unpacked tile by
    tile. 19 rows: tiles of 4 (four) and 3 over the prepared groups, each row the same bits alone,
    and all within the reference's tolerance (k = 768: three super-blocks, 24 blocks)."""
    _batch_matches_reference_and_rows_alone(qtype, 37, 768, 19, range(19), seed=21)


@needs_ext
def test_thread_count_does_not_change_results():
    """Each output is computed by exactly one thread: results are bit-identical at any count."""
    rng = np.random.default_rng(5)
    part = BlockPart(random_blocks(T.Q4_1, 300, 1536, rng), T.Q4_1, 300)
    x = rng.standard_normal((3, 1536)).astype(np.float32)
    outs = []
    for threads in (1, 2, 5):
        qm = QuantizedMatmul("avx2", kernel_settings(threads=threads))
        outs.append([qm.linear(x, qm.handle([part], 1536)) for _ in range(20)])
    for run in outs[1:]:
        for a, b in zip(outs[0], run):
            np.testing.assert_array_equal(a, b)


@needs_ext
def test_int8_rows_do_not_depend_on_batch_mates():
    """A row's result is the same bits alone or in any batch (the plan's batch_invariant mode
    relies on it), and batch_invariant keeps even large batches off OpenBLAS."""
    rng = np.random.default_rng(14)
    qm = QuantizedMatmul("avx2", kernel_settings(gemm_rows_x8=2))
    for qtype in (T.Q4_1, T.Q6_K):
        w = qm.handle([BlockPart(random_blocks(qtype, 40, 512, rng), qtype, 40)], 512)
        x = rng.standard_normal((7, 512)).astype(np.float32)
        assert qm.path(7, w) == "dequant_gemm" and qm.path(7, w, batch_invariant=True) == "quantized_dot"
        batch = qm.linear(x, w, batch_invariant=True)
        for i in range(len(x)):
            np.testing.assert_array_equal(qm.linear(x[i:i + 1], w, batch_invariant=True)[0], batch[i])


@pytest.mark.parametrize("kernels", ["auto", "numpy"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm_path_and_fallback_match_float_matmul(kernels, qtype):
    """Batches at the GEMM threshold, and every batch on the numpy fallback, use float
    activations: dequantize-then-matmul up to float32 rounding."""
    if kernels == "auto" and ops is None:
        pytest.skip("no extension")
    rng = np.random.default_rng(6)
    qm = QuantizedMatmul(kernels, kernel_settings(gemm_rows_x8=4))
    for rows, k, n in SHAPES:
        blocks = random_blocks(qtype, rows, k, rng)
        x = rng.standard_normal((max(n, 4) if kernels == "auto" else n, k)).astype(np.float32)
        w = qm.handle([BlockPart(blocks, qtype, rows)], k)
        assert qm.path(len(x), w) == "dequant_gemm"
        got = qm.linear(x, w)
        _float_close(got, x, dequantize(blocks, qtype, (rows, k)), 1e-6)


def test_gemm_tiles_cover_a_large_matrix(monkeypatch):
    monkeypatch.setattr(qz, "GEMM_TILE_WEIGHTS", 3 * 256)  # 3-row tiles over 10 rows in 2 parts
    rng = np.random.default_rng(7)
    parts = [BlockPart(random_blocks(T.Q8_0, r, 256, rng), T.Q8_0, r) for r in (4, 6)]
    qm = QuantizedMatmul("numpy", kernel_settings())
    x = rng.standard_normal((2, 256)).astype(np.float32)
    dense = np.concatenate([dequantize(p.blocks, p.qtype, (p.rows, 256)) for p in parts])
    _float_close(qm.linear(x, qm.handle(parts, 256)), x, dense, 1e-6)


def test_path_rule_is_declared():
    rng = np.random.default_rng(13)
    legacy = BlockPart(random_blocks(T.Q4_1, 8, 64, rng), T.Q4_1, 8)
    kquant = BlockPart(random_blocks(T.Q6_K, 8, 256, rng), T.Q6_K, 8)
    qm = QuantizedMatmul("numpy", kernel_settings())
    assert qm.path(1, qm.handle([legacy], 64)) == "dequant_gemm"  # no kernels: always GEMM
    if ops is not None:
        qm = QuantizedMatmul("avx2", kernel_settings())  # the measured defaults
        x8, kx8 = qm.handle([legacy], 64), qm.handle([kquant], 256)
        assert (x8.layout, kx8.layout) == ("x8", "x8")  # every block type is repacked for the kernels
        assert DEFAULT_EXECUTION.gemm_rows_x8 == 0  # never dequantize-into-GEMM
        assert [qm.path(n, w) for n in (1, 512) for w in (x8, kx8)] == ["quantized_dot"] * 4
        qm.configure(kernel_settings(gemm_rows_x8=8))  # a plan's rule applies to every weight
        assert [qm.path(n, w) for n in (7, 8) for w in (x8, kx8)] == ["quantized_dot"] * 2 + ["dequant_gemm"] * 2
    be = CpuBackend(kernel_settings(gemm_rows_x8=3))
    assert be.settings.gemm_rows_x8 == 3
    be.configure(kernel_settings())  # live, as a new plan version's execution section
    assert be.settings == DEFAULT_EXECUTION.kernels
    with pytest.raises(InvalidArgument):
        QuantizedMatmul("sse9", kernel_settings())
    with pytest.raises(InvalidArgument, match="gemm_rows_x8 -1 must be"):
        kernel_settings(gemm_rows_x8=-1)


@needs_ext
def test_quantize_q8_0_matches_gguf():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 320)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 5] = -50.0
    np.testing.assert_array_equal(qz.quantize_q8_0(x), gguf_quantize(x, T.Q8_0).reshape(9, -1))


@needs_ext
def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(9)
    blocks = random_blocks(T.Q4_K, 4, 256, rng)
    with pytest.raises(ValueError, match="no kernel"):
        ops.matrix([(blocks, 1, 4, True)], 256)  # F16: not a block type
    with pytest.raises(ValueError, match="no kernel"):  # every block type only in the x8 layout
        ops.matrix([(blocks, int(T.Q4_K), 4)], 256)
    with pytest.raises(ValueError, match="bytes"):
        ops.matrix([(blocks[:3], int(T.Q4_K), 4, True)], 256)
    m = QuantizedMatmul("avx2", kernel_settings()).handle([BlockPart(blocks, T.Q4_K, 4)], 256).matrix
    with pytest.raises(ValueError, match="do not fit"):
        ops.matmul(np.zeros((1, 32), np.float32), m, np.zeros((1, 4), np.float32), 1)
    with pytest.raises(TypeError):
        ops.matmul(np.zeros((1, 256), np.float64), m, np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError):
        ops.dequantize(m, 0, 5, np.zeros(5 * 256, np.float32), 1)
    with pytest.raises(ValueError, match="outside"):
        ops.dequantize_ids(m, np.array([4]), np.zeros((1, 256), np.float32))


@needs_ext
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_x8_layout_round_trips_and_pads(qtype):
    """Repacking interleaves whole blocks of 8 rows; a partial last group is zero-padded and
    every row reads back (by range and by index) exactly as the file's blocks dequantize."""
    rng = np.random.default_rng(12)
    qm = QuantizedMatmul("avx2", kernel_settings())
    qm.REPACK_ROWS = 16  # several repack chunks per tensor
    for rows in (8, 13, 1, 37):
        blocks = random_blocks(qtype, rows, 96, rng)
        w = qm.handle([BlockPart(blocks, qtype, rows)], 96)
        part = w.parts[0]
        assert part.layout == "x8" and part.blocks.nbytes == -(-rows // 8) * 8 * blocks.shape[1]
        want = dequantize(blocks, qtype, (rows, 96))
        got = np.empty((rows, 96), np.float32)
        qm.dequantize_rows(w, 0, rows, got)
        np.testing.assert_array_equal(got, want)
        ids = rng.integers(0, rows, 5)
        by_id = np.empty((5, 96), np.float32)
        ops.dequantize_ids(w.matrix, ids, by_id)
        np.testing.assert_array_equal(by_id, want[ids])


# --- decoder-layer ops: C against the numpy code -------------------------------------

@needs_ext
def test_c_layer_ops_match_numpy():
    rng = np.random.default_rng(10)
    c, py = CpuBackend(kernel_settings()), CpuBackend(kernel_settings(), kernels="numpy")
    x = rng.standard_normal((5, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    np.testing.assert_allclose(c.rms_norm(x, w, 1e-5), py.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    gate_up = rng.standard_normal((3, 1000)).astype(np.float32) * 6
    np.testing.assert_allclose(c.silu_mul(gate_up), py.silu_mul(gate_up), rtol=1e-5, atol=1e-6)
    qkv = rng.standard_normal((4, 960)).astype(np.float32)
    positions = np.array([0, 1, 100, 4000])
    for style, rope_dim in [("interleaved", 64), ("neox", 64), ("neox", 32), ("interleaved", 40)]:
        for b in (c, py):
            b.configure_rope(rope_dim, 10000.0, style, 4096)
        q = qkv[:, :576].reshape(-1, 9, 64)  # a strided view, as the forward pass hands it
        np.testing.assert_allclose(c.rope(q, positions), py.rope(q, positions), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("n,t", [(1, 1), (1, 9), (1, 300), (3, 130), (17, 17), (200, 200), (5, 1100)])
def test_c_attention_matches_numpy(n, t):
    rng = np.random.default_rng(11)
    c, py = CpuBackend(kernel_settings()), CpuBackend(kernel_settings(), kernels="numpy")
    cache = rng.standard_normal((2, 3, 1200, 64)).astype(np.float32)  # (k|v, n_kv, capacity, hd)
    k, v = cache[0, :, :t], cache[1, :, :t]  # strided views, as the KV cache hands them
    q = rng.standard_normal((n, 9, 64)).astype(np.float32) * 2
    positions = np.arange(t - n, t)
    np.testing.assert_allclose(c.attention(q, k, v, positions), py.attention(q, k, v, positions),
                               rtol=1e-4, atol=2e-5)


@needs_ext
def test_c_decode_attention_matches_numpy_and_single_sequence():
    rng = np.random.default_rng(15)
    c, py = CpuBackend(kernel_settings()), CpuBackend(kernel_settings(), kernels="numpy")
    q = rng.standard_normal((5, 9, 64)).astype(np.float32)
    k, v = rng.standard_normal((2, 5, 3, 300, 64)).astype(np.float32)
    lengths = np.array([1, 7, 300, 130, 33])
    got = c.decode_attention(q, k, v, lengths)
    np.testing.assert_allclose(got, py.decode_attention(q, k, v, lengths), rtol=1e-4, atol=2e-5)
    for b, n in enumerate(lengths):  # grouped tasks here, one a head alone: the same bits
        alone = c.attention(q[b:b + 1], k[b, :, :n], v[b, :, :n], np.array([n - 1]))
        np.testing.assert_array_equal(alone[0], got[b])


@needs_ext
def test_c_paged_decode_attention_reads_blocks_in_place():
    """Through block tables (fragmented, out of order, padded): the same bits as each sequence
    attending alone over its gathered keys, and the numpy gather fallback within rounding."""
    rng = np.random.default_rng(16)
    c, py = CpuBackend(kernel_settings()), CpuBackend(kernel_settings(), kernels="numpy")
    n_kv, blocks, bs, hd = 3, 40, 16, 64
    k_pages, v_pages = rng.standard_normal((2, n_kv, blocks, bs, hd)).astype(np.float32)
    tables = [[7, 3, 30, 1], [0], [12, 13, 14, 15, 16, 17, 18, 19], [39, 2]]
    lengths = np.array([64, 5, 113, 17])
    table = np.zeros((4, 8), dtype=np.int64)
    for i, t in enumerate(tables):
        table[i, :len(t)] = t
    q = rng.standard_normal((4, 9, hd)).astype(np.float32)
    got = c.paged_decode_attention(q, k_pages, v_pages, table, lengths)
    np.testing.assert_allclose(got, py.paged_decode_attention(q, k_pages, v_pages, table, lengths),
                               rtol=1e-4, atol=2e-5)
    for b, n in enumerate(lengths):
        k = k_pages[:, tables[b]].reshape(n_kv, -1, hd)[:, :n]
        v = v_pages[:, tables[b]].reshape(n_kv, -1, hd)[:, :n]
        np.testing.assert_array_equal(c.attention(q[b:b + 1], k, v, np.array([n - 1]))[0], got[b])


@needs_ext
def test_c_paged_decode_attention_refuses_bad_tables():
    c = CpuBackend(kernel_settings())
    k_pages = np.zeros((3, 4, 16, 64), dtype=np.float32)
    q = np.zeros((1, 9, 64), dtype=np.float32)
    out = np.empty((1, 9 * 64), dtype=np.float32)
    ops = c._ops
    with pytest.raises(ValueError, match="outside"):  # a block the arena does not have
        ops.decode_attention(q, k_pages, k_pages, np.array([1]), out, 1, np.array([[4]], dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):  # a length past the table's blocks
        ops.decode_attention(q, k_pages, k_pages, np.array([17]), out, 1, np.array([[0]], dtype=np.int64))
    with pytest.raises(ValueError, match="table"):
        ops.decode_attention(q, k_pages, k_pages, np.array([1]), out, 1, np.array([0], dtype=np.int64))
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.decode_attention(q, k_pages[:, :, :12].copy(), k_pages[:, :, :12].copy(), np.array([1]), out, 1,
                             np.array([[0]], dtype=np.int64))


@needs_ext
@pytest.mark.parametrize("d", [1, 7, 8, 1025, 49152])
def test_c_logsumexp_matches_numpy(d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((3, d)) * 6).astype(np.float32)
    if d > 1:
        x[1, -1] = -np.inf  # a masked token counts for nothing
    c, py = CpuBackend(kernel_settings()), CpuBackend(kernel_settings(), kernels="numpy")
    np.testing.assert_allclose(c.logsumexp(x), py.logsumexp(x), rtol=1e-7, atol=1e-6)
    np.testing.assert_array_equal(c.logsumexp(x[1:2]), c.logsumexp(x)[1:2])  # a row's value is its own


# --- the float32 kernel (ops_avx2/fmatmul.c) ---------------------------------------------

def _f32_weight(rng: np.random.Generator, k: int, n: int, layout: str) -> np.ndarray:
    """A (k, n) float32 weight: "nk" the W.T view of a row-major (n, k) W (the backend's resident
    layout, the tied head's E.T), "kn" a row-major (k, n) array."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w.T if layout == "nk" else np.ascontiguousarray(w.T)


def _matmul_f32(x: np.ndarray, w: np.ndarray, threads: int = 2) -> np.ndarray:
    out = np.full((x.shape[0], w.shape[1]), np.nan, np.float32)
    ops.matmul_f32(x, w, out, threads)
    return out


# (m, k, n): 1 row, rows past a 6-row group (3, 17, 33), k and n off every vector width, the
# model's shapes (576 -> 960, 1536 -> 576)
F32_SHAPES = [(1, 576, 960), (3, 37, 19), (17, 100, 333), (33, 131, 70), (33, 1536, 577), (7, 8, 8), (2, 1, 5),
              (5, 0, 3)]


@needs_ext
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("m,k,n", F32_SHAPES)
def test_f32_kernel_matches_numpy(layout, m, k, n):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = _f32_weight(rng, k, n, layout)
    got = _matmul_f32(x, w)
    want = x.astype(np.float64) @ w.astype(np.float64)
    # float32 sums in another order than numpy's: relative to sum |x_i w_i|
    _close(got, want, 2e-6, scale=(np.abs(x) @ np.abs(w)).max() if k else 1.0)
    np.testing.assert_array_equal(_matmul_f32(x, w, threads=1), got)  # each output on one thread


@needs_ext
def test_f32_kernel_reads_the_tied_head_in_place():
    """The tied head: x @ E.T over the (vocab, dim) table, a transposed view, also one whose
    rows are a slice of wider rows (row stride > k)."""
    rng = np.random.default_rng(21)
    table = rng.standard_normal((1003, 600)).astype(np.float32)
    for e in (table[:, :576], table[:, 3:579]):
        x = rng.standard_normal((9, 576)).astype(np.float32)
        _close(_matmul_f32(x, e.T), x.astype(np.float64) @ e.T.astype(np.float64), 2e-6,
               scale=(np.abs(x) @ np.abs(e).T).max())


@needs_ext
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_f32_kernel_rows_do_not_depend_on_batch_mates(layout):
    """Bit-exact batch invariance: a row alone, in a batch of any size, at any offset in it."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    w = _f32_weight(rng, 300, 203, layout)
    batch = _matmul_f32(x, w)
    for i in range(len(x)):
        np.testing.assert_array_equal(_matmul_f32(x[i:i + 1], w, threads=1)[0], batch[i])
    for lo, hi in ((0, 7), (5, 38), (13, 14), (2, 35)):
        np.testing.assert_array_equal(_matmul_f32(x[lo:hi], w), batch[lo:hi])


@needs_ext
def test_f32_kernel_refuses_bad_inputs():
    x, w, out = np.zeros((2, 8), np.float32), np.zeros((8, 3), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError):
        ops.matmul_f32(x.astype(np.float64), w, out, 1)
    with pytest.raises(TypeError, match="contiguous rows"):  # neither axis contiguous
        ops.matmul_f32(x, np.zeros((16, 6), np.float32)[::2, ::2], out, 1)
    with pytest.raises(TypeError, match="contiguous rows"):  # a negative stride
        ops.matmul_f32(x, w[::-1], out, 1)
    with pytest.raises(TypeError):
        ops.matmul_f32(x, np.zeros((1, 8, 3), np.float32), out, 1)
    with pytest.raises(ValueError, match="does not fit"):
        ops.matmul_f32(x, np.zeros((7, 3), np.float32), out, 1)
    with pytest.raises(ValueError, match="does not fit"):
        ops.matmul_f32(x, w, np.zeros((3, 3), np.float32), 1)
    with pytest.raises(ValueError, match="overlaps"):
        buf = np.zeros((2, 8), np.float32)
        ops.matmul_f32(buf, np.zeros((8, 3), np.float32), buf[:, :3], 1)
    with pytest.raises(ValueError, match="read-only"):
        ops.matmul_f32(x, w, np.broadcast_to(out, (2, 3)), 1)


@needs_ext
def test_backend_f32_linear_takes_the_kernel_by_rule():
    """f32 weights are held as the W.T view of the file's (out, in) rows; batches up to
    f32_kernel_rows (and every batch when batch-invariant) run the kernel, larger ones OpenBLAS;
    the numpy fallback and both paths agree within rounding."""
    rng = np.random.default_rng(23)
    parts = [rng.standard_normal((n, 96)).astype(np.float32) for n in (40, 24)]
    be = CpuBackend(kernel_settings(f32_kernel_rows=8))
    w = be.load_linear([TensorData(p, T.F32, p.shape) for p in parts], "f32")
    assert w.shape == (96, 64) and w.base is not None and w.T.flags.c_contiguous
    dense = np.concatenate(parts)
    x = rng.standard_normal((20, 96)).astype(np.float32)
    np.testing.assert_array_equal(be.linear(x[:8], w), _matmul_f32(x[:8], w))
    _float_close(be.linear(x, w), x, dense, 1e-6)  # OpenBLAS past the rule
    be.batch_invariant = True
    batch = be.linear(x, w)
    np.testing.assert_array_equal(batch, _matmul_f32(x, w))
    for i in range(len(x)):
        np.testing.assert_array_equal(be.linear(x[i:i + 1], w)[0], batch[i])
    fallback = CpuBackend(kernel_settings(), kernels="numpy")
    fallback.batch_invariant = True
    _float_close(fallback.linear(x, fallback.load_linear([TensorData(p, T.F32, p.shape) for p in parts], "f32")),
                 x, dense, 1e-6)
    with pytest.raises(InvalidArgument, match="f32_kernel_rows"):
        kernel_settings(f32_kernel_rows=-1)
