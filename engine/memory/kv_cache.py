"""Per-sequence key/value cache.

One contiguous buffer per sequence, (n_layers, n_kv_heads, capacity, head_dim)
for keys and for values: attention reads `k[layer, :, :t]`, a contiguous
(t, head_dim) block per kv head, so the score GEMM needs no copy. Capacity is
fixed when the sequence starts (prompt + max new tokens, capped by the
context); running past it is a bug in the caller, not a recoverable state.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ContextOverflow


class SequenceKV:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int):
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = np.empty(shape, dtype=np.float32)
        self.v = np.empty(shape, dtype=np.float32)
        self.capacity = capacity
        self.length = 0  # positions 0..length-1 hold valid entries in every layer

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v of shape (n, n_kv_heads, head_dim) for positions start..start+n-1."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ContextOverflow(f"sequence needs {end} cache positions but was given {self.capacity}")
        self.k[layer, :, start:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start:end] = v.transpose(1, 0, 2)

    def layer_views(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole cache of a layer, keys and values (n_kv_heads, capacity, head_dim), in place."""
        return self.k[layer], self.v[layer]

    def read(self, layer: int, end: int, begin: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values for positions begin..end-1: two (n_kv_heads, end - begin, head_dim) views."""
        return self.k[layer, :, begin:end], self.v[layer, :, begin:end]

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (a rejected draft, a retried step)."""
        self.length = min(self.length, length)
