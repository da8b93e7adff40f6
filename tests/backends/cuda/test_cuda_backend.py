"""The CUDA backend: its contract on PoCL (no GPU), its refusal without one, and GPU tests.

On the CPU the backend runs through `OpenCLDevice("pocl")`: the same kernels, launch code, weight
handles and forward pass as on a GPU, minus CuPy's cuBLAS prefill path (taken only on a GPU).
The tests marked `gpu` run automatically where `cuda_available()` is true and skip otherwise;
they compare the whole model with the numpy backend on the reference prompts.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from paths import FIXTURES

from backends.base import TensorData
from backends.cuda import cuda_available
from backends.cuda.kernel_check import random_blocks
from backends.cuda.opencl import opencl_available
from backends.quants import dequantize
from engine.errors import InvalidArgument
from engine.execution import kernel_settings

CUDA_OK, CUDA_REASON = cuda_available()
POCL_OK, POCL_REASON = opencl_available("pocl")

needs_pocl = pytest.mark.skipif(not POCL_OK, reason=POCL_REASON)
gpu = pytest.mark.skipif(not CUDA_OK, reason=f"no GPU: {CUDA_REASON}")

TOP1_AGREEMENT = 1.0
LOGIT_TOLERANCE = 0.05  # as tests/engine/runtime/test_model.py against hf_f32


@pytest.fixture(scope="module")
def pocl_backend():
    from backends.cuda.backend import CudaBackend
    from backends.cuda.opencl import OpenCLDevice
    be = CudaBackend(kernel_settings(), device=OpenCLDevice("pocl"))
    yield be
    be.close()


def _tensor(qtype: T, rows: int, cols: int, rng) -> TensorData:
    return TensorData(random_blocks(qtype, rows, cols, rng), qtype, (rows, cols))


# --- without a GPU ---------------------------------------------------------------------------

@pytest.mark.skipif(CUDA_OK, reason="a GPU is present")
def test_selecting_cuda_without_a_gpu_fails_clearly():
    from backends import create_backend
    with pytest.raises(InvalidArgument) as e:
        create_backend("cuda", kernel_settings())
    assert e.value.field == "backend"
    assert "backend 'cuda' cannot run here" in str(e.value) and CUDA_REASON in str(e.value)


def test_cuda_available_gives_a_reason():
    ok, reason = cuda_available()
    assert isinstance(ok, bool) and reason


# --- the contract on PoCL --------------------------------------------------------------------

@needs_pocl
@pytest.mark.parametrize("fmt", ["native", "f16", "f32"])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_fused_linear_of_mixed_types(pocl_backend, fmt, n):
    """q|k|v-style fusion of parts of different types, one without a kernel (Q2_K, widened)."""
    rng = np.random.default_rng(n)
    parts = [_tensor(T.Q4_K, 9, 512, rng), _tensor(T.Q6_K, 3, 512, rng), _tensor(T.Q6_K, 2, 512, rng),
             _tensor(T.Q2_K, 4, 512, rng), _tensor(T.Q8_0, 1, 512, rng)]
    w = np.concatenate([dequantize(p.raw, p.qtype, p.shape) for p in parts])
    if fmt == "f16":
        w = w.astype(np.float16).astype(np.float32)
    handle = pocl_backend.load_linear(parts, fmt)
    assert [s.dtype.qtype for s in handle.segments] == (
        {"native": [T.Q4_K, T.Q6_K, T.F32, T.Q8_0], "f16": [T.F16], "f32": [T.F32]}[fmt])
    x = rng.standard_normal((n, 512)).astype(np.float32)
    y = pocl_backend.linear(x, handle)
    assert isinstance(y, np.ndarray) and y.shape == (n, 19)
    ref = x.astype(np.float64) @ w.T
    assert np.abs(y - ref).max() / (np.abs(x) @ np.abs(w).T).max() < 1e-5


@needs_pocl
def test_embedding_rows_and_tied_output(pocl_backend):
    rng = np.random.default_rng(1)
    t = _tensor(T.Q8_0, 50, 96, rng)
    table = pocl_backend.load_embedding(t)
    dense = dequantize(t.raw, t.qtype, t.shape)
    ids = np.array([49, 0, 7, 7])
    np.testing.assert_array_equal(pocl_backend.embedding(table, ids), dense[ids])
    x = rng.standard_normal((2, 96)).astype(np.float32)
    np.testing.assert_allclose(pocl_backend.linear(x, pocl_backend.tied_output(table)), x @ dense.T,
                               rtol=1e-5, atol=1e-5)


@needs_pocl
def test_unsupported_shape_is_a_clear_error(pocl_backend):
    from engine.errors import UnsupportedModel
    with pytest.raises(UnsupportedModel, match="not a whole number"):
        pocl_backend.load_linear([TensorData(np.zeros((2, 12), np.float32), T.F32, (2, 12))], "native")
    with pytest.raises(InvalidArgument, match="weight format 'q8_0'"):
        pocl_backend.load_linear([_tensor(T.Q8_0, 1, 32, np.random.default_rng(0))], "q8_0")


@needs_pocl
def test_top_k_and_greedy_on_device(pocl_backend):
    rng = np.random.default_rng(2)
    logits = (np.round(rng.standard_normal((2, 5000)) * 4) / 2).astype(np.float32)
    vals, ids, lse = pocl_backend.top_k(logits, 10)
    ref = np.stack([np.lexsort((np.arange(5000), -row))[:10] for row in logits])
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(logits, ref, 1))
    m = logits.max(1, keepdims=True)
    np.testing.assert_allclose(lse, np.log(np.exp(logits - m).sum(1)) + m[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(pocl_backend.greedy(logits), logits.argmax(1))
    with pytest.raises(InvalidArgument):
        pocl_backend.top_k(logits, 0)


@needs_pocl
@pytest.mark.slow
def test_whole_model_on_pocl_matches_reference(model_file, generation_reference):
    """SmolLM2 in its native Q4_1/Q8_0 blocks through every kernel, on the CPU, vs hf_f32."""
    from backends.cuda.backend import CudaBackend
    from backends.cuda.opencl import OpenCLDevice
    from engine.runtime.model import Segment, Transformer, load_weights
    config = model_file.config()
    be = CudaBackend(kernel_settings(), device=OpenCLDevice("pocl"))
    try:
        model = Transformer(config, load_weights(model_file, config, be, "native"), be)
        stats = be.memory_stats()
        assert stats["weights_bytes"] < 100e6  # blocks, not float32 (that would be ~540 MB)
        case = generation_reference[0]
        ids = case["prompt_ids"] + case["hf_f32"]["greedy"][:11]
        # teacher-forced: every position's logits from one prefill of 16 tokens (two matvec8 groups)
        logits = model.forward([Segment(model.new_kv(len(ids)), np.array(ids), 0, logits="all")])[0]
        ref = case["hf_f32"]
        top_ids = np.array(ref["top_ids"][:len(ids)])
        assert (logits.argmax(1) == top_ids[:, 0]).mean() >= TOP1_AGREEMENT
        err = np.abs(np.take_along_axis(logits, top_ids, 1) - np.array(ref["top_logits"][:len(ids)])).max()
        assert err < LOGIT_TOLERANCE, f"top-20 logits off by {err:.4f}"
        # incremental: prefill the prompt, then decode three tokens through the cache
        kv = model.new_kv(len(ids))
        n = len(case["prompt_ids"])
        steps = [model.forward([Segment(kv, np.array(ids[:n]), 0)])[0][-1]]
        steps += [model.forward([Segment(kv, np.array([t]), i)])[0][-1] for i, t in enumerate(ids[n:n + 3], n)]
        np.testing.assert_allclose(np.stack(steps), logits[n - 1:n + 3], atol=2e-3)
    finally:
        be.close()


@needs_pocl
def test_resident_mode_keeps_arrays_and_cache_on_the_device(model_file):
    """resident=True on MirroredOpenCLDevice (host memory posing as device memory, cp = numpy):
    a layer's ops chained on device arrays, q/k read in place from the fused qkv row, attention
    over views of a DeviceSequenceKV, and the same numbers as host mode."""
    from backends.cuda.backend import CudaBackend, DeviceSequenceKV
    from backends.cuda.opencl import MirroredOpenCLDevice, OpenCLDevice
    from engine.runtime.model import load_weights
    config = model_file.config()
    res = CudaBackend(kernel_settings(), device=MirroredOpenCLDevice("pocl"), resident=True)
    host = CudaBackend(kernel_settings(), device=OpenCLDevice("pocl"))
    try:
        outs = []
        for be in (res, host):
            be.configure_rope(config.rope_dim, config.rope_theta, config.rope_style, 64)
            w = load_weights(model_file, config, be, "native")
            lw, c = w.layers[0], config
            q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            positions = np.arange(3)
            x = be.embedding(w.embedding, np.array([504, 3575, 282]))
            qkv = be.linear(be.rms_norm(x, lw.attn_norm, c.norm_eps), lw.wqkv)
            q = be.rope(qkv[:, :q_dim].reshape(-1, c.n_heads, c.head_dim), positions)
            k = be.rope(qkv[:, q_dim:q_dim + kv_dim].reshape(-1, c.n_kv_heads, c.head_dim), positions)
            v = qkv[:, q_dim + kv_dim:].reshape(-1, c.n_kv_heads, c.head_dim)
            if be is res:
                kv = res.new_kv(1, c.n_kv_heads, c.head_dim, 8)
                assert isinstance(kv, DeviceSequenceKV) and res.memory_stats()["kv_bytes"] == kv.nbytes
                kv.write(0, 0, k, v)
                k_all, v_all = kv.read(0, 3)  # views with the cache's strides, not copies
                assert k_all.strides[0] == 8 * c.head_dim * 4
            else:
                k_all, v_all = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
            outs.append(be.attention(q, k_all, v_all, positions))
        np.testing.assert_array_equal(outs[0], outs[1])
    finally:
        res.close()
        host.close()


@needs_pocl
@pytest.mark.slow
def test_resident_whole_model_on_pocl(model_file, generation_reference):
    """The forward pass with resident=True, once the runtime keeps a device backend's arrays
    (Transformer.new_kv asks a resident backend for its cache; see docs/04_cuda_backend.md)."""
    from backends.cuda.backend import CudaBackend, DeviceSequenceKV
    from backends.cuda.opencl import MirroredOpenCLDevice
    from engine.runtime.model import Segment, Transformer, load_weights
    config = model_file.config()
    be = CudaBackend(kernel_settings(), device=MirroredOpenCLDevice("pocl"), resident=True)
    try:
        model = Transformer(config, load_weights(model_file, config, be, "native"), be)
        kv = model.new_kv(16)
        if not isinstance(kv, DeviceSequenceKV):
            pytest.skip("the runtime does not yet keep a resident backend's KV cache on the device")
        case = generation_reference[1]
        n = len(case["prompt_ids"])
        ids = case["prompt_ids"] + case["hf_f32"]["greedy"][:3]
        logits = [model.forward([Segment(kv, np.array(ids[:n]), 0)])[0][-1]]
        logits += [model.forward([Segment(kv, np.array([t]), i)])[0][-1] for i, t in enumerate(ids[n:], n)]
        assert [int(l.argmax()) for l in logits] == case["hf_f32"]["greedy"][:4]
    finally:
        be.close()


# --- on a GPU (run automatically where one exists) --------------------------------------------

@pytest.fixture(scope="module")
def gpu_model(model_path):
    from engine.runtime.generate import LoadedModel
    model = LoadedModel(model_path, backend="cuda", weights="native")
    yield model
    model.close()


@gpu
def test_gpu_greedy_generation_equals_hf_f32(gpu_model, generation_reference):
    from engine.runtime.generate import Generation
    from engine.runtime.sampling import SamplingParams
    for case in generation_reference:
        gen = Generation(gpu_model, case["prompt_ids"], SamplingParams(temperature=0.0, max_tokens=32),
                         ignore_eos=True)
        list(gen)
        assert gen.completion.ids == case["hf_f32"]["greedy"], case["prompt"]


# Architectures the device kernels compute (the plain llama decoder); the others are refused at load
# with the variants named, never run approximately (CudaBackend.check_model).
ARCH = FIXTURES / "arch"
ARCH_CASES = sorted(json.loads((ARCH / "manifest.json").read_text()))
CUDA_REFUSES = {"gemma3", "llama3", "llama_linear", "mistral_swa", "phi3", "qwen2", "qwen2_yarn", "qwen3"}
NEAR_TIE = 0.05  # as tests/engine/model/test_architectures.py


@gpu
@pytest.mark.parametrize("name", ARCH_CASES)
def test_gpu_architectures_match_transformers_and_llama_cpp(name):
    """Each tiny architecture fixture on the GPU: its f32 file against transformers' logits, its
    Q4_0 file (native blocks) against llama.cpp's, as on the CPU; or a clear refusal at load."""
    from engine.errors import UnsupportedModel
    from engine.runtime.generate import LoadedModel, score
    ref = np.load(ARCH / f"{name}.npz")
    ids = [int(t) for t in ref["teacher_ids"]]
    if name in CUDA_REFUSES:
        with pytest.raises(UnsupportedModel, match="cuda backend does not compute"):
            LoadedModel(ARCH / f"{name}.gguf", backend="cuda", weights="native")
        return
    model = LoadedModel(ARCH / f"{name}.gguf", backend="cuda", weights="native")
    try:
        got = score(model, ids)
    finally:
        model.close()
    want = ref["logits"]
    assert (got.argmax(1) == want.argmax(1)).all(), name
    assert np.abs(got - want).max() < LOGIT_TOLERANCE, name
    model = LoadedModel(ARCH / f"{name}.q4_0.gguf", backend="cuda", weights="native")
    try:
        got = score(model, ids)
    finally:
        model.close()
    theirs = np.load(ARCH / f"{name}.q4_0.llamacpp.npz")["logits"]
    for j in np.flatnonzero(got.argmax(1) != theirs.argmax(1)):
        margin = theirs[j].max() - theirs[j, got[j].argmax()]
        assert margin < NEAR_TIE, f"{name} q4_0 at {j}: llama.cpp prefers its top-1 by {margin:.3f}"
    print(f"{name}: f32 and q4_0 on the GPU agree with transformers and llama.cpp")


@gpu
def test_gpu_worker_batches_equal_hf_f32(gpu_model, generation_reference):
    """The worker's continuous batching on the resident backend, its paged arena in host memory
    (keys and values come back once a layer, attention uploads the blocks it reads): every
    reference prompt at once, each completion the hf_f32 greedy tokens."""
    from engine.memory.paged import BlockArena
    from engine.runtime.sampling import SamplingParams
    from engine.runtime.worker import EngineWorker, RequestSpec, WorkerLimits
    from engine.scheduler.base import FifoPolicy
    arena = BlockArena.for_model(gpu_model.config, num_blocks=64, block_size=16)
    worker = EngineWorker(gpu_model, FifoPolicy(), WorkerLimits(max_batched_tokens=64), arena=arena)
    try:
        handles = [worker.submit(RequestSpec(str(i), case["prompt_ids"], SamplingParams(temperature=0.0, max_tokens=16),
                                             ignore_eos=True)) for i, case in enumerate(generation_reference)]
        for case, handle in zip(generation_reference, handles):
            final = [e for e in handle.events() if hasattr(e, "finish_reason")][0]
            assert final.ids == case["hf_f32"]["greedy"][:16], case["prompt"]
    finally:
        worker.close()


@gpu
def test_gpu_logits_match_numpy_backend(gpu_model, loaded_model, generation_reference):
    """Teacher-forced logits of every reference case: the CUDA backend vs the numpy backend."""
    from engine.runtime.generate import score
    worst = 0.0
    for case in generation_reference:
        ids = case["prompt_ids"] + case["hf_f32"]["greedy"]
        got, ref = score(gpu_model, ids), score(loaded_model, ids)
        assert (got.argmax(1) == ref.argmax(1)).all(), case["prompt"]
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < LOGIT_TOLERANCE
    print(f"worst logit difference cuda vs numpy: {worst:.2e}")


@gpu
def test_gpu_prefill_gemm_path_matches_matvec_path(gpu_model):
    """A prompt above the plan's execution.cuda_prefill_tokens (dequantize + cuBLAS) against the batch-invariant kernels."""
    from engine.execution import DEFAULT_EXECUTION
    from engine.runtime.generate import score
    ids = list(range(100, 100 + 3 * DEFAULT_EXECUTION.cuda_prefill_tokens))
    be = gpu_model.backend
    gemm = score(gpu_model, ids)
    be.batch_invariant = True
    try:
        kernel = score(gpu_model, ids)
    finally:
        be.batch_invariant = False
    assert np.abs(gemm - kernel).max() < 1e-2


@gpu
def test_gpu_resident_ops_stay_on_device(gpu_model):
    """resident=True (what create_backend gives): cupy in, cupy out, the same numbers as the host mode."""
    import cupy as cp

    from backends.cuda.backend import CudaBackend
    res = gpu_model.backend
    assert res.resident
    host = CudaBackend(kernel_settings())
    res.configure_rope(64, 10000.0, "interleaved", 256)
    host.configure_rope(64, 10000.0, "interleaved", 256)
    try:
        w = gpu_model.weights.layers[0]
        x = np.random.default_rng(0).standard_normal((3, gpu_model.config.dim)).astype(np.float32)
        h = res.rms_norm(cp.asarray(x), w.attn_norm, 1e-5)
        qkv = res.linear(h, w.wqkv)
        assert isinstance(qkv, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(qkv), host.linear(host.rms_norm(x, w.attn_norm, 1e-5), w.wqkv),
                                   rtol=1e-5, atol=1e-5)
        q = res.rope(qkv[:, :576].reshape(3, 9, 64), np.arange(3))  # a strided view, read in place
        np.testing.assert_allclose(cp.asnumpy(q), host.rope(cp.asnumpy(qkv)[:, :576].reshape(3, 9, 64), np.arange(3)),
                                   atol=1e-6)
        kv = res.new_kv(1, 3, 64, 16)
        k = qkv[:, 576:768].reshape(3, 3, 64)
        kv.write(0, 0, k, k)
        out = res.attention(q, *kv.read(0, 3), np.arange(3))
        assert isinstance(out, cp.ndarray) and res.memory_stats()["kv_bytes"] == kv.nbytes
    finally:
        gpu_model.backend.configure_rope(gpu_model.config.rope_dim, gpu_model.config.rope_theta,
                                         gpu_model.config.rope_style, gpu_model.config.context_length)
        host.close()


@gpu
def test_gpu_memory_stats_and_speed(gpu_model):
    """Weights stay in blocks; prints prefill and decode tokens/s (no speed assertion)."""
    from engine.runtime.generate import decode_one_token, prefill
    stats = gpu_model.backend.memory_stats()
    assert 0 < stats["weights_bytes"] < 100e6 and stats["device_total_bytes"] > 0
    ids = list(range(200, 712))
    kv = gpu_model.transformer.new_kv(len(ids) + 64)
    prefill(gpu_model, kv, ids[:16])  # warm-up: compiles every kernel
    kv = gpu_model.transformer.new_kv(len(ids) + 64)
    start = time.perf_counter()
    prefill(gpu_model, kv, ids)
    pp = len(ids) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(64):
        decode_one_token(gpu_model, kv, 300 + i)
    tg = 64 / (time.perf_counter() - start)
    print(f"\ncuda backend on {gpu_model.backend.device.name}: pp512 {pp:.0f} tok/s, tg64 {tg:.0f} tok/s "
          f"(resident: one host round trip a step); memory {stats}")
