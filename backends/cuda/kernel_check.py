"""Kernel checks that need no GPU: NVRTC compilation, execution on PoCL, races under Oclgrind.

Each check yields rows of one table, kernel × weight type × shape × check → pass/fail:

- `nvrtc sm_80`, `nvrtc sm_90`: every kernel of every program compiles through NVRTC with
  `--ptxas-options=-v`, with no warning and no register spill (registers are reported);
- `pocl`: the kernels run on the CPU as OpenCL through the CUDA backend's own launch code
  (`ops.KernelOps`) and match numpy oracles (`backends.quants`, the float64 `ref_*` below) on awkward
  shapes: one row, non-power-of-two sizes, many blocks, every weight type;
- `oclgrind`: small shapes again under Oclgrind with data-race and uninitialised-value detection,
  in a child process with its own log; Oclgrind exits 0 whatever it finds, so a row passes only when
  the log is empty.

`python -m backends.cuda.kernel_check` prints the table (`--only nvrtc,pocl,oclgrind`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.cuda.dialect import render
from backends.cuda.kernels import DEVICE_TYPES, ProgramSpec, all_programs
from backends.cuda.ops import KernelOps, pack_rows, rope_tables
from backends.quants import quant_type

ARCHS = ("sm_80", "sm_90")
NVRTC_CHECK_OPTIONS = ["-std=c++17", "--diag-suppress=177", "--ptxas-options=-v"]

# Offsets of the f16 scale fields in each block type: random bytes elsewhere are valid codes,
# random bytes here could be NaN or infinity.
_F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
               T.Q2_K: (80, 82), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}

MATVEC_TOLERANCE = 1e-5  # |error| / (|x| @ |W|.T), float32 sums in another order
OP_TOLERANCE = 1e-5


@dataclass
class Row:
    kernel: str
    qtype: str
    shape: str
    check: str
    passed: bool
    detail: str = ""


# --- tooling --------------------------------------------------------------------------------

def nvrtc_available() -> tuple[bool, str]:
    try:
        from cupy.cuda import nvrtc
        major, minor = nvrtc.getVersion()
        return True, f"NVRTC {major}.{minor}"
    except Exception as e:  # noqa: BLE001 -- ImportError, or the shared library not found
        return False, f"NVRTC unavailable (pip install 'plan-engine[kernels-check]'): {e}"


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, row_bytes) tensor of `qtype`: random codes, finite random scales."""
    if qtype == T.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    qt = quant_type(qtype)
    n_blocks = rows * cols // qt.block_size
    blocks = rng.integers(0, 256, size=(n_blocks, qt.type_size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = (rng.uniform(0.002, 0.05, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


# --- NVRTC ----------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def nvrtc_compile(spec: ProgramSpec, arch: str) -> tuple[dict[str, dict[str, int]], str]:
    """Compile one program to a cubin for `arch`; per kernel: registers, stack, spills. And the log."""
    from cupy.cuda import nvrtc
    src = render(spec.source, "cuda", spec.defines)
    prog = nvrtc.createProgram(src, f"{spec.name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *NVRTC_CHECK_OPTIONS])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{spec.name} for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog).rstrip("\x00")
        nvrtc.getCUBIN(prog)  # the SASS exists, not only PTX
    finally:
        nvrtc.destroyProgram(prog)
    stats: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = stats.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
    return stats, log


def nvrtc_rows(archs: Iterable[str] = ARCHS) -> list[Row]:
    rows = []
    for spec in all_programs():
        qtype = spec.name.removeprefix("quant_") if spec.name.startswith("quant_") else "-"
        for arch in archs:
            try:
                stats, log = nvrtc_compile(spec, arch)
            except RuntimeError as e:
                rows += [Row(k, qtype, "-", f"nvrtc {arch}", False, str(e)[:300]) for k in spec.kernels]
                continue
            warnings = [ln for ln in log.splitlines() if "warning" in ln]
            for k in spec.kernels:
                s = stats.get(k)
                if s is None:
                    rows.append(Row(k, qtype, "-", f"nvrtc {arch}", False, "entry point not in the ptxas report"))
                    continue
                spills = s.get("spill_stores", -1) + s.get("spill_loads", -1)
                ok = spills == 0 and not warnings
                detail = f"{s.get('registers')} regs, stack {s.get('stack')} B, spills {spills} B"
                rows.append(Row(k, qtype, "-", f"nvrtc {arch}", ok, detail + (f"; {warnings[0]}" if warnings else "")))
    return rows


# --- execution against numpy ----------------------------------------------------------------
# Each case: (kernel, weight type, shape label, function(ops, rng) -> (passed, detail)).

Case = tuple[str, str, str, Callable[[KernelOps, np.random.Generator], tuple[bool, str]]]


def _rel_err(got: np.ndarray, ref: np.ndarray, scale: np.ndarray | float) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref) / np.maximum(scale, 1e-30))) if got.size else 0.0


def _matvec_case(qtype: T, rows: int, blocks: int, n: int) -> Case:
    dt = DEVICE_TYPES[qtype]
    cols = blocks * dt.block_size

    def run(ops: KernelOps, rng: np.random.Generator) -> tuple[bool, str]:
        from backends.quants import dequantize
        raw = random_blocks(qtype, rows, cols, rng)
        w = dequantize(raw, qtype, (rows, cols)).astype(np.float64)
        m = ops.upload_matrix(qtype, pack_rows(raw, qtype, (rows, cols))[1], cols)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        # written into a wider output at a column offset, as a fused q|k|v segment is
        ld_y, y_off = rows + 5, 3
        y = ops.device.upload(np.full((n, ld_y), np.nan, np.float32))
        ops.matvec(m, ops.device.upload(x), y, ld_y, y_off)
        got = ops.device.to_host(y)
        untouched = np.isnan(got[:, :y_off]).all() and np.isnan(got[:, y_off + rows:]).all()
        err = _rel_err(got[:, y_off:y_off + rows], x @ w.T, np.abs(x) @ np.abs(w).T)
        return err < MATVEC_TOLERANCE and untouched, f"rel err {err:.1e}" + ("" if untouched else ", wrote outside")

    kernel = f"matvec{1 if n == 1 else 8}_{dt.name}"
    return kernel, dt.name, f"{rows}x{cols} ({blocks} blk) n={n}", run


def _dequant_case(qtype: T, rows: int, blocks: int, ids: list[int]) -> Case:
    dt = DEVICE_TYPES[qtype]
    cols = blocks * dt.block_size

    def run(ops: KernelOps, rng: np.random.Generator) -> tuple[bool, str]:
        from backends.quants import dequantize
        raw = random_blocks(qtype, rows, cols, rng)
        ref = dequantize(raw, qtype, (rows, cols))[ids]
        m = ops.upload_matrix(qtype, pack_rows(raw, qtype, (rows, cols))[1], cols)
        out = ops.device.empty((len(ids), cols), np.float32)
        ops.dequant_rows(m, ops.device.upload(np.array(ids, np.int32)), out)
        got = ops.device.to_host(out)
        same = np.array_equal(got.view(np.uint32), ref.view(np.uint32))
        return same, "bit-exact vs backends.quants" if same else f"max diff {np.abs(got - ref).max():.1e}"

    return f"dequant_{dt.name}", dt.name, f"{rows}x{cols} rows {ids}", run


# Plain float64 numpy references, written from the formulas (the numpy backend's ops, minus its
# performance work), so that these checks do not move when the CPU backend does.

def ref_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ref_rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    half = cos.shape[1]
    c, s = cos[positions][:, None, :].astype(np.float64), sin[positions][:, None, :].astype(np.float64)
    out = x.astype(np.float64)
    i0, i1 = (np.arange(half), np.arange(half) + half) if neox else (np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2))
    x0, x1 = out[..., i0].copy(), out[..., i1].copy()
    out[..., i0], out[..., i1] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def ref_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal GQA: q (n, H, hd) at `positions` over k, v (n_kv, t, hd) -> (n, H * hd)."""
    n, heads, hd = q.shape
    group = heads // k.shape[0]
    kk, vv = np.repeat(k, group, 0).astype(np.float64), np.repeat(v, group, 0).astype(np.float64)
    scores = np.einsum("nhd,htd->nht", q.astype(np.float64), kk) / np.sqrt(hd)
    scores = np.where(np.arange(k.shape[1])[None, None, :] > positions[:, None, None], -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nht,htd->nhd", p, vv).reshape(n, heads * hd)


def ref_silu_mul(gate_up: np.ndarray) -> np.ndarray:
    f = gate_up.shape[-1] // 2
    g, u = gate_up[:, :f].astype(np.float64), gate_up[:, f:].astype(np.float64)
    return g / (1.0 + np.exp(-g)) * u


def _rms_norm_case(n: int, d: int) -> Case:
    def run(ops, rng):
        x = rng.standard_normal((n, d)).astype(np.float32) * 3
        w = rng.standard_normal(d).astype(np.float32)
        got = ops.device.to_host(ops.rms_norm(ops.device.upload(x), ops.device.upload(w), 1e-5))
        err = _rel_err(got, ref_rms_norm(x, w, 1e-5), np.abs(got).max())
        return err < OP_TOLERANCE, f"rel err {err:.1e}"
    return "rms_norm", "f32", f"{n}x{d}", run


def _rope_case(n: int, heads: int, hd: int, rope_dim: int, style: str, row_pad: int) -> Case:
    def run(ops, rng):
        cos, sin = rope_tables(rope_dim, 10000.0, 512)
        positions = rng.choice(512, n, replace=False).astype(np.int64)
        # the heads sit inside wider rows at an offset, as q or k inside a fused qkv row
        wide = rng.standard_normal((n, heads * hd + row_pad)).astype(np.float32)
        off = row_pad // 2
        x = wide[:, off:off + heads * hd].reshape(n, heads, hd)
        dev = ops.device
        got = dev.to_host(ops.rope(dev.upload(wide), off, wide.shape[1], n, heads, hd,
                                   dev.upload(positions.astype(np.int32)), dev.upload(cos), dev.upload(sin),
                                   style == "neox"))
        err = _rel_err(got, ref_rope(x, positions, cos, sin, style == "neox"), 1.0)
        return err < OP_TOLERANCE, f"abs err {err:.1e}"
    return "rope", "f32", f"{style} n={n} {heads}x{hd} rot {rope_dim} pad {row_pad}", run


def _silu_case(n: int, f: int) -> Case:
    def run(ops, rng):
        gu = (rng.standard_normal((n, 2 * f)) * 4).astype(np.float32)
        got = ops.device.to_host(ops.silu_mul(ops.device.upload(gu)))
        ref = ref_silu_mul(gu)
        err = _rel_err(got, ref, np.abs(ref) + 1e-3)
        return err < OP_TOLERANCE, f"rel err {err:.1e}"
    return "silu_mul", "f32", f"{n}x{f}", run


def _attention_case(n: int, start: int, heads: int, kv_heads: int, hd: int, page: int = 0) -> Case:
    """n queries at positions start..start+n-1 over start+n keys; page > 0: a shuffled paged cache."""
    def run(ops, rng):
        t = start + n
        q = rng.standard_normal((n, heads, hd)).astype(np.float32)
        k = rng.standard_normal((kv_heads, t, hd)).astype(np.float32)
        v = rng.standard_normal((kv_heads, t, hd)).astype(np.float32)
        positions = np.arange(start, t)
        ref = ref_attention(q, k, v, positions)
        dev = ops.device
        if page:
            n_pages = -(-t // page)
            table = rng.permutation(n_pages + 2)[:n_pages].astype(np.int32)  # pool has spare blocks
            pool_k = rng.standard_normal((n_pages + 2, kv_heads, page, hd)).astype(np.float32)
            pool_v = rng.standard_normal((n_pages + 2, kv_heads, page, hd)).astype(np.float32)
            for p in range(t):
                pool_k[table[p // page], :, p % page] = k[:, p]
                pool_v[table[p // page], :, p % page] = v[:, p]
            args = (dev.upload(pool_k), dev.upload(pool_v), dev.upload(table), page,
                    kv_heads * page * hd, page * hd)
        else:
            args = (dev.upload(k), dev.upload(v), dev.upload(np.zeros(1, np.int32)), t, 0, t * hd)
        got = dev.to_host(ops.attention(dev.upload(q), *args, kv_heads, dev.upload(positions.astype(np.int32))))
        err = _rel_err(got, ref, 1.0)
        return err < OP_TOLERANCE, f"abs err {err:.1e}"
    label = f"n={n} at {start} H={heads}/{kv_heads} hd={hd}" + (f" paged {page}" if page else "")
    return "attention", "f32", label, run


def _top_k_case(rows: int, vocab: int, k: int) -> Case:
    def run(ops, rng):
        # coarse values so that ties occur and must go to the lowest id
        logits = (np.round(rng.standard_normal((rows, vocab)) * 8) / 4).astype(np.float32)
        vals, ids, lse = (ops.device.to_host(a) for a in ops.top_k(ops.device.upload(logits), k))
        ref_ids = np.stack([np.lexsort((np.arange(vocab), -row))[:k] for row in logits])
        ref_lse = np.log(np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        ok = np.array_equal(ids, ref_ids) and np.array_equal(vals, np.take_along_axis(logits, ref_ids, 1))
        err = float(np.abs(lse - ref_lse).max())
        return ok and err < 1e-4, ("ids/values exact" if ok else "ids differ") + f", lse err {err:.1e}"
    return "top_k", "f32", f"{rows}x{vocab} k={k}", run


def pocl_cases() -> list[Case]:
    cases: list[Case] = []
    for qtype in DEVICE_TYPES:
        cases += [_matvec_case(qtype, 1, 1, 1), _matvec_case(qtype, 7, 3, 3), _matvec_case(qtype, 67, 37, 11),
                  _dequant_case(qtype, 5, 3, [4, 0, 4, 2])]
    cases += [_rms_norm_case(1, 32), _rms_norm_case(3, 576), _rms_norm_case(5, 1000),
              _rope_case(1, 1, 64, 64, "interleaved", 0), _rope_case(5, 3, 64, 64, "interleaved", 7),
              _rope_case(4, 2, 80, 48, "interleaved", 3), _rope_case(3, 3, 64, 64, "neox", 5),
              _rope_case(2, 2, 96, 64, "neox", 0),
              _silu_case(1, 7), _silu_case(9, 1536),
              _attention_case(1, 0, 1, 1, 64), _attention_case(1, 199, 9, 3, 64),
              _attention_case(37, 0, 4, 2, 80), _attention_case(5, 130, 6, 2, 256),
              _attention_case(3, 60, 4, 1, 64, page=16), _attention_case(20, 0, 2, 2, 128, page=7),
              _top_k_case(1, 1000, 1), _top_k_case(3, 49152, 40), _top_k_case(2, 33, 33)]
    return cases


def oclgrind_cases() -> list[Case]:
    cases: list[Case] = []
    for qtype in DEVICE_TYPES:
        cases += [_matvec_case(qtype, 5, 2, 1), _matvec_case(qtype, 5, 2, 3), _dequant_case(qtype, 3, 2, [2, 0])]
    cases += [_rms_norm_case(2, 96), _rope_case(2, 2, 64, 64, "interleaved", 3), _rope_case(2, 1, 64, 32, "neox", 0),
              _silu_case(2, 40), _attention_case(2, 129, 2, 1, 64), _attention_case(3, 5, 2, 2, 32, page=4),
              _top_k_case(1, 300, 3)]
    return cases


def run_cases(ops: KernelOps, cases: list[Case], check: str, seed: int = 0) -> list[Row]:
    rows = []
    for i, (kernel, qtype, shape, fn) in enumerate(cases):
        rng = np.random.default_rng(seed + i)
        start = time.perf_counter()
        try:
            passed, detail = fn(ops, rng)
        except Exception as e:  # noqa: BLE001 -- a failed build or launch is a failed row, not a crashed table
            passed, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(Row(kernel, qtype, shape, check, bool(passed), f"{detail} ({time.perf_counter() - start:.2f} s)"))
    return rows


def pocl_rows() -> list[Row]:
    from backends.cuda.opencl import OpenCLDevice
    return run_cases(KernelOps(OpenCLDevice("pocl")), pocl_cases(), "pocl")


def oclgrind_rows(timeout: float = 600) -> list[Row]:
    """The Oclgrind cases in a child process (Oclgrind reads its options from the environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        log, out = os.path.join(tmp, "oclgrind.log"), os.path.join(tmp, "rows.json")
        env = dict(os.environ, OCLGRIND_DATA_RACES="1", OCLGRIND_UNINITIALIZED="1", OCLGRIND_LOG=log)
        proc = subprocess.run([sys.executable, "-m", "backends.cuda.kernel_check", "--oclgrind-child", out],
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            return [Row("*", "-", "-", "oclgrind", False, f"child failed: {proc.stderr[-500:]}")]
        rows = [Row(**r) for r in json.loads(Path(out).read_text())]
        text = Path(log).read_text() if os.path.exists(log) else ""
    if text.strip():
        # Name the kernels the log blames; every row of those kernels fails.
        blamed = set(re.findall(r"Kernel: (\w+)", text)) or {"*"}
        first = next(ln.strip() for ln in text.splitlines() if ln.strip())
        for r in rows:
            if r.kernel in blamed or "*" in blamed:
                r.passed, r.detail = False, f"oclgrind: {first}"
    for r in rows:
        if r.passed:
            r.detail = "log empty; " + r.detail
    return rows


def _oclgrind_child(out: str) -> None:
    from backends.cuda.opencl import OpenCLDevice
    rows = run_cases(KernelOps(OpenCLDevice("oclgrind")), oclgrind_cases(), "oclgrind")
    with open(out, "w") as f:
        json.dump([asdict(r) for r in rows], f)


# --- the table ------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    head = ("kernel", "type", "shape", "check", "result", "detail")
    body = [(r.kernel, r.qtype, r.shape, r.check, "pass" if r.passed else "FAIL", r.detail) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line[:5], widths)) + "  " + line[5] for line in [head, *body]]
    n_pass = sum(r.passed for r in rows)
    return "\n".join(lines + [f"{n_pass} of {len(rows)} kernel checks passed"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="nvrtc,pocl,oclgrind", help="comma-separated: nvrtc, pocl, oclgrind")
    p.add_argument("--oclgrind-child", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.oclgrind_child:
        _oclgrind_child(args.oclgrind_child)
        return 0
    rows: list[Row] = []
    for check in args.only.split(","):
        rows += {"nvrtc": nvrtc_rows, "pocl": pocl_rows, "oclgrind": oclgrind_rows}[check.strip()]()
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
