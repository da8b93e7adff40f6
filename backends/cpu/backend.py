"""The numpy CPU backend: float32 weights, OpenBLAS GEMM, vectorised elementwise ops."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backends.base import Backend, TensorData
from engine.model.quants import dequantize


class CpuBackend(Backend):
    name = "cpu"
    weight_formats = ("f32",)

    def __init__(self) -> None:
        self._cos: np.ndarray | None = None
        self._sin: np.ndarray | None = None
        self._rope_style = "interleaved"

    def load_linear(self, parts: Sequence[TensorData], fmt: str) -> Any:
        self.check_weight_format(fmt)
        # Kept as W.T, contiguous (in, out): `x @ Wt` runs ~1.5x faster than `x @ W.T`
        # at batch 16-32 here (DESIGN.md, performance).
        n_in = parts[0].shape[1]
        wt = np.empty((n_in, sum(p.shape[0] for p in parts)), dtype=np.float32)
        col = 0
        for p in parts:
            wt[:, col:col + p.shape[0]] = dequantize(p.raw, p.qtype, p.shape).T
            col += p.shape[0]
        return wt

    def load_vector(self, tensor: TensorData) -> Any:
        return dequantize(tensor.raw, tensor.qtype, tensor.shape)

    def load_embedding(self, tensor: TensorData) -> Any:
        return dequantize(tensor.raw, tensor.qtype, tensor.shape)

    def tied_output(self, table: Any) -> Any:
        # A transposed view, no copy: `x @ E.T` on the (vocab, dim) table measured as fast as a
        # contiguous (dim, vocab) copy at batch 1 and 1.5x faster at batch 512.
        return table.T

    def embedding(self, table: Any, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        return x @ w

    def rms_norm(self, x: np.ndarray, w: Any, eps: float) -> np.ndarray:
        ms = np.einsum("nd,nd->n", x, x)[:, None] / x.shape[-1]  # mean of squares without a temporary
        return x * (1.0 / np.sqrt(ms + eps)) * w

    def configure_rope(self, dim: int, theta: float, style: str, max_positions: int) -> None:
        # RoPE, arXiv:2104.09864: pair i rotates by pos * theta^(-2i/dim).
        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # (positions, dim/2)
        self._cos = np.cos(angles).astype(np.float32)
        self._sin = np.sin(angles).astype(np.float32)
        self._rope_style = style

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        assert self._cos is not None and self._sin is not None, "configure_rope first"
        n, heads, hd = x.shape
        half = self._cos.shape[1]
        cos = self._cos[positions][:, None, :]  # (n, 1, rope_dim/2)
        sin = self._sin[positions][:, None, :]
        out = x.copy()
        if self._rope_style == "interleaved":
            x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]  # pairs (x[2i], x[2i+1])
            out[..., 0:2 * half:2] = x0 * cos - x1 * sin
            out[..., 1:2 * half:2] = x0 * sin + x1 * cos
        else:  # neox: pairs (x[i], x[i + rope_dim/2])
            x0, x1 = x[..., :half], x[..., half:2 * half]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:2 * half] = x0 * sin + x1 * cos
        return out

    # Queries per block in prefill: a causal block only reads keys up to its last position,
    # which halves the work of a full prompt and keeps the score block in cache.
    ATTENTION_BLOCK = 128

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
        n, n_heads, hd = q.shape
        n_kv = k.shape[0]
        group = n_heads // n_kv
        out = np.empty((n, n_heads * hd), dtype=np.float32)
        for lo in range(0, n, self.ATTENTION_BLOCK):
            hi = min(n, lo + self.ATTENTION_BLOCK)
            t = int(q_positions[hi - 1]) + 1  # keys this block can see
            out[lo:hi] = self._attend(q[lo:hi], k[:, :t], v[:, :t], q_positions[lo:hi], group)
        return out

    @staticmethod
    def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, group: int) -> np.ndarray:
        n, n_heads, hd = q.shape
        n_kv, t, _ = k.shape
        # queries grouped under their kv head: (n_kv, n * group, hd), row = (token, head in group)
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 0, 2, 3).reshape(n_kv, n * group, hd)
        scores = np.matmul(qg, k.transpose(0, 2, 1))  # (n_kv, n * group, t)
        scores *= np.float32(1.0 / np.sqrt(hd))
        if q_positions[0] < t - 1:
            # causal mask: the query at position p sees keys 0..p
            hidden = np.arange(t)[None, :] > np.repeat(q_positions, group)[:, None]  # (n * group, t)
            scores += np.where(hidden, np.float32(-np.inf), np.float32(0.0))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, v)  # (n_kv, n * group, hd)
        return out.reshape(n_kv, n, group, hd).transpose(1, 0, 2, 3).reshape(n, n_heads * hd)

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
        return gate / (1.0 + np.exp(-gate)) * up
