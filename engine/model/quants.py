"""GGML tensor types: block geometry and vectorised numpy dequantizers.

Every supported type lives in one table, ``QUANT_TYPES``, mapping a
``gguf.GGMLQuantizationType`` to a ``QuantType`` record.  A quantized tensor
row is a run of fixed-size *blocks*: ``block_size`` weights stored in
``type_size`` bytes.  Each dequantizer takes an ``(n_blocks, type_size)``
uint8 array and returns ``(n_blocks, block_size)`` float32, carving the block
fields out with slicing and ``.view`` and never looping over blocks in Python.

All multi-byte fields are little-endian.  The arithmetic follows llama.cpp's
reference ``dequantize_row_*`` functions operation for operation (same float32
products, in the same order), so results are bit-identical to gguf-py's
``gguf.quants.dequantize``; ``tests/test_quants.py`` checks this per type.
The one caveat is the ``x * d + m`` of Q4_1/Q5_1/K-quants: a C compiler may
fuse it into an FMA, numpy never does, and we (like gguf-py) follow the
unfused ISO C semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from engine.errors import ModelFormatError, UnsupportedModel

__all__ = [
    "QUANT_TYPES",
    "QuantType",
    "UnsupportedTensorType",
    "dequantize",
    "quant_type",
    "row_bytes",
]

QK_K = 256  # weights per K-quant super-block

# Large tensors are dequantized this many weights at a time so the uint8 and
# float32 temporaries of each step stay cache-sized instead of tensor-sized.
_CHUNK_WEIGHTS = 1 << 18


class UnsupportedTensorType(UnsupportedModel):
    """A tensor's GGML type has no dequantizer here."""


@dataclass(frozen=True)
class QuantType:
    """Geometry and decoder of one GGML tensor type.

    ``dequantize`` maps ``(n_blocks, type_size)`` uint8 blocks to
    ``(n_blocks, block_size)`` float32 weights.
    """

    name: str
    block_size: int
    type_size: int
    dequantize: Callable[[np.ndarray], np.ndarray]


# --- field helpers ---------------------------------------------------------

_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
_BIT_SHIFTS = np.arange(8, dtype=np.uint8).reshape(8, 1)


def _f16(field: np.ndarray) -> np.ndarray:
    """(n, 2k) uint8 little-endian halves -> (n, k) float32."""
    return field.view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., m) uint8 -> (..., 2, m): low nibbles first, then high nibbles."""
    out = np.empty(packed.shape[:-1] + (2, packed.shape[-1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0, :])
    np.right_shift(packed, 4, out=out[..., 1, :])
    return out


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """(..., m) uint8 -> (..., 4, m): 2-bit fields at shifts 0, 2, 4, 6."""
    return (packed[..., None, :] >> _CRUMB_SHIFTS) & 3


def _bit_planes(packed: np.ndarray) -> np.ndarray:
    """(..., m) uint8 -> (..., 8, m): plane s holds bit s of every byte."""
    return (packed[..., None, :] >> _BIT_SHIFTS) & 1


# --- plain floats ----------------------------------------------------------
# F32:  1 weight in 4 bytes.   F16 / BF16:  1 weight in 2 bytes.
# BF16 is the top half of an f32, so widening is a 16-bit shift.


def _dequant_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def _dequant_f16(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks)


def _dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- legacy 32-weight blocks -----------------------------------------------
# The 4-bit payload qs[16] holds weight j in the low nibble of qs[j] and
# weight j+16 in the high nibble:
#
#     qs[j] = [ w(j+16) : 4 | w(j) : 4 ]          j = 0..15
#
# Q5 adds qh, a little-endian u32 whose bit j is the 5th bit of weight j.
#
# Q4_0:  32 weights in 2 (d f16) + 16 (nibbles)                      = 18 bytes
#        w = d * (q - 8)
# Q4_1:  32 weights in 2 (d f16) + 2 (m f16) + 16 (nibbles)          = 20 bytes
#        w = d * q + m
# Q5_0:  32 weights in 2 (d f16) + 4 (qh) + 16 (nibbles)             = 22 bytes
#        w = d * (q - 16)
# Q5_1:  32 weights in 2 (d f16) + 2 (m f16) + 4 (qh) + 16 (nibbles) = 24 bytes
#        w = d * q + m
# Q8_0:  32 weights in 2 (d f16) + 32 (int8)                         = 34 bytes
#        w = d * q


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh (n, 4), qs (n, 16) -> (n, 32) uint8 5-bit values."""
    q = _nibbles(qs).reshape(len(qs), 32)
    # Little-endian bit order turns the u32's bit j into column j.
    q |= np.unpackbits(qh, axis=1, bitorder="little") << 4
    return q


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 2:18]).reshape(len(blocks), 32).view(np.int8)
    q -= 8
    return q * d


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    out = _nibbles(blocks[:, 4:20]).reshape(len(blocks), 32) * d
    out += m
    return out


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:22]).view(np.int8)
    q -= 16
    return q * d


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    out = _q5_values(blocks[:, 4:8], blocks[:, 8:24]) * d
    out += m
    return out


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:34].view(np.int8) * _f16(blocks[:, 0:2])


# --- K-quants: 256-weight super-blocks --------------------------------------
# A super-block is split into sub-blocks that each get their own small integer
# scale (and for Q2_K/Q4_K/Q5_K a min), multiplied by the f16 super-scales d
# (and dmin).  Q2_K/Q3_K use 16 sub-blocks of 16 weights, Q4_K/Q5_K 8 of 32,
# Q6_K 16 of 16.  Weights are numbered w = 128*h + 32*j + l (half h = 0..1,
# group j = 0..3, lane l = 0..31).
#
# Q2_K:  256 weights in 16 (scales) + 64 (qs) + 2 (d f16) + 2 (dmin f16) = 84 bytes
#
#     scales[s] = [ min_s : 4 | scale_s : 4 ]      sub-block s = w // 16
#     qs[32*h + l] = [ q(j=3) : 2 | q(j=2) : 2 | q(j=1) : 2 | q(j=0) : 2 ]
#     w = (d * scale_s) * q - (dmin * min_s)


def _dequant_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    scales = blocks[:, 0:16]
    q = _crumbs(blocks[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16)
    d = _f16(blocks[:, 80:82])
    dmin = _f16(blocks[:, 82:84])
    out = q * (d * (scales & 0x0F))[..., None]
    out -= (dmin * (scales >> 4))[..., None]
    return out.reshape(n, QK_K)


# Q3_K:  256 weights in 32 (hmask) + 64 (qs) + 12 (scales) + 2 (d f16) = 110 bytes
#
#     qs: low 2 bits, packed exactly like Q2_K.
#     hmask[l] bit (4*h + j) = 3rd bit of weight 128*h + 32*j + l; it is
#     stored inverted: a clear bit subtracts 4, so q = low2 - (bit ? 0 : 4).
#     16 signed 6-bit scales (offset 32), sub-block s = w // 16:
#
#         byte  0..7  :  [ scale(s+8) low 4 | scale(s) low 4 ]       s = 0..7
#         byte  8..11 :  [ hi(s+12) | hi(s+8) | hi(s+4) | hi(s) ]    s = 0..3
#                        (2 bits each, scale(s) at the lowest pair)
#
#     w = (d * (scale_s - 32)) * q


def _dequant_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    hmask = _bit_planes(blocks[:, 0:32]).reshape(n, 2, 4, 32)
    q = _crumbs(blocks[:, 32:96].reshape(n, 2, 32))
    q |= hmask << 2
    q = q.view(np.int8)
    q -= 4  # low2 + 4*bit - 4  ==  low2 - (bit ? 0 : 4)

    packed = blocks[:, 96:108]
    scales = _nibbles(packed[:, 0:8]).reshape(n, 16)
    scales |= _crumbs(packed[:, 8:12]).reshape(n, 16) << 4
    scales = scales.view(np.int8)
    scales -= 32
    d = _f16(blocks[:, 108:110])

    out = q.reshape(n, 16, 16) * (d * scales)[..., None]
    return out.reshape(n, QK_K)


# Q4_K / Q5_K share a 12-byte block of eight 6-bit scales sc0..7 and eight
# 6-bit mins mn0..7 (sub-block s = w // 32):
#
#     byte  0..3 :  [ sc(s+4) hi 2 | sc(s) : 6 ]                     s = 0..3
#     byte  4..7 :  [ mn(s+4) hi 2 | mn(s) : 6 ]
#     byte  8..11:  [ mn(s+4) lo 4 | sc(s+4) lo 4 ]
#
# Q4_K:  256 weights in 2 (d f16) + 2 (dmin f16) + 12 (scales) + 128 (qs) = 144 bytes
#
#     qs[32*p + l] = [ q(sub-block 2p+1, lane l) : 4 | q(2p, l) : 4 ]    p = 0..3
#     w = (d * sc_s) * q - (dmin * mn_s)
#
# Q5_K:  256 weights in 2 (d) + 2 (dmin) + 12 (scales) + 32 (qh) + 128 (qs) = 176 bytes
#
#     qs as Q4_K; qh[l] bit s = 5th bit of sub-block s, lane l.


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed 6-bit scales/mins -> (scales, mins), each (n, 8) uint8."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales, mins


def _k_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Apply Q4_K/Q5_K super-block scales/mins to q of shape (n, 8, 32)."""
    n = len(blocks)
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    scales, mins = _k_scale_min(blocks[:, 4:16])
    out = q * (d * scales)[..., None]
    out -= (dmin * mins)[..., None]
    return out.reshape(n, QK_K)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    q = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32)
    return _k_affine(blocks, q)


def _dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    q = _nibbles(blocks[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    q |= _bit_planes(blocks[:, 16:48]) << 4
    return _k_affine(blocks, q)


# Q6_K:  256 weights in 128 (ql) + 64 (qh) + 16 (int8 scales) + 2 (d f16) = 210 bytes
#
#     Per half h: ql[64*h .. +64], qh[32*h .. +32].  Weight 128*h + 32*j + l:
#         low 4 bits:  ql[64*h + 32*(j % 2) + l], low nibble for j < 2, high for j >= 2
#         high 2 bits: qh[32*h + l] >> (2*j) & 3
#
#         ql[64h + l]      = [ q(j=2, l) : 4 | q(j=0, l) : 4 ]
#         ql[64h + 32 + l] = [ q(j=3, l) : 4 | q(j=1, l) : 4 ]
#         qh[32h + l]      = [ j=3 : 2 | j=2 : 2 | j=1 : 2 | j=0 : 2 ]
#
#     w = (d * scale_s) * (q - 32)       sub-block s = w // 16


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    # (n, h, nibble, j % 2, l) flattens to the weight order 128h + 32j + l.
    q = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    q |= _crumbs(blocks[:, 128:192].reshape(n, 2, 32)) << 4
    q = q.view(np.int8)
    q -= 32
    scales = blocks[:, 192:208].view(np.int8)
    d = _f16(blocks[:, 208:210])
    out = q.reshape(n, 16, 16) * (d * scales)[..., None]
    return out.reshape(n, QK_K)


# --- IQ4_NL, IQ4_XS: 4-bit indices into a non-linear table ------------------
#
# IQ4_NL, 32 weights in 18 bytes:
#     d: f16 | qs[16]: byte l = [ index(l + 16) : 4 | index(l) : 4 ]
#     w = d * KVALUES[index]
#
# IQ4_XS, 256 weights in 136 bytes (8 sub-blocks of 32):
#     d: f16 | scales_h: u16, 2 bits per sub-block s at bits 2s..2s+1
#     | scales_l[4]: byte s // 2 holds sub-block s's low 4 bits (even s low nibble)
#     | qs[128]: sub-block s's 16 bytes laid out as IQ4_NL's qs
#     w = (d * (scale_s - 32)) * KVALUES[index],  scale_s = scales_l(s) | scales_h(s) << 4

IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=np.int8)


def _dequant_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    idx = _nibbles(blocks[:, 2:18]).reshape(len(blocks), 32)  # low nibbles are weights 0..15
    return d * IQ4_KVALUES[idx].astype(np.float32)


def _dequant_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    d = _f16(blocks[:, 0:2])
    scales_h = blocks[:, 2:4].copy().view(np.uint16)  # (n, 1)
    low = _nibbles(blocks[:, 4:8]).transpose(0, 2, 1).reshape(n, 8)  # sub-block order 0..7
    high = ((scales_h >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)  # (n, 8)
    scales = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = (d * scales.astype(np.float32))[..., None]  # (n, 8, 1)
    idx = _nibbles(blocks[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl * IQ4_KVALUES[idx].astype(np.float32)).reshape(n, QK_K)


# --- exact widening to Q8_0 --------------------------------------------------
#
# A Q5_0 or IQ4_NL block is one f16 scale times 32 small integers (q - 16 in -16..15;
# IQ4_KVALUES in -127..113): a Q8_0 block with the same scale holds it exactly, and
# llama.cpp computes both as int8 dot products against Q8_0 activations, as it does Q8_0.

def _ints_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:22]).view(np.int8)
    q -= 16
    return q


def _ints_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    return IQ4_KVALUES[_nibbles(blocks[:, 2:18]).reshape(len(blocks), 32)]


EXACT_IN_Q8_0 = {T.Q5_0: _ints_q5_0, T.IQ4_NL: _ints_iq4_nl}


def widen_to_q8_0(blocks: np.ndarray, qtype: T) -> np.ndarray:
    """(rows, row_bytes) uint8 blocks of a type in EXACT_IN_Q8_0 -> the same weights as
    Q8_0 blocks (rows, k / 32 * 34), bit for bit (same scale, same integers)."""
    rows = len(blocks)
    flat = np.ascontiguousarray(blocks).reshape(-1, quant_type(qtype).type_size)
    out = np.empty((len(flat), 34), dtype=np.uint8)
    out[:, 0:2] = flat[:, 0:2]  # the f16 scale d
    out[:, 2:] = EXACT_IN_Q8_0[qtype](flat).view(np.uint8)
    return out.reshape(rows, -1)


# --- the table -------------------------------------------------------------

QUANT_TYPES: dict[T, QuantType] = {
    t: QuantType(t.name, block_size, type_size, fn)
    for t, block_size, type_size, fn in [
        (T.F32, 1, 4, _dequant_f32),
        (T.F16, 1, 2, _dequant_f16),
        (T.BF16, 1, 2, _dequant_bf16),
        (T.Q4_0, 32, 18, _dequant_q4_0),
        (T.Q4_1, 32, 20, _dequant_q4_1),
        (T.Q5_0, 32, 22, _dequant_q5_0),
        (T.Q5_1, 32, 24, _dequant_q5_1),
        (T.Q8_0, 32, 34, _dequant_q8_0),
        (T.Q2_K, QK_K, 84, _dequant_q2_k),
        (T.Q3_K, QK_K, 110, _dequant_q3_k),
        (T.Q4_K, QK_K, 144, _dequant_q4_k),
        (T.Q5_K, QK_K, 176, _dequant_q5_k),
        (T.Q6_K, QK_K, 210, _dequant_q6_k),
        (T.IQ4_NL, 32, 18, _dequant_iq4_nl),
        (T.IQ4_XS, QK_K, 136, _dequant_iq4_xs),
    ]
}


def _unsupported(t: object) -> UnsupportedTensorType:
    supported = ", ".join(qt.name for qt in QUANT_TYPES.values())
    return UnsupportedTensorType(f"tensor type {t} is not supported (supported: {supported})")


def quant_type(t: T | int) -> QuantType:
    """Look up the record for a GGML type (enum member or raw integer id).

    Raises ``UnsupportedTensorType`` naming the type if it has no dequantizer.
    """
    try:
        t = T(t)
    except ValueError:
        raise _unsupported(t) from None
    try:
        return QUANT_TYPES[t]
    except KeyError:
        raise _unsupported(t.name) from None


def row_bytes(t: T | int, n_cols: int) -> int:
    """Bytes taken by one row of ``n_cols`` weights of type ``t``.

    Raises ``ValueError`` if ``n_cols`` is not a whole number of blocks.
    """
    return _row_bytes(quant_type(t), n_cols)


def _row_bytes(qt: QuantType, n_cols: int) -> int:
    if n_cols < 0 or n_cols % qt.block_size:
        raise ModelFormatError(
            f"{qt.name} row of {n_cols} weights is not a whole number of "
            f"{qt.block_size}-weight blocks"
        )
    return n_cols // qt.block_size * qt.type_size


def dequantize(raw: np.ndarray, t: T | int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a tensor's bytes into a new float32 array of ``shape``.

    ``raw`` is the tensor data as any numpy array: flat uint8, or the typed,
    shaped array ``GGUFReader`` yields (float32 / float16 for F32 / F16,
    ``(rows, row_bytes)`` uint8 for block types); only its bytes are used.
    ``shape`` is in numpy order, i.e. GGUF's ``ne`` reversed, so the last axis
    is the row.  The result never shares memory with ``raw``.

    Raises ``ValueError`` if the byte count does not match ``shape`` exactly,
    ``UnsupportedTensorType`` if ``t`` has no dequantizer.
    """
    qt = quant_type(t)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    expected = math.prod(shape[:-1]) * _row_bytes(qt, n_cols)

    data = np.ascontiguousarray(raw)
    if not data.dtype.isnative:
        raise ModelFormatError(f"{qt.name} tensor data is not in native byte order ({data.dtype})")
    data = data.reshape(-1).view(np.uint8)
    if data.size != expected:
        raise ModelFormatError(
            f"{qt.name} tensor of shape {shape} needs {expected} bytes, got {data.size}"
        )

    blocks = data.reshape(-1, qt.type_size)
    out = np.empty((len(blocks), qt.block_size), dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // qt.block_size)
    for start in range(0, len(blocks), step):
        out[start : start + step] = qt.dequantize(blocks[start : start + step])
    return out.reshape(shape)
