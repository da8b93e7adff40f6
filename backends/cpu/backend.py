"""The CPU backend: numpy elementwise ops, and weights as float32 (AVX2 float kernel for
decode-sized batches, OpenBLAS GEMM for prefill) or quantized-resident blocks (`native`,
`q8_0`: AVX2 int8 kernels, see quantized.py)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.base import Backend, KernelSettings, RopeYarn, TensorData, rope_angles
from backends.cpu import invariant
from backends.cpu.quantized import FLOAT_TYPES, BlockTable, QuantizedLinear, QuantizedMatmul, as_blocks, block_part
from backends.quants import dequantize


class CpuBackend(Backend):
    """Weight formats: `f32` (dequantized at load), `native` (the file's own blocks: Q4_0/Q4_1/Q8_0
    interleaved by 8 rows for the kernels, K-quants read from the file mapping), `q8_0`
    (requantized at load).

    `settings` (the plan's `execution` section, `KernelSettings`) declares every path choice:
    for the block formats (every type in the x8 layout), a batch of at least `gemm_rows_x8` rows
    is dequantized into float32 tiles for
    OpenBLAS (float activations), a smaller one runs the int8 quantized-dot kernels
    (activations quantized per 32-block, as llama.cpp); 0 means never GEMM. For float32
    weights, a batch of at most `f32_kernel_rows` rows runs the extension's float kernel
    (`matmul_f32`, ops_avx2/fmatmul.c), a larger one OpenBLAS; in batch-invariant mode the
    kernel takes every batch, since its rows do not depend on their batch mates. `threads`
    sizes the kernels' pool (0: the CPUs this process may run on). Norm, RoPE, attention and
    SwiGLU run in C whenever the extension is in use, whatever the weight format.

    `kernels` is "auto", "avx2" or "numpy" (force the fallback: every batch
    dequantize-into-GEMM, every matmul OpenBLAS).
    """

    name = "cpu"
    weight_formats = ("f32", "native", "q8_0")

    def __init__(self, settings: KernelSettings, kernels: str = "auto") -> None:
        self._cos: np.ndarray | None = None
        self._sin: np.ndarray | None = None
        self._rope_style = "interleaved"
        self.quantized = QuantizedMatmul(kernels, settings)
        self._ops = self.quantized.ops  # the C extension, or None: numpy for every op
        self._format = "f32"  # of the model being loaded, for the embedding table (see load_embedding)
        self._dense: dict[str, int] = {}  # weight tensors loaded as float32, by file type (weights_report)

    def configure(self, settings: KernelSettings) -> None:
        self.quantized.configure(settings)

    @property
    def settings(self) -> KernelSettings:
        return self.quantized.settings

    def check_weight_format(self, fmt: str) -> None:
        super().check_weight_format(fmt)
        self._format = fmt

    def weights_report(self) -> dict[str, int]:
        """Weight tensors loaded so far, by resident form: "Q4_K (x8)" (the file's blocks,
        repacked for the kernels), "F16 -> Q8_0 (x8)" (requantized), "F16 -> float32"."""
        return {**self.quantized.resident, **self._dense}

    def load_linear(self, parts: Sequence[TensorData], fmt: str) -> Any:
        self.check_weight_format(fmt)
        if fmt != "f32" and not all(T(p.qtype) in FLOAT_TYPES for p in parts):
            return self.quantized.handle([block_part(p, fmt) for p in parts], parts[0].shape[1])
        for p in parts:
            key = f"{T(p.qtype).name} -> float32"
            self._dense[key] = self._dense.get(key, 0) + 1
        # float32, and float tensors under a block format: there are no blocks to keep.
        # Kept as W (out, in) contiguous, the file's orientation, and handed out as the (in, out)
        # view W.T, like the tied head's table: the float kernel reads W's rows as contiguous
        # streams (1.1-1.5x faster at 2-32 rows than from a contiguous W.T, whose column strips
        # are strided), and OpenBLAS's prefill GEMM on the view measured within 2 % of a
        # contiguous W.T at 128-512 rows (3 % at 64, where the kernel runs instead).
        w = np.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=np.float32)
        row = 0
        for p in parts:
            w[row:row + p.shape[0]] = dequantize(p.raw, p.qtype, p.shape)
            row += p.shape[0]
            self._release(p.raw)
        return w.T

    def _release(self, raw: np.ndarray) -> None:
        """Drop a file tensor's pages from the resident set once it has been copied (read-only
        mappings only): resident memory holds the weights once, in the format asked for."""
        if self._ops is not None:
            self._ops.release_pages(raw)

    def load_vector(self, tensor: TensorData) -> Any:
        return dequantize(tensor.raw, tensor.qtype, tensor.shape)

    def load_embedding(self, tensor: TensorData, fmt: str | None = None) -> Any:
        # The contract passes no format here; load_weights validated the model's format first.
        fmt = fmt or self._format
        qtype = T(tensor.qtype)
        if fmt == "f32" or qtype in FLOAT_TYPES:
            table = dequantize(tensor.raw, tensor.qtype, tensor.shape)
            self._release(tensor.raw)
            return table
        if fmt == "q8_0" and qtype != T.Q8_0:
            part = block_part(tensor, "q8_0")
            return BlockTable(part.blocks, T.Q8_0, tensor.shape)
        return BlockTable(as_blocks(tensor.raw, tensor.shape[0]), qtype, tensor.shape)

    def tied_output(self, table: Any) -> Any:
        if isinstance(table, BlockTable):
            # the head reads the table's own blocks (requantized to Q8_0 if it has no kernel),
            # and lookups then go through the head's resident copy
            head = self.quantized.handle(
                [block_part(TensorData(table.blocks, table.qtype, table.shape), "native")], table.shape[1])
            table.attach_head(head)
            return head
        # A transposed view, no copy: `x @ E.T` on the (vocab, dim) table measured as fast as a
        # contiguous (dim, vocab) copy at batch 1 and 1.5x faster at batch 512.
        return table.T

    def embedding(self, table: Any, ids: np.ndarray) -> np.ndarray:
        if isinstance(table, BlockTable):
            return table.rows(ids)
        return table[ids]

    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        if isinstance(w, QuantizedLinear):
            return self.quantized.linear(x, w, batch_invariant=self.batch_invariant)
        if (self._ops is not None and (self.batch_invariant or len(x) <= self.settings.f32_kernel_rows)
                and _c_ready(x) and _weight_ready(w)):
            out = np.empty((len(x), w.shape[1]), dtype=np.float32)
            self._ops.matmul_f32(x, w, out, self.quantized.threads)
            return out
        if self._ops is not None:
            self._ops.park()  # the C pool's spinning worker would take a core from OpenBLAS
        if self.batch_invariant:
            return invariant.tiled_matmul(x, w)
        return x @ w

    def fuses_decode(self, layer: Any) -> bool:
        """With the C ops and every matrix of the layer on the int8 kernels at one row."""
        if self._ops is None:
            return False
        mats = (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        return all(isinstance(w, QuantizedLinear) and w.matrix is not None
                   and self.quantized.path(1, w, self.batch_invariant) == "quantized_dot" for w in mats)

    def decode_layer(self, x: np.ndarray, layer: Any, k_cache: np.ndarray, v_cache: np.ndarray, position: int,
                     rope_table: Any, eps: float, n_heads: int, next_weight: Any) -> None:
        cos_t, sin_t, style = rope_table
        nxt = next_weight.matrix if isinstance(next_weight, QuantizedLinear) else None
        qm = self.quantized
        self._ops.decode_layer(x, layer.attn_norm, layer.ffn_norm, layer.wqkv.matrix, layer.wo.matrix,
                               layer.w_gate_up.matrix, layer.w_down.matrix, nxt, k_cache, v_cache, position,
                               cos_t, sin_t, style == "neox", eps, n_heads, qm.threads,
                               qm.settings.prefetch_next_kib * 1024)
        qm.ran(layer.wqkv, layer.w_down)  # the head after the last layer reads layer 0 ahead, as unfused

    # The decoder-layer ops below run in C (ops_avx2/ops.c) when the extension is in use:
    # at decode each is a few microseconds of arithmetic behind several numpy calls. The
    # numpy code is the fallback and the reference the C code is tested against.

    def rms_norm(self, x: np.ndarray, w: Any, eps: float) -> np.ndarray:
        if self._ops is not None and _c_ready(x):
            out = np.empty(x.shape, dtype=np.float32)
            self._ops.rms_norm(x, w, eps, out)
            return out
        ms = np.einsum("nd,nd->n", x, x)[:, None] / x.shape[-1]  # mean of squares without a temporary
        return x * (1.0 / np.sqrt(ms + eps)) * w

    def configure_rope(self, dim: int, theta: float, style: str, max_positions: int,
                       freq_scale: float = 1.0, freq_factors: np.ndarray | None = None,
                       yarn: RopeYarn | None = None) -> Any:
        angles, mscale = rope_angles(dim, theta, max_positions, freq_scale, freq_factors, yarn)  # (positions, dim/2)
        if mscale == 1.0:
            table = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), style)
        else:
            table = ((np.cos(angles) * mscale).astype(np.float32), (np.sin(angles) * mscale).astype(np.float32), style)
        self._cos, self._sin, self._rope_style = table
        return table

    def rope(self, x: np.ndarray, positions: np.ndarray, table: Any = None) -> np.ndarray:
        cos_t, sin_t, style = table if table is not None else (self._cos, self._sin, self._rope_style)
        assert cos_t is not None and sin_t is not None, "configure_rope first"
        if self._ops is not None and _c_ready(x):
            out = np.empty(x.shape, dtype=np.float32)
            self._ops.rope(x, cos_t, sin_t, _positions(positions), style == "neox", out)
            return out
        n, heads, hd = x.shape
        half = cos_t.shape[1]
        cos = cos_t[positions][:, None, :]  # (n, 1, rope_dim/2)
        sin = sin_t[positions][:, None, :]
        out = x.copy()
        if style == "interleaved":
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

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
                  window: int = 0) -> np.ndarray:
        if window and int(q_positions.max()) >= window:  # some query has keys outside its window
            return self._windowed_attention(q, k, v, q_positions, window)
        if self.batch_invariant and self._ops is None:
            return invariant.attend(q, k, v, q_positions, q.shape[1] // k.shape[0])
        if self._ops is not None and _c_ready(q) and _rows_ready(k) and _rows_ready(v) and k.shape[1] > 0:
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
            self._ops.attention(np.ascontiguousarray(q), k, v, _positions(q_positions), out, self.quantized.threads)
            return out
        n, n_heads, hd = q.shape
        n_kv = k.shape[0]
        group = n_heads // n_kv
        out = np.empty((n, n_heads * hd), dtype=np.float32)
        for lo in range(0, n, self.ATTENTION_BLOCK):
            hi = min(n, lo + self.ATTENTION_BLOCK)
            t = int(q_positions[hi - 1]) + 1  # keys this block can see
            out[lo:hi] = self._attend(q[lo:hi], k[:, :t], v[:, :t], q_positions[lo:hi], group)
        return out

    def _windowed_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
                            window: int) -> np.ndarray:
        """Sliding-window attention in numpy, per query block over the keys its window reaches:
        the cost per query is bounded by the window, not by the sequence."""
        n, n_heads, hd = q.shape
        group = n_heads // k.shape[0]
        out = np.empty((n, n_heads * hd), dtype=np.float32)
        for lo in range(0, n, self.ATTENTION_BLOCK):
            hi = min(n, lo + self.ATTENTION_BLOCK)
            first = max(0, int(q_positions[lo:hi].min()) - window + 1)  # oldest key any query here sees
            t = int(q_positions[lo:hi].max()) + 1
            out[lo:hi] = self._attend(q[lo:hi], k[:, first:t], v[:, first:t], q_positions[lo:hi] - first, group,
                                      window)
        return out

    def decode_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self._ops is not None and _c_ready(q) and _rows_ready(k) and _rows_ready(v):
            # one task per (sequence, head), each over its own keys only: batch-invariant as is
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
            self._ops.decode_attention(np.ascontiguousarray(q), k, v, _positions(lengths), out, self.quantized.threads)
            return out
        if self.batch_invariant:  # its row tiles would mix sequences: per sequence, on the fixed grid
            return super().decode_attention(q, k, v, lengths)
        # every decoding sequence at once: (B, n_kv, group, T) scores, padding masked per sequence
        b, n_heads, hd = q.shape
        n_kv, t = k.shape[1], k.shape[2]
        group = n_heads // n_kv
        qg = q.reshape(b, n_kv, group, hd)
        scores = np.matmul(qg, k.transpose(0, 1, 3, 2))  # (B, n_kv, group, T)
        scores *= np.float32(1.0 / np.sqrt(hd))
        hidden = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]  # (B, T)
        scores[np.broadcast_to(hidden[:, None, None, :], scores.shape)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
        return np.matmul(scores, v).reshape(b, n_heads * hd)  # (B, n_kv, group, hd) -> (B, H * hd)

    def paged_decode_attention(self, q: np.ndarray, k_pages: np.ndarray, v_pages: np.ndarray, table: np.ndarray,
                               lengths: np.ndarray) -> np.ndarray:
        if (self._ops is not None and _c_ready(q) and k_pages.dtype == np.float32 and k_pages.flags.c_contiguous
                and v_pages.flags.c_contiguous and k_pages.shape[2] % 8 == 0):
            # the same per-(sequence, head) task as decode_attention, reading blocks in place
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
            self._ops.decode_attention(np.ascontiguousarray(q), k_pages, v_pages, _positions(lengths), out,
                                       self.quantized.threads, np.ascontiguousarray(table, dtype=np.int64))
            return out
        return super().paged_decode_attention(q, k_pages, v_pages, table, lengths)

    @staticmethod
    def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, group: int,
                window: int = 0) -> np.ndarray:
        n, n_heads, hd = q.shape
        n_kv, t, _ = k.shape
        # queries grouped under their kv head: (n_kv, n * group, hd), row = (token, head in group)
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 0, 2, 3).reshape(n_kv, n * group, hd)
        scores = np.matmul(qg, k.transpose(0, 2, 1))  # (n_kv, n * group, t)
        scores *= np.float32(1.0 / np.sqrt(hd))
        if q_positions[0] < t - 1 or window:
            # causal mask: the query at position p sees keys 0..p (and with a window, p - window < j)
            p = np.repeat(q_positions, group)[:, None]
            hidden = np.arange(t)[None, :] > p  # (n * group, t)
            if window:
                hidden |= np.arange(t)[None, :] <= p - window
            scores += np.where(hidden, np.float32(-np.inf), np.float32(0.0))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, v)  # (n_kv, n * group, hd)
        return out.reshape(n_kv, n, group, hd).transpose(1, 0, 2, 3).reshape(n, n_heads * hd)

    def logsumexp(self, logits: np.ndarray) -> np.ndarray:
        if self._ops is not None and _c_ready(logits) and logits.ndim == 2:
            return np.array(self._ops.logsumexp(logits), dtype=np.float64)
        return super().logsumexp(logits)

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        if self._ops is not None and _c_ready(gate_up):
            out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=np.float32)
            self._ops.silu_mul(gate_up, out, self.quantized.threads)
            return out
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
        return gate / (1.0 + np.exp(-gate)) * up


def _c_ready(a: np.ndarray) -> bool:
    """float32 with a contiguous last axis and no negative strides: what the C ops take."""
    return a.dtype == np.float32 and a.strides[-1] == 4 and min(a.strides) >= 0


def _weight_ready(w: np.ndarray) -> bool:
    """A float32 (in, out) weight the float kernel reads: W.T of a row-major W, or row-major itself."""
    return (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 2 and 4 in w.strides
            and all(s >= 0 and s % 4 == 0 for s in w.strides))


def _rows_ready(a: np.ndarray) -> bool:
    """Keys or values for the C attention: contiguous (.., t, head_dim) rows."""
    return _c_ready(a) and (a.shape[-2] <= 1 or a.strides[-2] == 4 * a.shape[-1])


def _positions(p: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(p, dtype=np.int64)
