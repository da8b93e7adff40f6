"""Quantized-resident weights on the CPU: the `native` and `q8_0` weight formats.

A `QuantizedLinear` holds W as GGML blocks -- the file's own (`native`) or requantized to
Q8_0 at load (`q8_0`), repacked 8 rows interleaved (the x8 layout, the same bytes) for the
kernels -- and `QuantizedMatmul` computes `x @ W.T` by one of two
declared paths:

- **quantized dot** (batch below the GEMM threshold): the `ops_avx2` C kernels quantize
  each activation row to int8 -- one scale per 32 weights (llama.cpp's Q8_0 / Q8_1), or per 256
  for a matrix with K-quant (256-weight super-block) parts, llama.cpp's Q8_K granularity:
  `activation_block` -- and take integer dot products against the weight blocks. Reads ~4.5 bits a weight: decode is no longer
  bound by streaming float32 weights. Numerics: those of llama.cpp (int8 activations).
- **dequantize-into-GEMM** (batch at or above the threshold, and every batch without the
  extension): a tile of W is dequantized to float32 scratch and multiplied with
  OpenBLAS. The activations stay float32, so the numerics are those of f32 weights (the
  hf_f32 reference).

The threshold is a declared rule: the plan's `execution.gemm_rows_x8` (`KernelSettings`; the
measured default and why are in engine/execution.py).

The kernels need the C extension built at install (`setup.py`) and a CPU with AVX2,
FMA and F16C; otherwise `kernels="auto"` falls back to numpy (every batch
dequantize-into-GEMM) with a logged warning. docs/03_quantized_cpu.md has the numbers.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.base import KernelSettings, TensorData
from backends.cpu import invariant
from backends.quants import EXACT_IN_Q8_0, dequantize, quant_type, widen_to_q8_0
from engine.errors import InvalidArgument

log = logging.getLogger(__name__)

# Block types the quantized-dot kernels read directly: every block type backends/quants.py
# decodes. Each is repacked at load into the x8 layout (8 rows interleaved, x8.h) the kernels
# read. Float tensors (F32/F16/BF16) stay dense float32; `q8_0` requantizes on request.
KERNEL_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
X8_TYPES = KERNEL_TYPES

# Weights dequantized per GEMM tile: 8 MB of float32 scratch, so the 28M-weight output
# head of a 135M model never becomes a 113 MB temporary.
GEMM_TILE_WEIGHTS = 1 << 21

KERNELS = ("auto", "avx2", "numpy")


def _load_extension() -> tuple[Any, str]:
    """The `_ops_avx2` module if it is built and this CPU can run it; else (None, why not)."""
    try:
        from backends.cpu import _ops_avx2  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the C extension backends.cpu._ops_avx2 is not built ({exc})"
    if not _ops_avx2.have_avx2():
        return None, "this CPU lacks AVX2/FMA/F16C"
    return _ops_avx2, ""


_EXTENSION, _WHY_NOT = _load_extension()
_fallback_warned = False


def _warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        log.warning("CPU backend on the numpy fallback (quantized weights: dequantize-into-GEMM at every batch, "
                    "much slower decode): %s", _WHY_NOT)


def extension_status() -> str:
    """One line for logs and `bench`: which kernels this process can use."""
    if _EXTENSION is None:
        return f"numpy fallback: {_WHY_NOT}"
    return "avx512-vnni kernels" if _EXTENSION.use_vnni(True) else "avx2 kernels"


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BlockPart:
    """One stored (rows, n_in) matrix in a block format.

    layout "rows": the file's order, (rows, row_bytes) uint8. layout "x8": the same blocks with
    8 rows interleaved (ops_avx2/x8.h), flat uint8, rows padded to a multiple of 8; the int8
    kernels read it 8 rows per register (every block type).
    """

    blocks: np.ndarray
    qtype: T
    rows: int
    layout: str = "rows"
    source: T | None = None  # the file's type when the blocks were requantized from it


@dataclass
class QuantizedLinear:
    """W (n_out, n_in) as block parts stacked along the output axis (fused q/k/v, gate/up).

    `matrix` is the C extension's handle over the same bytes (None on the numpy path).
    """

    parts: tuple[BlockPart, ...]
    n_in: int
    n_out: int
    matrix: Any = None
    # the matrix that followed this one last time (QuantizedMatmul._prefetch); weak, so a model's
    # matrices never form a cycle that would outlive its unloading
    next: weakref.ref | None = field(default=None, repr=False, compare=False)

    @property
    def layout(self) -> str:
        """The kernel family: "x8" when every part is interleaved, else "rows"."""
        return "x8" if all(p.layout == "x8" for p in self.parts) else "rows"

    @property
    def nbytes(self) -> int:
        return sum(p.blocks.nbytes for p in self.parts)

    @property
    def qtypes(self) -> tuple[str, ...]:
        return tuple(p.qtype.name for p in self.parts)


@dataclass
class BlockTable:
    """An embedding table kept in the file's blocks; rows are dequantized when looked up.

    With a tied output head, lookups read the head's resident copy (`head`), so the file's
    pages for the table are never touched again after loading.
    """

    blocks: np.ndarray | None  # (vocab, row_bytes) uint8; None once `head` serves the lookups
    qtype: T
    shape: tuple[int, int]
    head: QuantizedLinear | None = None

    def attach_head(self, head: QuantizedLinear) -> None:
        """Serve lookups from the output head's resident copy when it holds the same blocks."""
        if head.matrix is not None and head.parts[0].qtype == self.qtype:
            self.head = head
            self.blocks = None  # one resident copy of the table

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.head is not None:
            out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
            _EXTENSION.dequantize_ids(self.head.matrix, np.ascontiguousarray(ids, dtype=np.int64), out)
            return out
        return dequantize(self.blocks[ids], self.qtype, (len(ids), self.shape[1]))


# --- requantization to Q8_0 -------------------------------------------------

def as_blocks(raw: np.ndarray, rows: int) -> np.ndarray:
    """A tensor's bytes as (rows, row_bytes) uint8, without a copy."""
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(rows, -1)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 (rows, k) -> Q8_0 blocks (rows, k / 32 * 34): llama.cpp's reference rounding."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.shape
    if _EXTENSION is None:
        from gguf.quants import quantize
        return quantize(x, T.Q8_0).reshape(rows, -1)
    out = np.empty((rows, k // 32 * 34), dtype=np.uint8)
    _EXTENSION.quantize_q8_0(x, out, default_threads())
    return out


def _requantize_q8_0(t: TensorData) -> BlockPart:
    """Any tensor -> Q8_0 rows, a block of rows at a time (float32 temporaries stay small).
    Q5_0 and IQ4_NL are widened exactly (the same scale and integers); others rounded."""
    rows, k = t.shape
    src = as_blocks(t.raw, rows)
    out = np.empty((rows, k // 32 * 34), dtype=np.uint8)
    step = max(1, GEMM_TILE_WEIGHTS // k)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        if T(t.qtype) in EXACT_IN_Q8_0:
            out[lo:hi] = widen_to_q8_0(src[lo:hi], T(t.qtype))
        else:
            out[lo:hi] = quantize_q8_0(dequantize(src[lo:hi], t.qtype, (hi - lo, k)))
        if _EXTENSION is not None:
            _EXTENSION.release_pages(src[lo:hi])  # the file's pages are not needed again
    return BlockPart(out, T.Q8_0, rows, source=T(t.qtype))


def _check_shape(t: TensorData) -> None:
    if len(t.shape) != 2 or t.shape[1] % 32:
        raise InvalidArgument(f"a quantized-resident weight needs (rows, k) with k a multiple of 32, "
                              f"got {t.shape}", field="weights")


_warned_requant: set[str] = set()


def native_form(qtype: T | int) -> str:
    """What the `native` format keeps of a tensor of this type on the CPU (`inspect` and `bench`
    say it): the file's own blocks, repacked into the x8 layout for the int8 kernels, or float32."""
    qtype = T(qtype)
    if qtype in FLOAT_TYPES:
        return "float32"
    if qtype in KERNEL_TYPES:
        return "own blocks (x8 repack)"
    return "requantized to Q8_0"


def describe_part(part: BlockPart) -> str:
    """One resident part as `bench` reports it: "Q4_K (x8)", "F16 -> Q8_0 (x8)"."""
    name = part.qtype.name if part.source in (None, part.qtype) else f"{part.source.name} -> {part.qtype.name}"
    return f"{name} ({part.layout})"


def block_part(t: TensorData, fmt: str) -> BlockPart:
    """One weight tensor in weight format `fmt` ("native" or "q8_0") as blocks a kernel reads."""
    _check_shape(t)
    qtype = T(t.qtype)
    if fmt == "native" and qtype in KERNEL_TYPES and t.shape[1] % quant_type(qtype).block_size == 0:
        return BlockPart(as_blocks(t.raw, t.shape[0]), qtype, t.shape[0])
    if qtype == T.Q8_0:  # already what q8_0 asks for: keep the file's bytes
        return BlockPart(as_blocks(t.raw, t.shape[0]), qtype, t.shape[0])
    if fmt == "native" and qtype in EXACT_IN_Q8_0:
        pass  # widened exactly: the same weights, computed as llama.cpp does (int8 x Q8_0 activations)
    elif fmt == "native" and qtype.name not in _warned_requant:
        _warned_requant.add(qtype.name)
        log.warning("native weights: %s tensors in a quantized matrix are requantized to Q8_0 (bench reports it)",
                    qtype.name)
    return _requantize_q8_0(t)


# --- the matmul -------------------------------------------------------------

class QuantizedMatmul:
    """`x @ W.T` for block-format weights, on the path the declared rule picks.

    kernels: "avx2" (require the C extension), "numpy" (never use it) or "auto" (use it when
    built and the CPU has AVX2, else numpy with a warning). settings: the plan's kernel
    settings; a batch of at least `gemm_rows_x8` rows is dequantized into float32 tiles and
    multiplied with OpenBLAS, a smaller one takes the int8 kernels (0: never GEMM); `threads`
    sizes the kernels' pool.
    """

    def __init__(self, kernels: str, settings: KernelSettings):
        if kernels not in KERNELS:
            raise InvalidArgument(f"kernels {kernels!r} is not one of {', '.join(KERNELS)}", field="kernels")
        if kernels == "avx2" and _EXTENSION is None:
            raise InvalidArgument(f"kernels 'avx2' unavailable: {_WHY_NOT}", field="kernels")
        if kernels == "auto" and _EXTENSION is None:
            _warn_fallback_once()
        self.ops = None if kernels == "numpy" else _EXTENSION
        self.kernels = "avx2" if self.ops is not None else "numpy"
        self.configure(settings)
        self._scratch = np.empty(0, dtype=np.float32)
        self._prev: weakref.ref | None = None  # the last matrix multiplied (weak: it may be unloaded)
        self.resident: dict[str, int] = {}  # tensors loaded, by resident form ("Q4_K (x8)"): what bench reports

    def configure(self, settings: KernelSettings) -> None:
        """New settings, used from the next call."""
        self.settings = settings
        self.threads = settings.threads or default_threads()

    def threshold(self, w: QuantizedLinear) -> int | None:
        """Rows from which a batch against w takes dequantize-into-GEMM (None: never)."""
        return self.settings.gemm_rows_x8 or None

    def handle(self, parts: Sequence[BlockPart], n_in: int) -> QuantizedLinear:
        """The weight handle for parts in the file's row order.

        With the kernels, every part is repacked into the x8 layout (a copy of the same bytes)
        and the source pages of a read-only file mapping are released from the resident set at
        once, so resident memory stays one copy of the weights.
        """
        if self.ops is not None:
            parts = [self._repack(p, n_in) if p.qtype in X8_TYPES else p for p in parts]
        parts = tuple(parts)
        for p in parts:
            self.resident[describe_part(p)] = self.resident.get(describe_part(p), 0) + 1
        w = QuantizedLinear(parts, n_in, sum(p.rows for p in parts))
        if self.ops is not None:
            w.matrix = self.ops.matrix([(p.blocks, int(p.qtype), p.rows, p.layout == "x8") for p in parts], n_in)
        return w

    # Rows repacked at a time: the file pages of a chunk are released before the next is
    # read, so loading never holds much more than one copy of a tensor.
    REPACK_ROWS = 2048

    def _repack(self, part: BlockPart, n_in: int) -> BlockPart:
        qtype = int(part.qtype)
        out = np.empty(self.ops.x8_bytes(qtype, part.rows, n_in), dtype=np.uint8)
        group_bytes = self.ops.x8_bytes(qtype, 8, n_in)
        for lo in range(0, part.rows, self.REPACK_ROWS):  # a multiple of 8: chunks start on a group
            hi = min(part.rows, lo + self.REPACK_ROWS)
            src = part.blocks[lo:hi]
            dst = out[lo // 8 * group_bytes:-(-hi // 8) * group_bytes]
            self.ops.repack_x8(src, qtype, hi - lo, n_in, dst, self.threads)
            self.ops.release_pages(src)  # read-only mappings only; a no-op on owned arrays
        return BlockPart(out, part.qtype, part.rows, "x8", part.source)

    def path(self, n: int, w: QuantizedLinear, batch_invariant: bool = False) -> str:
        """The path a batch of n rows against w takes: "quantized_dot" or "dequant_gemm".

        batch_invariant (the plan's determinism): the int8 kernels compute every row alike
        whatever its batch mates, OpenBLAS does not, so they take every batch size.
        """
        if self.ops is None:
            return "dequant_gemm"
        limit = self.threshold(w)
        return "quantized_dot" if batch_invariant or limit is None or n < limit else "dequant_gemm"

    def linear(self, x: np.ndarray, w: QuantizedLinear, batch_invariant: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], w.n_out), dtype=np.float32)
        if self.path(x.shape[0], w, batch_invariant) == "quantized_dot":
            self.ops.matmul(x, w.matrix, out, self.threads, *self._prefetch(w))
        else:
            self._dequant_gemm(x, w, out, batch_invariant)
        return out

    def ran(self, first: QuantizedLinear, last: QuantizedLinear | None = None) -> None:
        """Record matrices multiplied in order (first .. last: a fused decode layer's four): the
        read-ahead chain learns `first` as the successor of the matrix before."""
        prev = self._prev() if self._prev is not None else None
        if prev is not None and prev is not first and (prev.next is None or prev.next() is not first):
            prev.next = weakref.ref(first)
        self._prev = weakref.ref(last if last is not None else first)

    def _prefetch(self, w: QuantizedLinear) -> tuple[Any, int]:
        """What the pool reads ahead after w: the matrix that followed w last time, as matmuls
        come in the same order every step (layer by layer, then the head, then layer 0)."""
        self.ran(w)
        budget = self.settings.prefetch_next_kib * 1024
        nxt = w.next() if w.next is not None else None
        return (nxt.matrix, budget) if budget and nxt is not None and nxt.matrix is not None else (None, 0)

    def dequantize_rows(self, w: QuantizedLinear, lo: int, hi: int, out: np.ndarray) -> None:
        """W[lo:hi] as float32 into out (hi - lo, n_in)."""
        if self.ops is not None:
            self.ops.dequantize(w.matrix, lo, hi, out, self.threads)
            return
        assert all(p.layout == "rows" for p in w.parts), "x8 parts are read by the extension only"
        start = 0
        for p in w.parts:  # the parts overlapping [lo, hi), each through backends.quants (file order)
            a, b = max(lo, start), min(hi, start + p.rows)
            if a < b:
                out[a - lo:b - lo] = dequantize(p.blocks[a - start:b - start], p.qtype, (b - a, w.n_in))
            start += p.rows

    def _dequant_gemm(self, x: np.ndarray, w: QuantizedLinear, out: np.ndarray, batch_invariant: bool) -> None:
        tile_rows = max(8, GEMM_TILE_WEIGHTS // w.n_in // 8 * 8)  # whole x8 groups
        if self._scratch.size < min(tile_rows, w.n_out) * w.n_in:
            self._scratch = np.empty(min(tile_rows, w.n_out) * w.n_in, dtype=np.float32)
        for lo in range(0, w.n_out, tile_rows):
            hi = min(w.n_out, lo + tile_rows)
            tile = self._scratch[:(hi - lo) * w.n_in].reshape(hi - lo, w.n_in)
            self.dequantize_rows(w, lo, hi, tile)
            if self.ops is not None:
                self.ops.park()  # the pool's spinning worker would take a core from OpenBLAS
            if batch_invariant:  # the numpy fallback: OpenBLAS on fixed row tiles
                out[:, lo:hi] = invariant.tiled_matmul(x, tile.T)
            else:
                np.matmul(x, tile.T, out=out[:, lo:hi])


# --- numpy references (tests, docs) -------------------------------------------

def activation_block(qtypes: Sequence[T | int]) -> int:
    """Weights per activation scale for a matrix of parts of these types: 256 (llama.cpp's Q8_K
    granularity, which it uses for every K-quant) when any part has 256-weight super-blocks --
    their AVX2 kernels then sum a super-block in int32 and scale it once (x8_kernels.h) -- else
    32 (Q8_0's). The C side decides the same (ops_act_sblocks)."""
    return 256 if any(quant_type(t).block_size == 256 for t in qtypes) else 32


def quantize_activations(x: np.ndarray, per: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the kernels do to an activation row, in numpy: (q int8, d, s, isum) per 32-block.

    q = round-half-even(x * 127 / max|x|), the max over `per` weights (32 or 256:
    activation_block), d = max|x| / 127 -- rounded through fp16 for per 32 (llama.cpp's Q8_0 /
    Q8_1), float32 for 256 (Q8_K's) -- repeated for each 32-block; isum = sum(q) and s = d * isum
    per 32-block (the Q4_1 min term's block sum; Q8_1 rounds it to fp16).
    """
    x = np.asarray(x, dtype=np.float32)
    n, k = x.shape
    groups = x.reshape(n, k // per, per)
    amax = np.abs(groups).max(axis=-1)
    dd = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(groups * inv[..., None]).astype(np.int8).reshape(n, k // 32, 32)
    isum = q.sum(axis=-1, dtype=np.int32)
    d = np.repeat(dd.astype(np.float16).astype(np.float32) if per == 32 else dd, per // 32, axis=1)
    return q.reshape(n, k), d, d * isum.astype(np.float32), isum
