"""Dequantizers agree bit-for-bit with gguf-py and validate their inputs."""

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from backends import quants
from backends.quants import (
    QUANT_TYPES,
    UnsupportedTensorType,
    dequantize,
    quant_type,
    row_bytes,
)

# Byte offsets of the f16 fields (d, m, dmin) inside one block of each type.
F16_FIELDS = {
    T.F16: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
}

ALL_TYPES = list(QUANT_TYPES)


def random_tensor(t: T, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random (rows, row_bytes) uint8 tensor whose float fields are all finite.

    Every bit of every packed field is random; f16 fields are random bit
    patterns with an all-ones exponent (inf/NaN) knocked down to the largest
    finite one, so subnormals and extremes are still covered.
    """
    qt = QUANT_TYPES[t]
    rng = np.random.default_rng([seed, int(t)])
    blocks = rng.integers(0, 256, (rows * blocks_per_row, qt.type_size), dtype=np.uint8)
    if t == T.F32:
        blocks[:] = rng.standard_normal(len(blocks), dtype=np.float32).view(np.uint8).reshape(-1, 4)
    for offset in F16_FIELDS.get(t, []):
        bits = rng.integers(0, 1 << 16, len(blocks), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] ^= 0x0400
        blocks[:, offset : offset + 2] = bits.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, t: T) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, t), dtype=np.float32)


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    mismatches = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert mismatches.size == 0, (
        f"{mismatches.size} mismatches, first at flat index {mismatches[0]}: "
        f"{ours.flat[mismatches[0]]!r} vs {ref.flat[mismatches[0]]!r}"
    )


def test_table_matches_gguf_sizes():
    for t, qt in QUANT_TYPES.items():
        assert qt.name == t.name
        assert (qt.block_size, qt.type_size) == gguf.GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_bit_exact_against_gguf_py(t):
    qt = QUANT_TYPES[t]
    blocks_per_row = max(1, 512 // qt.block_size)
    raw = random_tensor(t, rows=64, blocks_per_row=blocks_per_row)
    shape = (64, blocks_per_row * qt.block_size)
    assert_bit_equal(dequantize(raw, t, shape), reference(raw, t))


def test_bf16_nan_and_inf_bits_pass_through():
    # BF16 widening is a pure bit shift, so even NaN payloads survive.
    bits = np.array([0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8000, 0x3F80], dtype=np.uint16)
    out = dequantize(bits, T.BF16, (6,))
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (1, 7), (300, 1)])
def test_awkward_shapes(t, rows, blocks_per_row):
    raw = random_tensor(t, rows, blocks_per_row, seed=1)
    shape = (rows, blocks_per_row * QUANT_TYPES[t].block_size)
    ours = dequantize(raw.reshape(-1), t, shape)  # flat uint8 input
    assert_bit_equal(ours, reference(raw, t))


def test_reader_style_typed_inputs():
    # GGUFReader hands F32/F16 tensors over as float arrays, not bytes.
    x = np.random.default_rng(2).standard_normal((3, 4, 8), dtype=np.float32)
    assert np.array_equal(dequantize(x, T.F32, x.shape), x)
    assert np.array_equal(dequantize(x.astype(np.float16), T.F16, x.shape), x.astype(np.float16))
    # Three-axis shape for a block type: only the last axis is the row.
    raw = random_tensor(T.Q8_0, rows=6, blocks_per_row=2, seed=3)
    ours = dequantize(raw, T.Q8_0, (2, 3, 64))
    assert_bit_equal(ours, reference(raw, T.Q8_0).reshape(2, 3, 64))


def test_result_is_fresh_writable_copy():
    x = np.arange(8, dtype=np.float32)
    out = dequantize(x, T.F32, (2, 4))
    assert not np.shares_memory(out, x)
    assert out.flags.writeable and out.flags.c_contiguous


def test_chunk_boundaries(monkeypatch):
    # Force many chunks with a ragged tail; chunking must not change results.
    monkeypatch.setattr(quants, "_CHUNK_WEIGHTS", 5 * 256)
    for t in (T.Q4_1, T.Q6_K, T.F16):
        raw = random_tensor(t, rows=13, blocks_per_row=3, seed=4)
        shape = (13, 3 * QUANT_TYPES[t].block_size)
        assert_bit_equal(dequantize(raw, t, shape), reference(raw, t))


def test_known_q4_1_block():
    # d = 0.5, m = -1.0; weight j is the low nibble of qs[j], j+16 the high one.
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2:4] = np.array([-1.0], dtype=np.float16).view(np.uint8)
    block[4:20] = np.arange(16, dtype=np.uint8) | (15 - np.arange(16, dtype=np.uint8)) << 4
    expected = 0.5 * np.concatenate([np.arange(16), 15 - np.arange(16)]) - 1.0
    assert np.array_equal(dequantize(block, T.Q4_1, (32,)), expected.astype(np.float32))


def test_byte_count_mismatch_raises():
    raw = random_tensor(T.Q4_0, rows=2, blocks_per_row=2)
    with pytest.raises(ValueError, match="needs 72 bytes, got 71"):
        dequantize(raw.reshape(-1)[:-1], T.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="needs 36 bytes, got 72"):
        dequantize(raw, T.Q4_0, (1, 64))
    with pytest.raises(ValueError, match="32-weight blocks"):
        dequantize(raw, T.Q4_0, (4, 36))
    with pytest.raises(ValueError, match="needs 32 bytes, got 16"):
        dequantize(np.zeros(4, np.float32), T.F32, (8,))


@pytest.mark.parametrize("t", [T.IQ2_XXS, int(T.IQ2_XXS)])
def test_unsupported_type_is_named(t):
    with pytest.raises(UnsupportedTensorType, match=r"IQ2_XXS is not supported \(supported: F32, F16"):
        dequantize(np.zeros(66, np.uint8), t, (256,))
    with pytest.raises(ValueError):  # UnsupportedTensorType is a ValueError
        quant_type(t)


def test_unknown_type_id_raises():
    with pytest.raises(UnsupportedTensorType, match="tensor type 9999 is not supported"):
        quant_type(9999)


def test_quant_type_accepts_int_ids():
    assert quant_type(int(T.Q8_0)) is QUANT_TYPES[T.Q8_0]


def test_row_bytes():
    assert row_bytes(T.F32, 576) == 2304
    assert row_bytes(T.F16, 576) == 1152
    assert row_bytes(T.Q4_1, 576) == 18 * 20
    assert row_bytes(T.Q8_0, 576) == 18 * 34
    assert row_bytes(int(T.Q6_K), 1536) == 6 * 210
    assert row_bytes(T.Q4_K, 0) == 0
    with pytest.raises(ValueError, match="Q4_K row of 576 weights"):
        row_bytes(T.Q4_K, 576)
    assert row_bytes(T.IQ4_NL, 64) == 2 * 18
    assert row_bytes(T.IQ4_XS, 512) == 2 * 136
    with pytest.raises(UnsupportedTensorType):
        row_bytes(T.IQ2_XXS, 256)
