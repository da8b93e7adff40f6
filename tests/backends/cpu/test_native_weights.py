"""The `native` and `q8_0` weight formats through the whole forward pass.

A synthetic 1-layer model whose tensors use every kernel type (plus one without a kernel)
checks loading, the no-copy promise and both matmul paths against f32 weights; the
default model checks numerics against the reference (slow): the int8 quantized-dot path
against llama.cpp (which also quantizes activations), the dequantize-into-GEMM path and
`q8_0` against hf_f32. docs/03_quantized_cpu.md records the tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize
from tiny_gguf import tiny_writer

from backends.cpu import quantized as qz
from backends.cpu.quantized import BlockTable, QuantizedLinear
from backends.quants import dequantize
from engine.execution import kernel_settings
from engine.runtime.generate import LoadedModel, decode_one_token, prefill, score

needs_ext = pytest.mark.skipif(qz._EXTENSION is None, reason=f"ops_avx2 unavailable: {qz._WHY_NOT}")

# tensor -> stored type in the synthetic model: every kernel type, and F32 (stays float)
TINY_TYPES = {
    "token_embd.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q4_0,
    "blk.0.attn_k.weight": T.Q4_1,
    "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.Q4_1,
    "blk.0.ffn_gate.weight": T.Q4_K,
    "blk.0.ffn_up.weight": T.Q6_K,
    "blk.0.ffn_down.weight": T.Q4_K,
    "output.weight": T.F32,
}


def _k_blocks(qtype: T, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small finite super-scales (gguf has no K-quant quantizer)."""
    size = 144 if qtype == T.Q4_K else 210
    blocks = rng.integers(0, 256, (rows * k // 256, size), dtype=np.uint8)
    for offset in ((0, 2) if qtype == T.Q4_K else (208,)):
        blocks[:, offset:offset + 2] = rng.uniform(2e-4, 2e-3, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A 1-layer llama (dim 256, 4 heads of 64, 2 kv heads, ffn 512, vocab 8) in mixed block types."""
    dim, ffn, vocab = 256, 512, 8
    path = tmp_path_factory.mktemp("native") / "tiny-mixed.gguf"
    w = tiny_writer(path, "llama", dim, ffn)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, dim), "blk.0.attn_q.weight": (dim, dim),
              "blk.0.attn_k.weight": (dim // 2, dim), "blk.0.attn_v.weight": (dim // 2, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (ffn, dim),
              "blk.0.ffn_up.weight": (ffn, dim), "blk.0.ffn_down.weight": (dim, ffn),
              "output.weight": (vocab, dim)}
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    for name, shape in shapes.items():
        qtype = TINY_TYPES[name]
        if qtype == T.F32:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.1)
            continue
        if qtype in (T.Q4_K, T.Q6_K):
            raw = _k_blocks(qtype, *shape, rng)
        else:
            raw = gguf_quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = [6, 0, 1, 4, 2, 3, 5, 0, 0, 2, 1, 3, 4, 5, 1, 2, 0, 3]


@pytest.fixture(scope="module")
def tiny_f32(tiny_path):
    model = LoadedModel(tiny_path, weights="f32")
    yield model
    model.close()


def _load(path, weights, **settings):
    return LoadedModel(path, weights=weights, settings=kernel_settings(**settings))


@needs_ext
def test_native_keeps_the_files_blocks(tiny_path):
    """Every block tensor resident once, in its own type, repacked into the x8 layout (the same
    bytes, 8 rows interleaved) the kernels read."""
    model = LoadedModel(tiny_path, weights="native")
    try:
        layer = model.weights.layers[0]
        assert isinstance(layer.wqkv, QuantizedLinear)
        assert layer.wqkv.qtypes == ("Q4_0", "Q4_1", "Q8_0")
        assert [p.layout for p in layer.wqkv.parts] == ["x8"] * 3
        assert layer.w_gate_up.qtypes == ("Q4_K", "Q6_K")
        assert [p.layout for p in layer.w_gate_up.parts] == ["x8"] * 2
        for w, names in [(layer.wqkv, ("attn_q", "attn_k", "attn_v")), (layer.wo, ("attn_output",)),
                         (layer.w_gate_up, ("ffn_gate", "ffn_up")), (layer.w_down, ("ffn_down",))]:
            files = [f"blk.0.{n}.weight" for n in names]
            assert w.nbytes == sum(model.file.tensors[f].n_bytes for f in files)  # no padding, no requantization
            dense = np.concatenate([dequantize(model.file.raw(f), model.file.tensors[f].type, model.file.tensors[f].shape)
                                    for f in files])
            got = np.empty_like(dense)
            model.backend.quantized.dequantize_rows(w, 0, w.n_out, got)
            np.testing.assert_array_equal(got, dense)
        assert isinstance(model.weights.embedding, BlockTable)  # looked up by row, never dequantized whole
        assert isinstance(model.weights.output, np.ndarray)  # an F32 head stays float
        report = model.backend.weights_report()  # what bench prints: nothing requantized
        assert report["Q4_K (x8)"] >= 1 and report["F32 -> float32"] >= 1
        assert not any("-> Q8_0" in form for form in report)
    finally:
        model.close()


@needs_ext
@pytest.mark.parametrize("weights", ["native", "q8_0"])
def test_gemm_path_matches_f32_weights(tiny_path, tiny_f32, weights):
    """Dequantize-into-GEMM keeps float activations: f32 numerics (q8_0 adds its requantization)."""
    model = _load(tiny_path, weights, gemm_rows_x8=1)
    try:
        got, want = score(model, IDS), score(tiny_f32, IDS)
        tol = 1e-4 if weights == "native" else 2e-2
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())
    finally:
        model.close()


@needs_ext
def test_int8_path_close_to_f32_weights_and_decode_equals_one_pass(tiny_path, tiny_f32):
    model = _load(tiny_path, "native", gemm_rows_x8=0)  # every batch on the int8 kernels (K-quants too)
    try:
        full, want = score(model, IDS), score(tiny_f32, IDS)
        np.testing.assert_allclose(full, want, atol=5e-2 * np.abs(want).max())  # random weights: int8 error ~3%
        # prefill + token-by-token decode through the cache: the same per-row arithmetic
        kv = model.transformer.new_kv(len(IDS))
        steps = [prefill(model, kv, IDS[:5])] + [decode_one_token(model, kv, t) for t in IDS[5:]]
        np.testing.assert_allclose(np.stack(steps), full[4:], atol=1e-5 * np.abs(full).max())
    finally:
        model.close()


@needs_ext
def test_prefetching_the_next_matrix_changes_no_bit_and_follows_the_step_order(tiny_path):
    """execution.prefetch_next_kib: the pool reads the matrix that came next last time; a hint
    only, so decode with it on is bit-identical to decode with it off."""
    steps = {}
    for kib in (0, 8192):
        model = _load(tiny_path, "native", prefetch_next_kib=kib, threads=2)
        try:
            kv = model.transformer.new_kv(len(IDS))
            steps[kib] = [prefill(model, kv, IDS[:5])] + [decode_one_token(model, kv, t) for t in IDS[5:]]
            if kib:  # each block matrix's successor: the step's order, the head, then layer 0 again
                w = model.weights
                order = [m for lw in w.layers for m in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)] + [w.output]
                order = [m for m in order if isinstance(m, QuantizedLinear)]
                assert len(order) >= 4
                assert [id(m.next()) for m in order] == [id(m) for m in order[1:] + order[:1]]
                # what each matmul hands the C pool: the successor's handle and the budget in bytes
                nxt, budget = model.backend.quantized._prefetch(order[0])
                assert nxt is order[1].matrix and budget == 8192 * 1024
        finally:
            model.close()
    np.testing.assert_array_equal(np.stack(steps[0]), np.stack(steps[8192]))


@needs_ext
def test_a_forked_child_computes_with_prefetching_on(tiny_path):
    """The pool forgets its workers and the prefetch job at fork (threadpool.c reset_after_fork):
    a child of a process that was prefetching runs its own matmuls, prefetch included."""
    import os
    import signal
    model = _load(tiny_path, "native", prefetch_next_kib=8192, threads=2)
    try:
        kv = model.transformer.new_kv(len(IDS))
        want = [prefill(model, kv, IDS[:5])] + [decode_one_token(model, kv, t) for t in IDS[5:8]]
        pid = os.fork()
        if pid == 0:  # the child: a hang is killed by the alarm, a wrong result exits 1
            signal.alarm(20)
            try:
                kv = model.transformer.new_kv(len(IDS))
                got = [prefill(model, kv, IDS[:5])] + [decode_one_token(model, kv, t) for t in IDS[5:8]]
                os._exit(0 if all(np.array_equal(a, b) for a, b in zip(got, want)) else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        model.close()


def _decode_steps(model, fused: bool, paged: bool = False):
    """Prefill 5 tokens, then decode the rest one by one, with the layers fused or op by op, in
    the sequence's own cache or in consecutive blocks of an arena (a lone server stream)."""
    from engine.memory.paged import BlockArena, PagedKV
    be, c = model.transformer.backend, model.config
    if not fused:
        be.fuses_decode = lambda layer: False
    try:
        if paged:
            arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks=8, block_size=16)
            arena.allocate(1)  # the sequence's blocks start past block 0
            kv = PagedKV(arena, len(IDS))
            assert kv.reserve(len(IDS)) and kv.blocks[0] == 1
        else:
            kv = model.transformer.new_kv(len(IDS))
        steps = [prefill(model, kv, IDS[:5])] + [decode_one_token(model, kv, t) for t in IDS[5:]]
        return np.stack(steps), [kv.layer_views(i) for i in range(c.n_layers)]
    finally:
        be.__dict__.pop("fuses_decode", None)


@needs_ext
@pytest.mark.parametrize("which,paged", [("tiny", False), ("tiny", True), ("smollm2", False), ("smollm2", True)])
def test_fused_decode_layers_give_the_same_bits_as_the_ops_one_by_one(which, paged, tiny_path, model_path):
    """One backend call a layer at decode (ops_avx2 decode_layer): the same kernels in the same
    order, so the same logits and the same cache, bit for bit (mixed block types; SmolLM2's 30
    layers of 9 heads over 3 kv heads), in a sequence's own cache and in arena blocks."""
    model = _load(tiny_path if which == "tiny" else model_path, "native", threads=2)
    try:
        assert model.transformer.plain_block and model.backend.fuses_decode(model.weights.layers[0])
        calls = []
        inner = model.backend._ops
        class Counting:  # noqa: E306 -- counts the fused calls, delegates everything
            def __getattr__(self, name):
                return getattr(inner, name)

            def decode_layer(self, *args):
                calls.append(args[10])
                return inner.decode_layer(*args)
        model.backend._ops = Counting()
        fused, kv_fused = _decode_steps(model, fused=True, paged=paged)
        model.backend._ops = inner
        assert calls[:len(model.weights.layers)] == [5] * len(model.weights.layers)  # position 5, every layer
        plain, kv_plain = _decode_steps(model, fused=False, paged=paged)
        np.testing.assert_array_equal(fused, plain)
        n = len(IDS)
        for (kf, vf), (kp, vp) in zip(kv_fused, kv_plain):
            np.testing.assert_array_equal(kf[:, :n], kp[:, :n])
            np.testing.assert_array_equal(vf[:, :n], vp[:, :n])
    finally:
        model.close()


@needs_ext
def test_fused_decode_layer_refuses_what_does_not_fit_and_profiling_does_not_fuse(tiny_path):
    from backends.base import OpProfile, ProfiledBackend
    from engine.errors import ContextOverflow
    model = _load(tiny_path, "native", threads=2)
    try:
        tr, be = model.transformer, model.backend
        lw = model.weights.layers[0]
        assert not ProfiledBackend(be, OpProfile()).fuses_decode(lw)
        kv = tr.new_kv(4)
        x = np.ones((1, 256), np.float32)
        cos, sin, _ = tr.rope_global
        args = [x, lw.attn_norm, lw.ffn_norm, lw.wqkv.matrix, lw.wo.matrix, lw.w_gate_up.matrix, lw.w_down.matrix,
                None, kv.k[0], kv.v[0], 4, cos, sin, True, 1e-5, 4, 2, 0]
        with pytest.raises(ValueError, match="pos < capacity"):  # position 4 of a 4-slot cache
            be._ops.decode_layer(*args)
        args[10], args[15] = 0, 3  # 3 heads over 2 kv heads
        with pytest.raises(ValueError):
            be._ops.decode_layer(*args)
        args[15], args[4] = 4, lw.wqkv.matrix  # o given the qkv matrix
        with pytest.raises(ValueError):
            be._ops.decode_layer(*args)
        np.testing.assert_array_equal(x, 1.0)  # nothing written
        full = tr.new_kv(3)
        prefill(model, full, IDS[:3])
        with pytest.raises(ContextOverflow):  # a fourth token in a 3-position cache, before any layer runs
            decode_one_token(model, full, 1)
        from engine.memory.paged import BlockArena, PagedKV
        c = model.config  # a float16 arena (kv_cache.dtype F16): the general path, whose attention reads it
        kv16 = PagedKV(BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, 4, 16, dtype=np.float16), 8)
        assert kv16.reserve(8) and kv16.layer_views(0)[0].dtype == np.float16
        prefill(model, kv16, IDS[:3])
        assert np.isfinite(decode_one_token(model, kv16, 1)).all()
    finally:
        model.close()


@pytest.mark.parametrize("qtype", [T.Q5_1, T.F16, T.Q4_1])
def test_q8_0_requantizes_every_type_and_native_keeps_blocks(qtype):
    """`q8_0` requantizes every type to Q8_0 of the dequantized weights; `native` keeps a block
    type's own blocks (Q5_1 had no kernel once and was requantized; Q5_0 and IQ4_NL widen exactly, below)."""
    from backends.base import TensorData
    from backends.quants import dequantize
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    raw = x.astype(np.float16) if qtype == T.F16 else gguf_quantize(x, qtype)
    tensor = TensorData(raw, qtype, (6, 64))
    part = qz.block_part(tensor, "q8_0")
    assert part.qtype == T.Q8_0 and part.rows == 6
    dense = dequantize(raw, qtype, (6, 64))
    np.testing.assert_array_equal(part.blocks, gguf_quantize(dense, T.Q8_0).reshape(6, -1))
    if qtype != T.F16:
        native = qz.block_part(tensor, "native")
        assert native.qtype == qtype and np.shares_memory(native.blocks, raw)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.IQ4_NL])
def test_q5_0_and_iq4_nl_widen_to_q8_0_exactly(qtype):
    """Under `q8_0` weights, a Q5_0 or IQ4_NL block (a scale times small integers) becomes Q8_0
    with the same scale and integers: the very same weights, where rounding to Q8_0 would move
    them. (`native` keeps their own blocks: both have x8 kernels.)"""
    from backends.base import TensorData
    from backends.quants import dequantize
    rng = np.random.default_rng(2)
    if qtype == T.Q5_0:
        raw = gguf_quantize(rng.standard_normal((6, 64)).astype(np.float32), qtype)
    else:  # gguf-py has no IQ4_NL quantizer: random blocks with a finite scale
        raw = rng.integers(0, 256, (12, 18), dtype=np.uint8)
        raw[:, 0:2] = rng.standard_normal((12, 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(6, -1)
    part = qz.block_part(TensorData(raw, qtype, (6, 64)), "q8_0")
    assert qz.block_part(TensorData(raw, qtype, (6, 64)), "native").qtype == qtype
    assert part.qtype == T.Q8_0 and part.rows == 6
    want = dequantize(raw, qtype, (6, 64))
    got = dequantize(part.blocks, T.Q8_0, (6, 64))
    assert (got.view(np.uint32) == want.view(np.uint32)).all()
    if qtype == T.Q5_0:  # (IQ4_NL's grid reaches -127: rounding to Q8_0 may keep its scale)
        assert not np.array_equal(got, dequantize(gguf_quantize(want, T.Q8_0), T.Q8_0, (6, 64)))


def test_numpy_fallback_matches_f32_weights(tiny_path, tiny_f32, monkeypatch):
    monkeypatch.setattr(qz, "_EXTENSION", None)  # as if the extension were not built
    model = LoadedModel(tiny_path, weights="native")
    try:
        assert model.backend.quantized.kernels == "numpy"
        assert all(p.layout == "rows" for p in model.weights.layers[0].wqkv.parts)
        want = score(tiny_f32, IDS)
        np.testing.assert_allclose(score(model, IDS), want, atol=1e-4 * np.abs(want).max())
    finally:
        model.close()


def test_unknown_weight_format_is_refused(tiny_path):
    from engine.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="weight format 'q2'"):
        LoadedModel(tiny_path, weights="q2")


# --- the default model against the reference ------------------------------------------

TOP1_AGREEMENT = 0.99  # of all teacher-forced positions, over every reference prompt
# The int8 path against llama.cpp (docs/03_quantized_cpu.md): with activations quantized to int8
# the model is discontinuous -- a float-rounding difference anywhere (a block's products summed
# in another order, llama.cpp's fp16 KV cache) flips a few roundings and moves logits by up to ~1
# -- so no implementation short of llama.cpp's exact float order reaches 99% against it: exact
# f32 math agrees on 97.7% of positions, and so does the int8 path. What is asserted instead:
# the same agreement, and every disagreement a near-tie in llama.cpp's own logits.
LLAMA_CPP_TOP1 = 0.97
LLAMA_CPP_NEAR_TIE = 0.5  # a disagreement must be a near-tie in llama.cpp's own logits
LLAMA_CPP_LOGIT_TOLERANCE = 1.5  # top-20 logits (observed 1.26; exact f32 math: 1.34)
HF_LOGIT_TOLERANCE = 0.05  # top-20 logits, GEMM path vs hf_f32 (as tests/engine/runtime/test_model.py for f32)
# q8_0 requantizes the Q4_1 weights (an 8-bit grid over the 4-bit values) with float activations
Q8_0_TOP1 = 0.96
Q8_0_NEAR_TIE = 0.5
Q8_0_LOGIT_TOLERANCE = 1.0  # observed 0.85


@pytest.fixture(scope="module")
def native_model(model_path):
    model = LoadedModel(model_path, weights="native")
    yield model
    model.close()


def _teacher_forced(model, cases, ref_name):
    """(top-1 agreement, worst top-20 logit error, reference gaps at the disagreements)."""
    agree = total = 0
    worst = 0.0
    gaps = []
    for case in cases:
        ref = case[ref_name]
        logits = score(model, case["prompt_ids"] + ref["greedy"])
        top_ids, top_logits = np.array(ref["top_ids"]), np.array(ref["top_logits"])
        ours = logits.argmax(axis=1)
        agree += int((ours == top_ids[:, 0]).sum())
        total += len(top_ids)
        for i in np.flatnonzero(ours != top_ids[:, 0]):
            hit = np.flatnonzero(top_ids[i] == ours[i])  # our token's place in the reference top-20
            gaps.append(float(top_logits[i, 0] - top_logits[i, hit[0]]) if len(hit) else np.inf)
        err = np.abs(np.take_along_axis(logits, top_ids, axis=1) - top_logits).max()
        worst = max(worst, float(err))
    return agree / total, worst, gaps


@pytest.fixture
def int8_everywhere(native_model):
    assert native_model.backend.settings.gemm_rows_x8 == 0  # the default: int8 for Q4_1/Q8_0 at every batch
    yield native_model


@pytest.fixture
def gemm_everywhere(native_model):
    native_model.backend.configure(kernel_settings(gemm_rows_x8=1))  # every batch dequantize-into-GEMM: float activations
    yield native_model
    native_model.backend.configure(kernel_settings())


@pytest.mark.slow
@needs_ext
def test_native_int8_path_matches_llama_cpp(int8_everywhere, generation_reference):
    agreement, worst, gaps = _teacher_forced(int8_everywhere, generation_reference, "llama_cpp")
    print(f"native int8 path vs llama_cpp: top-1 {agreement:.4f}, worst top-20 logit error {worst:.3f}, "
          f"reference gaps at disagreements {np.round(gaps, 3).tolist()}")
    assert agreement >= LLAMA_CPP_TOP1
    assert max(gaps, default=0.0) < LLAMA_CPP_NEAR_TIE
    assert worst < LLAMA_CPP_LOGIT_TOLERANCE


@pytest.mark.slow
@needs_ext
def test_native_gemm_path_matches_hf_f32(gemm_everywhere, generation_reference):
    agreement, worst, _ = _teacher_forced(gemm_everywhere, generation_reference, "hf_f32")
    print(f"native GEMM path vs hf_f32: top-1 {agreement:.4f}, worst top-20 logit error {worst:.4f}")
    assert agreement == 1.0
    assert worst < HF_LOGIT_TOLERANCE


@pytest.mark.slow
@needs_ext
def test_q8_0_matches_hf_f32(model_path, generation_reference):
    model = LoadedModel(model_path, weights="q8_0")
    model.backend.configure(kernel_settings(gemm_rows_x8=1))  # float activations: the hf_f32 reference
    try:
        layer = model.weights.layers[0]
        assert layer.wqkv.qtypes == ("Q8_0",) * 3 and model.weights.output.qtypes == ("Q8_0",)
        agreement, worst, gaps = _teacher_forced(model, generation_reference, "hf_f32")
    finally:
        model.close()
    print(f"q8_0 GEMM path vs hf_f32: top-1 {agreement:.4f}, worst top-20 logit error {worst:.4f}, "
          f"reference gaps at disagreements {np.round(gaps, 3).tolist()}")
    assert agreement >= Q8_0_TOP1
    assert max(gaps, default=0.0) < Q8_0_NEAR_TIE
    assert worst < Q8_0_LOGIT_TOLERANCE


@pytest.mark.slow
@needs_ext
def test_native_weights_are_the_files_bytes(native_model):
    """Resident weights = the file's tensors, byte for byte in size: no padding, no requantization,
    and the embedding lookups read the head's copy."""
    file = native_model.file
    names = [n for n, t in file.tensors.items() if t.type.name in ("Q4_1", "Q8_0")]
    handles = [w for layer in native_model.weights.layers
               for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)] + [native_model.weights.output]
    assert sum(w.nbytes for w in handles) == sum(file.tensors[n].n_bytes for n in names)
    assert native_model.weights.embedding.head is native_model.weights.output
