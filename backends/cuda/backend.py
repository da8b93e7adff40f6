"""The CUDA backend: the Backend contract on our own kernels, weights resident in their GGUF blocks.

Weights stay in their file blocks on the device (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16,
F32; any other type is widened to F32 once at load, exactly). A linear runs

- decode (n <= `settings.cuda_prefill_tokens` tokens, the plan's `execution` section): the fused dequantize-matvec kernel, which reads each
  quantized block once per 8 tokens;
- prefill (more tokens): the rows dequantized into a float32 workspace, then cuBLAS GEMM.
  `batch_invariant=True` keeps every batch size on the matvec kernel instead, so a token's numbers
  never depend on what shares its batch.

Arrays at the contract's edges. The contract (backends/base.py) passes host numpy arrays, and by
default every op here returns numpy too: correct with today's runtime, with one device-to-host copy
per op. With `resident=True` every op accepts numpy or CuPy and returns CuPy, so activations never
leave the device between ops; the runtime then keeps its KV cache on the device too
(`new_kv`) and fetches only what sampling needs, once per step (see docs/04_cuda_backend.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.base import Backend, KernelSettings, TensorData
from backends.cuda.device import Device
from backends.cuda.kernels import DEVICE_TYPES
from backends.cuda.ops import KernelOps, LinearWeight, QuantMatrix, pack_rows, rope_tables, segments_of
from backends.quants import dequantize
from engine.errors import ContextOverflow, InvalidArgument, UnsupportedModel

_UPLOAD_CACHE = 64  # small index arrays (positions, ids) kept on the device by content


@dataclass
class Embedding:
    """A token-embedding table kept in its file blocks; rows are dequantized on lookup."""

    matrix: QuantMatrix

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes


class DeviceSequenceKV:
    """engine.memory.kv_cache.SequenceKV with its buffers on the device (same interface)."""

    def __init__(self, backend: CudaBackend, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int):
        cp = backend.device.cp  # resident mode only: CuPy
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = cp.empty(shape, dtype=cp.float32)
        self.v = cp.empty(shape, dtype=cp.float32)
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, start: int, k: Any, v: Any) -> None:
        end = start + k.shape[0]
        if end > self.capacity:
            raise ContextOverflow(f"sequence needs {end} cache positions but was given {self.capacity}")
        self.k[layer, :, start:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start:end] = v.transpose(1, 0, 2)

    def read(self, layer: int, end: int) -> tuple[Any, Any]:
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class CudaBackend(Backend):
    name = "cuda"
    weight_formats = ("native", "f16", "f32")

    def __init__(self, settings: KernelSettings, device: Device | None = None, resident: bool = False,
                 batch_invariant: bool = False):
        """`settings`: the plan's kernel settings (`cuda_prefill_tokens` picks the linear path).
        `device`: a CupyDevice (the default, GPU 0) or, for checks, an opencl.OpenCLDevice."""
        if device is None:
            from backends.cuda import cuda_available
            ok, reason = cuda_available()
            if not ok:
                raise InvalidArgument(f"backend 'cuda' cannot run here: {reason}", field="backend")
            from backends.cuda.device import CupyDevice
            device = CupyDevice()
        if resident and not hasattr(device, "cp"):
            raise ValueError("resident mode needs a CuPy device")
        self.settings = settings
        self.device = device
        self.ops = KernelOps(device)
        self.resident = resident
        self.batch_invariant = batch_invariant or not device.has_gemm
        self._cos: Any = None
        self._sin: Any = None
        self._neox = False
        self._weights_bytes = 0
        self._workspace: Any = None
        self._uploads: dict[bytes, Any] = {}
        self._kv: weakref.WeakSet[DeviceSequenceKV] = weakref.WeakSet()

    def configure(self, settings: KernelSettings) -> None:
        self.settings = settings

    # --- arrays at the edges -----------------------------------------------------------------

    @property
    def xp(self) -> Any:
        """The array module of this backend's results: cupy when resident, else numpy."""
        return self.device.cp if self.resident else np

    def to_host(self, a: Any) -> np.ndarray:
        """A result as a host numpy array: in resident mode, the step's one device-to-host copy."""
        return self.device.to_host(a) if self.device.is_array(a) else np.asarray(a)

    def _in(self, x: Any) -> Any:
        """A C-contiguous float32 device array of x (numpy or device)."""
        if self.device.is_array(x):
            if x.dtype != np.float32 or not x.flags.c_contiguous:
                x = self.device.cp.ascontiguousarray(x, dtype=np.float32)
            return x
        return self.device.upload(np.ascontiguousarray(x, dtype=np.float32))

    def _out(self, y: Any) -> Any:
        return y if self.resident else self.device.to_host(y)

    def _index(self, a: Any) -> Any:
        """Small int arrays (positions, token ids) as device int32, uploaded once per distinct content."""
        if self.device.is_array(a):
            return a.astype(np.int32, copy=False)
        host = np.ascontiguousarray(a, dtype=np.int32)
        key = host.tobytes()
        dev = self._uploads.get(key)
        if dev is None:
            if len(self._uploads) >= _UPLOAD_CACHE:
                self._uploads.pop(next(iter(self._uploads)))
            dev = self._uploads[key] = self.device.upload(host)
        return dev

    # --- weights -----------------------------------------------------------------------------

    def _device_rows(self, t: TensorData, fmt: str) -> tuple[T, np.ndarray]:
        """A tensor as (n_rows, row_bytes) blocks of a type the kernels read."""
        if fmt == "native" and t.qtype in DEVICE_TYPES:
            qtype, raw = t.qtype, t.raw
        elif fmt == "f16":
            qtype, raw = T.F16, dequantize(t.raw, t.qtype, t.shape).astype(np.float16)
        else:  # f32, or a native type without a kernel: widened exactly
            qtype, raw = T.F32, dequantize(t.raw, t.qtype, t.shape)
        try:
            return qtype, pack_rows(raw, qtype, t.shape)[1]
        except ValueError as e:
            raise UnsupportedModel(f"cuda backend: {e}") from None

    def load_linear(self, parts: Sequence[TensorData], fmt: str) -> LinearWeight:
        self.check_weight_format(fmt)
        n_in = parts[0].shape[1]
        segments = []
        for qtype, rows in segments_of([self._device_rows(p, fmt) for p in parts]):
            stacked = np.concatenate(rows) if len(rows) > 1 else rows[0]
            segments.append(self.ops.upload_matrix(qtype, stacked, n_in))
        w = LinearWeight(segments, n_in)
        self._weights_bytes += w.nbytes
        return w

    def load_vector(self, tensor: TensorData) -> Any:
        v = self.device.upload(dequantize(tensor.raw, tensor.qtype, tensor.shape))
        self._weights_bytes += v.nbytes
        return v

    def load_embedding(self, tensor: TensorData) -> Embedding:
        qtype, rows = self._device_rows(tensor, "native")
        table = Embedding(self.ops.upload_matrix(qtype, rows, tensor.shape[1]))
        self._weights_bytes += table.nbytes
        return table

    def tied_output(self, table: Embedding) -> LinearWeight:
        return LinearWeight([table.matrix], table.matrix.n_cols)  # the same device blocks, no copy

    # --- ops ---------------------------------------------------------------------------------

    def embedding(self, table: Embedding, ids: Any) -> Any:
        ids = self._index(ids)
        out = self.device.empty((ids.shape[0], table.matrix.n_cols), np.float32)
        if ids.shape[0]:
            self.ops.dequant_rows(table.matrix, ids, out)
        return self._out(out)

    def linear(self, x: Any, w: LinearWeight) -> Any:
        x = self._in(x)
        n = x.shape[0]
        y = self.device.empty((n, w.n_out), np.float32)
        if n == 0:
            return self._out(y)
        if n > self.settings.cuda_prefill_tokens and not self.batch_invariant:
            off = 0
            for seg in w.segments:
                part = self.device.gemm_nt(x, self._dequantized(seg))
                if len(w.segments) == 1:
                    return self._out(part)
                y[:, off:off + seg.n_rows] = part
                off += seg.n_rows
            return self._out(y)
        off = 0
        for seg in w.segments:
            self.ops.matvec(seg, x, y, w.n_out, off)
            off += seg.n_rows
        return self._out(y)

    def _dequantized(self, seg: QuantMatrix) -> Any:
        """seg as a dense (n_rows, n_cols) float32 view of the shared prefill workspace."""
        size = seg.n_rows * seg.n_cols
        if self._workspace is None or self._workspace.size < size:
            self._workspace = None  # free the old one before the larger allocation
            self._workspace = self.device.empty((size,), np.float32)
        out = self._workspace[:size].reshape(seg.n_rows, seg.n_cols)
        self.ops.dequant_rows(seg, self._index(np.arange(seg.n_rows)), out)
        return out

    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        return self._out(self.ops.rms_norm(self._in(x), w, eps))

    def check_model(self, config: Any, variants: Sequence[str]) -> None:
        # the device kernels compute the plain llama decoder (either RoPE pairing) only
        if variants:
            raise UnsupportedModel(f"the cuda backend does not compute {', '.join(variants)} "
                                   f"({config.architecture}); run this model on the cpu backend")

    def configure_rope(self, dim: int, theta: float, style: str, max_positions: int,
                       freq_scale: float = 1.0, freq_factors: Any = None, yarn: Any = None) -> None:
        if freq_scale != 1.0 or freq_factors is not None or yarn is not None:  # check_model refuses these models first
            raise UnsupportedModel("the cuda backend does not compute scaled rope")
        cos, sin = rope_tables(dim, theta, max_positions)
        self._cos, self._sin = self.device.upload(cos), self.device.upload(sin)
        self._neox = style == "neox"

    def rope(self, x: Any, positions: Any, table: Any = None) -> Any:
        assert self._cos is not None, "configure_rope first"
        n, heads, hd = x.shape
        if n == 0:
            return x
        if self.device.is_array(x) and x.dtype == np.float32 and x.strides[1:] == (hd * 4, 4):
            row_stride = x.strides[0] // 4  # a q or k slice of the fused qkv row, read in place
        else:
            x = self._in(x)
            row_stride = heads * hd
        y = self.ops.rope(x, 0, row_stride, n, heads, hd, self._index(positions), self._cos, self._sin, self._neox)
        return self._out(y)

    def attention(self, q: Any, k: Any, v: Any, q_positions: Any, window: int = 0) -> Any:
        if window:  # check_model refuses sliding-window models first
            raise UnsupportedModel("the cuda backend does not compute sliding-window attention")
        hd = q.shape[2]
        n_kv, t, _ = k.shape
        k, head_stride = self._kv_view(k)
        v, v_stride = self._kv_view(v)
        if v_stride != head_stride:  # k and v laid out differently: copy both to (n_kv, t, hd)
            k, v, head_stride = self._in(k), self._in(v), t * hd
        table = self._index(np.zeros(1, np.int32))  # the whole sequence is one block
        out = self.ops.attention(self._in(q), k, v, table, max(t, 1), 0, head_stride, n_kv,
                                 self._index(q_positions))
        return self._out(out)

    def _kv_view(self, k: Any) -> tuple[Any, int]:
        """k (n_kv, t, hd) as a device array whose positions are contiguous, and its head stride."""
        _, t, hd = k.shape
        if self.device.is_array(k) and k.dtype == np.float32 and k.strides[1:] == (hd * 4, 4):
            return k, k.strides[0] // 4  # a view into a DeviceSequenceKV: no copy
        return self._in(k), t * hd

    def paged_attention(self, q: Any, k_pool: Any, v_pool: Any, block_table: Any, q_positions: Any) -> Any:
        """Attention over a paged cache: pools (n_blocks, n_kv_heads, block_size, head_dim) on the device,
        `block_table` (n,) the sequence's blocks in position order."""
        n_kv, block_size, hd = k_pool.shape[1:]
        out = self.ops.attention(self._in(q), k_pool, v_pool, self._index(block_table), block_size,
                                 n_kv * block_size * hd, block_size * hd, n_kv, self._index(q_positions))
        return self._out(out)

    def silu_mul(self, gate_up: Any) -> Any:
        return self._out(self.ops.silu_mul(self._in(gate_up)))

    # --- sampling on the device ---------------------------------------------------------------

    def top_k(self, logits: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k best logits per row (highest first, ties to the lowest id), their ids, and each
        row's log-sum-exp, on the host: the step's one synchronisation, k + 1 floats a row instead
        of the vocabulary. k = 1 is greedy decoding."""
        logits = self._in(logits)
        if not 1 <= k <= logits.shape[1]:
            raise InvalidArgument(f"top-k of {k} must be in 1..{logits.shape[1]}", field="top_k")
        vals, ids, lse = self.ops.top_k(logits, k)
        return self.device.to_host(vals), self.device.to_host(ids), self.device.to_host(lse)

    def greedy(self, logits: Any) -> np.ndarray:
        """argmax per row, ties to the lowest id (the host sampler's greedy rule)."""
        return self.top_k(logits, 1)[1][:, 0]

    # --- memory ------------------------------------------------------------------------------

    def holds_cache(self, kv: Any) -> bool:
        return isinstance(kv, DeviceSequenceKV)

    def new_kv(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int) -> DeviceSequenceKV:
        """A sequence's KV cache in device memory (resident mode)."""
        if not self.resident:
            raise ValueError("new_kv is for resident mode; the host runtime keeps its own SequenceKV")
        kv = DeviceSequenceKV(self, n_layers, n_kv_heads, head_dim, capacity)
        self._kv.add(kv)
        return kv

    def memory_stats(self) -> dict[str, int]:
        """Device bytes by purpose: weights, KV cache, workspace (prefill GEMM, RoPE tables, indices)."""
        workspace = sum(a.nbytes for a in (self._workspace, self._cos, self._sin) if a is not None)
        workspace += sum(a.nbytes for a in self._uploads.values())
        stats = {"weights_bytes": self._weights_bytes, "kv_bytes": sum(kv.nbytes for kv in self._kv),
                 "workspace_bytes": workspace}
        if hasattr(self.device, "memory_info"):
            stats.update(self.device.memory_info())
        return stats

    def close(self) -> None:
        self._workspace = self._cos = self._sin = None
        self._uploads.clear()
        if hasattr(self.device, "release"):
            self.device.release()
