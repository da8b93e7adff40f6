"""Each op as kernel launches on a `Device`: launch geometry, argument order and weight handles.

Everything here takes and returns device arrays; moving data to and from the host is the
backend's business. The same code drives CuPy on a GPU and pyopencl on PoCL/Oclgrind in CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.cuda.device import Device
from backends.cuda.dialect import MAX_GROUP
from backends.cuda.kernels import (
    ATT_GROUP,
    DEVICE_TYPES,
    MATVEC_ROWS_PER_GROUP,
    MAX_HEAD_DIM,
    OPS_PROGRAM,
    DeviceType,
    quant_program,
)

i32, i64, f32 = np.int32, np.int64, np.float32

MATVEC_TOKENS = 8  # tokens per group in the batched matvec (matvec8_*)
ELEMENTWISE_GROUP = 256
TOP_K_GROUP = 256


@dataclass
class QuantMatrix:
    """Rows of one weight type kept in their file blocks on the device: (n_rows, row_bytes) uint8."""

    dtype: DeviceType
    data: Any
    n_rows: int
    n_cols: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dtype.row_bytes(self.n_cols)


@dataclass
class LinearWeight:
    """`y = x @ W.T` where W is its segments stacked along the output axis (fused q|k|v, gate|up)."""

    segments: list[QuantMatrix]
    n_in: int
    n_out: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_out = sum(s.n_rows for s in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def pack_rows(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> tuple[DeviceType, np.ndarray]:
    """A tensor's bytes as (n_rows, row_bytes) uint8 for the device type of `qtype`."""
    dt = DEVICE_TYPES[qtype]
    n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else (int(np.prod(shape[:-1])), shape[-1])
    if n_cols % dt.block_size:
        raise ValueError(f"{qtype.name} rows of {n_cols} weights are not a whole number of "
                         f"{dt.block_size}-weight blocks")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != n_rows * dt.row_bytes(n_cols):
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {n_rows * dt.row_bytes(n_cols)} bytes, "
                         f"got {data.size}")
    return dt, data.reshape(n_rows, dt.row_bytes(n_cols))


def rope_tables(dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_positions, dim / 2) float32: pair i turns by pos * theta^(-2i/dim) (arXiv:2104.09864),
    computed in float64 and rounded once, as the CPU backend does."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _groups(n: int, per_group: int) -> int:
    return (n + per_group - 1) // per_group


class KernelOps:
    def __init__(self, device: Device):
        self.device = device

    def _launch(self, program, kernel, grid, group, args) -> None:
        assert group <= MAX_GROUP and group % 32 == 0, group
        self.device.launch(program, kernel, grid, group, args)

    # --- weights ---------------------------------------------------------------------------

    def upload_matrix(self, qtype: T, rows: np.ndarray, n_cols: int) -> QuantMatrix:
        """(n_rows, row_bytes) uint8 host blocks of `qtype` → a device QuantMatrix."""
        dt = DEVICE_TYPES[qtype]
        return QuantMatrix(dt, self.device.upload(rows), rows.shape[0], n_cols)

    def matvec(self, w: QuantMatrix, x: Any, y: Any, ld_y: int, y_off: int) -> None:
        """y[:, y_off:y_off + rows] = x (n, n_in) @ W.T with the fused dequantize-matvec kernel."""
        n = x.shape[0]
        nt = 1 if n == 1 else MATVEC_TOKENS
        kernel = f"matvec{nt}_{w.dtype.name}"
        grid = (_groups(w.n_rows, MATVEC_ROWS_PER_GROUP), _groups(n, nt))
        self._launch(quant_program(w.dtype.qtype), kernel, grid, 32 * MATVEC_ROWS_PER_GROUP,
                     (w.data, x, y, i32(w.n_rows), i32(w.n_cols), i32(n), i32(ld_y), i32(y_off)))

    def dequant_rows(self, w: QuantMatrix, rows: Any, out: Any) -> None:
        """out (len(rows), n_cols) float32 = rows `rows` (device int32) of W, dequantized."""
        n = rows.shape[0]
        group = min(MAX_GROUP, max(32, _groups(w.n_cols // w.dtype.block_size * w.dtype.parts, 32) * 32))
        self._launch(quant_program(w.dtype.qtype), f"dequant_{w.dtype.name}", (n, 1), group,
                     (w.data, rows, out, i32(w.n_cols)))

    # --- activations -----------------------------------------------------------------------

    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        n, d = x.shape
        y = self.device.empty((n, d), f32)
        group = min(MAX_GROUP, _groups(d, 32) * 32)
        self._launch(OPS_PROGRAM, "rms_norm", (n, 1), group, (x, w, y, i32(d), f32(eps)))
        return y

    def rope(self, x: Any, x_off: int, row_stride: int, n: int, n_heads: int, head_dim: int,
             positions: Any, cos: Any, sin: Any, neox: bool) -> Any:
        """(n, n_heads, head_dim) rotated; row t of the input starts at x_off + t * row_stride."""
        total = n * n_heads * head_dim
        y = self.device.empty((n, n_heads, head_dim), f32)
        self._launch(OPS_PROGRAM, "rope", (_groups(total, ELEMENTWISE_GROUP), 1), ELEMENTWISE_GROUP,
                     (x, i32(x_off), i32(row_stride), y, positions, cos, sin, i32(n_heads), i32(head_dim),
                      i32(cos.shape[1]), i32(neox), i32(total)))
        return y

    def silu_mul(self, gate_up: Any) -> Any:
        n, two_f = gate_up.shape
        f = two_f // 2
        y = self.device.empty((n, f), f32)
        self._launch(OPS_PROGRAM, "silu_mul", (_groups(n * f, ELEMENTWISE_GROUP), 1), ELEMENTWISE_GROUP,
                     (gate_up, y, i32(f), i32(n * f)))
        return y

    def attention(self, q: Any, k: Any, v: Any, table: Any, block_size: int, block_stride: int,
                  head_stride: int, n_kv_heads: int, q_positions: Any) -> Any:
        """Causal GQA of q (n, n_heads, head_dim) over a paged cache → (n, n_heads * head_dim).

        Key d of kv head h at position p: k[table[p // block_size] * block_stride + h * head_stride
        + (p % block_size) * head_dim + d]; the same for v.
        """
        n, n_heads, hd = q.shape
        if hd > MAX_HEAD_DIM:
            raise ValueError(f"head_dim {hd} exceeds the attention kernel's {MAX_HEAD_DIM}")
        out = self.device.empty((n, n_heads * hd), f32)
        self._launch(OPS_PROGRAM, "attention", (n_heads, n), ATT_GROUP,
                     (q, k, v, table, i32(block_size), i64(block_stride), i64(head_stride), q_positions,
                      out, i32(n_heads), i32(n_kv_heads), i32(hd), f32(1.0 / np.sqrt(hd))))
        return out

    def top_k(self, logits: Any, k: int) -> tuple[Any, Any, Any]:
        """Per row: the k best logits (highest first, ties to the lowest id), their ids, log-sum-exp."""
        rows, vocab = logits.shape
        vals = self.device.empty((rows, k), f32)
        ids = self.device.empty((rows, k), i32)
        lse = self.device.empty((rows,), f32)
        self._launch(OPS_PROGRAM, "top_k", (rows, 1), TOP_K_GROUP, (logits, i32(vocab), i32(k), vals, ids, lse))
        return vals, ids, lse


def segments_of(parts: Sequence[tuple[T, np.ndarray]]) -> list[tuple[T, list[np.ndarray]]]:
    """Consecutive parts of the same device type, grouped (each becomes one device segment)."""
    out: list[tuple[T, list[np.ndarray]]] = []
    for qtype, rows in parts:
        if out and out[-1][0] == qtype:
            out[-1][1].append(rows)
        else:
            out.append((qtype, [rows]))
    return out
