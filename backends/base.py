"""The backend contract: numeric ops over weight handles, nothing else.

A backend owns device memory and the arithmetic of each op. It takes no
decisions: the weight format it is asked to hold comes from the plan, and the
shapes it computes come from the runtime. Every op takes and returns host numpy
arrays at this contract; a device backend keeps its tensors resident and
converts at the edges it chooses.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from engine.errors import InvalidArgument


class TensorData(NamedTuple):
    """A tensor as the file holds it: raw bytes (memory-mapped), type, numpy-order shape."""

    raw: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]


class RopeYarn(NamedTuple):
    """YaRN rope scaling (arXiv:2309.00071) as llama.cpp's rope_yarn computes it: pair i mixes
    the interpolated frequency (times freq_scale) and the original one by a ramp between the
    correction dims of beta_fast and beta_slow rotations over original_context positions;
    cos and sin are scaled by mscale."""

    ext_factor: float
    beta_fast: float
    beta_slow: float
    original_context: int
    mscale: float


@dataclass(frozen=True)
class KernelSettings:
    """How a backend computes (never what): the plan's `execution` section as the control plane
    resolved it (engine/execution.py holds the measured defaults and what each one trades).

    A backend takes these at construction and again live (`Backend.configure`): each applies
    from the next op. Rows thresholds of 0 mean "never".
    """

    threads: int  # the CPU kernels' pool; 0: every CPU this process may run on
    f32_kernel_rows: int  # CPU f32 weights: batches of at most this many rows take the C kernel
    gemm_rows_x8: int  # CPU x8 block weights: batches of at least this many rows take dequantize + GEMM
    cuda_prefill_tokens: int  # CUDA: linears over more tokens take dequantize + GEMM
    prefetch_next_kib: int = 0  # CPU x8 block weights: KiB of the next matmul's weights an idle thread reads
    # ahead (0: off; the plan's measured default is in engine/execution.py)

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} {value!r} must be a whole number >= 0", field=f"execution.{name}")


class Backend(ABC):
    """Numeric ops of a decoder-only transformer."""

    name: str
    weight_formats: tuple[str, ...]
    # When True, each row of every op must come out bit-identical whatever else shares the
    # batch (the plan's determinism.batch_invariant); backends may trade speed for it.
    batch_invariant: bool = False
    # Capability: a resident backend keeps activations and the KV cache in its own memory
    # (`xp` arrays in and out, `new_kv` makes the cache, `to_host` brings a result back); others
    # take and return numpy.
    resident: bool = False

    @property
    def xp(self) -> Any:
        """The array module of this backend's results: numpy unless resident."""
        return np

    def to_host(self, a: Any) -> np.ndarray:
        """One of this backend's results as a host numpy array (a copy off the device if resident)."""
        return np.asarray(a)

    def holds_cache(self, kv: Any) -> bool:
        """Whether `kv` is a cache in this backend's own memory (from `new_kv`)."""
        return False

    def new_kv(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int) -> Any:
        """A sequence's KV cache in the backend's memory (resident backends only)."""
        raise NotImplementedError(f"the {self.name} backend is not resident; the runtime keeps its cache")

    @abstractmethod
    def configure(self, settings: KernelSettings) -> None:
        """Take new kernel settings (the plan's `execution` section); they apply from the next op."""

    def check_weight_format(self, fmt: str) -> None:
        if fmt not in self.weight_formats:
            raise InvalidArgument(f"weight format {fmt!r} is not supported by the {self.name} backend "
                                  f"(supported: {', '.join(self.weight_formats)})", field="weights")

    @abstractmethod
    def load_linear(self, parts: Sequence[TensorData], fmt: str) -> Any:
        """A weight handle for `y = x @ W.T` in weight format `fmt`.

        W is the concatenation of `parts` along the output axis, each (out_i, in) as
        stored in the file: fusing q/k/v or gate/up makes one GEMM of three or two.
        """

    @abstractmethod
    def load_vector(self, tensor: TensorData) -> Any:
        """A small dense tensor kept in float32 (norm weights, biases)."""

    @abstractmethod
    def load_embedding(self, tensor: TensorData) -> Any:
        """A token-embedding table handle, (vocab, dim) in the file."""

    @abstractmethod
    def tied_output(self, table: Any) -> Any:
        """A linear handle computing logits against an embedding table (tied output head)."""

    @abstractmethod
    def embedding(self, table: Any, ids: np.ndarray) -> np.ndarray:
        """Rows of an embedding table: (n,) int → (n, dim) float32."""

    @abstractmethod
    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        """(n, in) @ W.T → (n, out)."""

    @abstractmethod
    def rms_norm(self, x: np.ndarray, w: Any, eps: float) -> np.ndarray:
        """RMSNorm (arXiv:1910.07467) over the last axis, scaled by w."""

    @abstractmethod
    def rope(self, x: np.ndarray, positions: np.ndarray, table: Any = None) -> np.ndarray:
        """Rotary position embedding of (n, heads, head_dim) at `positions` (n,), with the
        rotation `table` from `configure_rope` (None: the one configured last)."""

    @abstractmethod
    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
                  window: int = 0) -> np.ndarray:
        """Causal grouped-query attention of one sequence.

        q: (n, n_heads, head_dim) at `q_positions`; k, v: (n_kv_heads, t, head_dim), the
        sequence's keys and values for positions 0..t-1 of the same numbering (a caller
        passing a suffix of the cache renumbers). Scores are scaled by 1/sqrt(head_dim).
        With `window` > 0 the query at p sees only keys p - window < j <= p (sliding-window
        attention, as llama.cpp's LLAMA_SWA_TYPE_STANDARD and transformers).
        Returns (n, n_heads * head_dim).
        """

    def fuses_decode(self, layer: Any) -> bool:
        """Whether `decode_layer` can run this layer's weights (a backend without it: never)."""
        return False

    def decode_layer(self, x: np.ndarray, layer: Any, k_cache: np.ndarray, v_cache: np.ndarray, position: int,
                     rope_table: Any, eps: float, n_heads: int, next_weight: Any) -> None:
        """One llama-block layer (RMSNorm, fused q/k/v without biases, RoPE, the token's key and
        value into the caches, attention, o, RMSNorm, SwiGLU) for one token of one sequence, in
        place on x (1, dim): the same results, bit for bit, as the ops one by one. k_cache and
        v_cache: this layer's (n_kv_heads, capacity, head_dim); attention reads positions
        0..position. `next_weight` is the matrix after this layer (for read-ahead), or None."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse decode layers")

    def decode_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Attention of B sequences decoding one token each, in one call.

        q: (B, n_heads, head_dim); k, v: (B, n_kv_heads, T, head_dim), sequence b's keys in
        positions 0..lengths[b]-1 (the rest is padding). Returns (B, n_heads * head_dim).
        This default loops over `attention`; backends override it with one batched computation.
        """
        return self.xp.concatenate([self.attention(q[b:b + 1], k[b, :, :lengths[b]], v[b, :, :lengths[b]],
                                                   np.array([lengths[b] - 1])) for b in range(len(q))])

    def paged_decode_attention(self, q: np.ndarray, k_pages: np.ndarray, v_pages: np.ndarray, table: np.ndarray,
                               lengths: np.ndarray) -> np.ndarray:
        """`decode_attention` over a paged KV arena, read through block tables.

        k_pages, v_pages: one layer of the arena, (n_kv_heads, num_blocks, block_size, head_dim);
        table: (B, nb) int64, sequence b's positions 0..lengths[b]-1 live in blocks
        table[b, 0], table[b, 1], ... (entries past its length are padding). This default
        gathers the blocks into (B, n_kv_heads, nb * block_size, head_dim) and calls
        `decode_attention`; backends override it to read the arena in place.
        """
        n_kv, _, bs, hd = k_pages.shape
        b, nb = table.shape
        k = k_pages[:, table].reshape(n_kv, b, nb * bs, hd).transpose(1, 0, 2, 3)
        v = v_pages[:, table].reshape(n_kv, b, nb * bs, hd).transpose(1, 0, 2, 3)
        if k.dtype != np.float32:  # an f16 arena halves memory; attention still runs in f32
            k, v = k.astype(np.float32), v.astype(np.float32)
        return self.decode_attention(q, k, v, lengths)

    def logsumexp(self, logits: np.ndarray) -> np.ndarray:
        """log(sum(exp(row))) of each row of host logits (n, vocab), float64 (n,): the
        normalizer of a token's log-probability. Finite rows only (the sampler validates)."""
        top = logits.max(axis=-1, keepdims=True)
        return top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64))

    @abstractmethod
    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        """SwiGLU (arXiv:2002.05202): silu(gate) * up of (n, 2f) packed [gate | up] → (n, f)."""

    def gelu_tanh_mul(self, gate_up: np.ndarray) -> np.ndarray:
        """GeGLU (arXiv:2002.05202) with the tanh approximation of GELU (gemma):
        gelu_tanh(gate) * up of (n, 2f) packed [gate | up] → (n, f)."""
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (gate + np.float32(0.044715) * gate * gate * gate)
        return np.float32(0.5) * gate * (np.float32(1.0) + np.tanh(inner)) * up

    def configure_rope(self, dim: int, theta: float, style: str, max_positions: int,
                       freq_scale: float = 1.0, freq_factors: np.ndarray | None = None,
                       yarn: RopeYarn | None = None) -> Any:
        """Precompute a rotary table and return it (for `rope`'s `table`); called once the
        model's hyperparameters are known. Pair i of position p rotates by
        p * freq_scale * theta^(-2i/dim) / freq_factors[i] (linear scaling, Llama 3 factors),
        or by YaRN's mix of the scaled and unscaled frequencies (`rope_angles`)."""

    def check_model(self, config: Any, variants: Sequence[str]) -> None:
        """Refuse (UnsupportedModel) a model whose `variants` (ModelConfig.variants: what it
        computes beyond the plain llama decoder) this backend cannot compute."""

    def close(self) -> None:
        """Release device memory."""


def rope_angles(dim: int, theta: float, max_positions: int, freq_scale: float = 1.0,
                freq_factors: np.ndarray | None = None, yarn: RopeYarn | None = None) -> tuple[np.ndarray, float]:
    """Rotation angles (max_positions, dim/2) in float64, and the cos/sin scale (YaRN's mscale).

    RoPE, arXiv:2104.09864: pair i rotates by pos * theta^(-2i/dim). YaRN, arXiv:2309.00071,
    as ggml's rope_yarn / ggml_rope_yarn_corr_dims compute it."""
    extrap = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if freq_factors is not None:
        extrap = extrap / np.asarray(freq_factors, dtype=np.float64)
    inv_freq, mscale = extrap * freq_scale, 1.0
    if yarn is not None and yarn.ext_factor != 0.0:
        def corr_dim(rotations: float) -> float:
            return dim * math.log(yarn.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(0.0, math.floor(corr_dim(yarn.beta_fast)))
        high = min(dim - 1.0, math.ceil(corr_dim(yarn.beta_slow)))
        ramp = 1.0 - np.clip((np.arange(dim // 2) - low) / max(0.001, high - low), 0.0, 1.0)
        mix = ramp * yarn.ext_factor
        inv_freq = inv_freq * (1.0 - mix) + extrap * mix
        mscale = yarn.mscale
    positions = np.arange(max_positions, dtype=np.float64)
    return np.outer(positions, inv_freq), mscale


@dataclass
class OpProfile:
    """Per-op wall time: count, total seconds and share, as `bench --profile` prints it."""

    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, op: str, seconds: float) -> None:
        self.count[op] += 1
        self.seconds[op] += seconds

    def rows(self) -> list[dict[str, Any]]:
        total = sum(self.seconds.values()) or 1.0
        return [{"op": op, "count": self.count[op], "seconds": round(s, 6), "share": round(s / total, 4)}
                for op, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])]


class ProfiledBackend:
    """Wraps a backend and times each op; costs nothing when not used."""

    # Op name in the profile for each backend method.
    OPS = {"linear": "matmul", "attention": "attention", "decode_attention": "attention",
           "paged_decode_attention": "attention", "rms_norm": "norm", "rope": "rope", "silu_mul": "activation",
           "gelu_tanh_mul": "activation",
           "embedding": "embedding"}

    def __init__(self, inner: Backend, profile: OpProfile):
        self._inner = inner
        self.profile = profile

    def fuses_decode(self, layer: Any) -> bool:
        return False  # the profile times each op: no fused layers while profiling

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        op = self.OPS.get(name)
        if op is None:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = attr(*args, **kwargs)
            self.profile.add(op, time.perf_counter() - start)
            return out
        return timed
