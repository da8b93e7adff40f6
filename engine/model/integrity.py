"""A load-time check that a model's weights are finite numbers.

A GGUF file can be well-formed and still hold NaN or inf weights (a broken conversion or a
corrupt download that kept the header intact); such a model computes NaN for every request.
`check_finite` finds them in one pass over the file, reading for each tensor:

- float tensors (F32, F16, BF16): every element;
- block-quantized tensors: every block's floating-point scale fields (the integers in a block
  are finite by construction, so a non-finite value can only come from a scale).

It costs one sequential read of the file (about a second for a 1B model in Q4_K_M).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from engine.errors import ModelFormatError
from engine.model.gguf_file import ModelFile

# Byte offsets of the float16 scale fields inside one block, by type (ggml-common.h's structs).
_F16_SCALES: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    T.Q3_K: (108,),  # hmask[32], qs[64], scales[12], d
    T.Q4_K: (0, 2), T.Q5_K: (0, 2),  # d, dmin, ...
    T.Q6_K: (208,),  # ql[128], qh[64], scales[16], d
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}


def _non_finite(raw: np.ndarray, kind: T, block_bytes: int) -> bool:
    if kind == T.F32:
        return not np.isfinite(raw.view(np.float32)).all()
    if kind == T.F16:
        return not np.isfinite(raw.view(np.float16)).all()
    if kind == T.BF16:  # exponent bits all ones: inf or NaN
        return bool((raw.view(np.uint16) & 0x7F80 == 0x7F80).any())
    blocks = raw.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    return any(not np.isfinite(blocks[:, o:o + 2].copy().view(np.float16)).all() for o in _F16_SCALES[kind])


def check_finite(model: ModelFile) -> None:
    """Raise ModelFormatError naming the first tensor with a NaN or inf weight or scale."""
    from gguf import GGML_QUANT_SIZES
    for name, info in model.tensors.items():
        if info.type not in _F16_SCALES and info.type not in (T.F32, T.F16, T.BF16):
            continue  # a type the loader refuses on its own, with its own message
        if _non_finite(model.raw(name), info.type, GGML_QUANT_SIZES[info.type][1]):
            raise ModelFormatError(f"{model.path}: tensor {name!r} holds NaN or inf values; refusing to serve a "
                                   "model that computes garbage")
