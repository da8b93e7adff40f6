"""Batch-invariant CPU arithmetic: each row's result is independent of its batch mates.

OpenBLAS picks kernels by matrix shape. Measured here: a row of `X @ W` comes out
bit-identical for 2 to 5 rows but differs at 1 row (GEMV) and from 8 rows on, and
the scores of one query differ with the number of keys. So with the plan's
`determinism.batch_invariant`, the CPU backend computes:

- float32 weight GEMMs with the extension's float kernel (ops_avx2/fmatmul.c), whose rows
  are batch-invariant by construction; without the extension (and for block-format weights
  on the numpy path), in tiles of exactly `ROW_TILE` rows (the last tile zero-padded): one
  numpy call that loops over tiles, every row through the same kernel;
- attention on a fixed grid: queries in row tiles, keys and values in chunks of
  `KEY_CHUNK` (zero-padded), softmax sums per chunk then across chunks in order,
  so a query's output depends only on its own keys — not on how many other queries
  or (masked) keys share the call. Decode, chunked prefill and the recompute after a
  preemption therefore produce the same bits for the same position.

The numpy fallback costs throughput (each tile re-reads the weights; attention makes many small
calls); docs/02_performance.md has the measurement.
"""

from __future__ import annotations

import numpy as np

ROW_TILE = 4
KEY_CHUNK = 64


def _pad_rows(a: np.ndarray, tile: int) -> tuple[np.ndarray, int]:
    n = a.shape[-2]
    pad = (-n) % tile
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-2] + (pad, a.shape[-1]), a.dtype)], axis=-2)
    return a, n


def tiled_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` computed in row tiles of ROW_TILE: a (..., n, k), b (k, m) or (..., k, m)."""
    a, n = _pad_rows(a, ROW_TILE)
    lead = a.shape[:-2]
    tiles = a.reshape(lead + (a.shape[-2] // ROW_TILE, ROW_TILE, a.shape[-1]))
    out = np.matmul(tiles, b[..., None, :, :] if b.ndim > 2 else b)
    return out.reshape(lead + (a.shape[-2], out.shape[-1]))[..., :n, :]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, group: int) -> np.ndarray:
    """Causal GQA like CpuBackend._attend, on the fixed tile/chunk grid. Returns (n, n_heads * hd)."""
    n, n_heads, hd = q.shape
    n_kv, t, _ = k.shape
    chunks = -(-t // KEY_CHUNK)
    pad_t = chunks * KEY_CHUNK - t
    if pad_t:
        zeros = np.zeros((n_kv, pad_t, hd), np.float32)
        k, v = np.concatenate([k, zeros], axis=1), np.concatenate([v, zeros], axis=1)
    kc = k.reshape(n_kv, chunks, KEY_CHUNK, hd)  # (n_kv, C, CH, hd)
    vc = v.reshape(n_kv, chunks, KEY_CHUNK, hd)
    qg = q.reshape(n, n_kv, group, hd).transpose(1, 0, 2, 3).reshape(n_kv, n * group, hd)
    qg, m = _pad_rows(qg, ROW_TILE)
    tiles = qg.reshape(n_kv, 1, -1, ROW_TILE, hd)  # (n_kv, 1, T, 4, hd)
    # scores per (kv head, key chunk, row tile): every gemm is 4 x 64 over hd
    scores = np.matmul(tiles, kc.transpose(0, 1, 3, 2)[:, :, None])  # (n_kv, C, T, 4, CH)
    scores *= np.float32(1.0 / np.sqrt(hd))
    rows_pos = np.repeat(q_positions, group)
    rows_pos = np.concatenate([rows_pos, np.full(qg.shape[1] - m, -1)])  # padded rows see nothing
    key_pos = np.arange(chunks * KEY_CHUNK).reshape(chunks, 1, 1, KEY_CHUNK)
    hidden = key_pos > rows_pos.reshape(1, -1, ROW_TILE, 1)  # (C, T, 4, CH)
    scores[:, hidden] = -np.inf
    peak = scores.max(axis=(1, 4), keepdims=True)
    peak[~np.isfinite(peak)] = 0.0  # padded rows: every score masked
    np.exp(scores - peak, out=scores)
    # the sum in a fixed order: within each chunk (pairwise, fixed length), then chunk after chunk
    denom = np.add.reduce(scores.sum(axis=4, keepdims=True), axis=1, keepdims=True)
    denom[denom == 0] = 1.0
    scores *= 1.0 / denom
    out = np.add.reduce(np.matmul(scores, vc[:, :, None]), axis=1)  # (n_kv, T, 4, hd), chunks in order
    out = out.reshape(n_kv, -1, hd)[:, :m]
    return out.reshape(n_kv, n, group, hd).transpose(1, 0, 2, 3).reshape(n, n_heads * hd)
