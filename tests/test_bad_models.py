"""Nothing in a file is ignored silently: each case that used to load and compute wrong now
loads correctly or is refused with one clear line naming the key or tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from tiny_gguf import tiny_writer

from backends.cpu.backend import CpuBackend
from engine.errors import ModelFormatError, UnsupportedModel
from engine.execution import kernel_settings
from engine.model.gguf_file import ModelFile
from engine.runtime.generate import LoadedModel, score

DIM, FFN, VOCAB = 32, 64, 8


def write(path: Path, keys: dict | None = None, extra: dict | None = None, drop: tuple = (),
          types: dict | None = None, arch: str = "llama") -> Path:
    """The tiny one-layer model (tests/tiny_gguf.py) with extra metadata keys and tensors."""
    w: GGUFWriter = tiny_writer(path, arch, DIM, FFN)
    for key, value in (keys or {}).items():
        key = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,),
               "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,),
               "blk.0.attn_q.weight": (DIM, DIM), "blk.0.attn_k.weight": (DIM // 2, DIM),
               "blk.0.attn_v.weight": (DIM // 2, DIM), "blk.0.attn_output.weight": (DIM, DIM),
               "blk.0.ffn_gate.weight": (FFN, DIM), "blk.0.ffn_up.weight": (FFN, DIM),
               "blk.0.ffn_down.weight": (DIM, FFN), **(extra or {})}
    for name, shape in tensors.items():
        if name in drop:
            continue
        data = rng.standard_normal(shape).astype(np.float32) * 0.3
        if name.endswith("norm.weight"):
            data += 1.0
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, data)
        else:  # random blocks with a sane f16 scale in front
            block, size = GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
            raw[..., 0:2] = np.full(raw.shape[:2], 0.01, np.float16)[..., None].view(np.uint8)
            raw = raw.reshape(shape[0], -1)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(path: Path, match: str) -> str:
    with pytest.raises((UnsupportedModel, ModelFormatError), match=match) as exc:
        ModelFile(path).config()
    described = ModelFile(path).describe()  # inspect tells the same
    assert described["supported"] is False and described["unsupported_reason"] == str(exc.value)
    return str(exc.value)


def test_mixture_of_experts_is_refused_as_such(tmp_path):
    path = write(tmp_path / "moe.gguf", {"expert_count": 8, "expert_used_count": 2},
                 extra={"blk.0.ffn_gate_inp.weight": (8, DIM)}, drop=("blk.0.ffn_gate.weight",))
    refused(path, "mixture-of-experts is not supported")


@pytest.mark.parametrize("scaling", ["longrope", "dynamic"])
def test_unimplemented_rope_scaling_is_refused_by_key(tmp_path, scaling):
    path = write(tmp_path / "rope.gguf", {"rope.scaling.type": scaling, "rope.scaling.factor": 4.0})
    refused(path, f"llama.rope.scaling.type = '{scaling}'.*not supported")


def test_yarn_log_multiplier_is_refused_by_key(tmp_path):
    path = write(tmp_path / "yarn.gguf", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                                          "rope.scaling.yarn_log_multiplier": 0.1})
    refused(path, "llama.rope.scaling.yarn_log_multiplier")


def test_logit_softcapping_is_refused_by_key(tmp_path):
    refused(write(tmp_path / "cap.gguf", {"final_logit_softcapping": 30.0}), "llama.final_logit_softcapping")


def test_unknown_architecture_key_is_refused_by_name(tmp_path):
    refused(write(tmp_path / "k.gguf", {"attention.temperature_scale": 2.0}),
            "metadata key llama.attention.temperature_scale = 2.0 is not understood")


def test_unused_tensor_is_refused_by_name(tmp_path):
    path = write(tmp_path / "qk.gguf", extra={"blk.0.attn_q_norm.weight": (DIM // 4,)})
    refused(path, "tensor 'blk.0.attn_q_norm.weight' is not used by the llama architecture")


def test_rope_freqs_of_the_wrong_architecture_is_refused(tmp_path):
    # llama.cpp reads rope_freqs.weight for llama only; a qwen2 file holding one is not run without it
    path = write(tmp_path / "q.gguf", arch="qwen2", extra={"rope_freqs.weight": (DIM // 8,)})
    refused(path, "tensor 'rope_freqs.weight' is not used by the qwen2 architecture")


def test_missing_tensor_is_named(tmp_path):
    refused(write(tmp_path / "m.gguf", drop=("blk.0.ffn_down.weight",)), "tensor 'blk.0.ffn_down.weight' is missing")


def test_value_length_other_than_key_length_is_refused(tmp_path):
    refused(write(tmp_path / "v.gguf", {"attention.key_length": 8, "attention.value_length": 16}),
            "llama.attention.value_length")


def test_rope_freqs_and_linear_scaling_change_the_numbers(tmp_path):
    """Each is applied, not ignored: each changes the logits of a long enough sequence (and each
    is checked against transformers in test_architectures)."""
    ids = list(range(VOCAB)) * 4
    plain = score(LoadedModel(write(tmp_path / "a.gguf")), ids)
    linear = score(LoadedModel(write(tmp_path / "b.gguf", {"rope.scaling.type": "linear",
                                                            "rope.scaling.factor": 2.0})), ids)
    assert np.abs(linear - plain).max() > 1e-3
    freqs = score(LoadedModel(write(tmp_path / "c.gguf", extra={"rope_freqs.weight": (DIM // 8,)})), ids)
    assert np.abs(freqs - plain).max() > 1e-3
    yarn = score(LoadedModel(write(tmp_path / "d.gguf", {"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0,
                                                         "rope.scaling.original_context_length": 16})), ids)
    assert np.abs(yarn - linear).max() > 1e-3


def test_qkv_and_output_biases_under_llama_are_applied(tmp_path):
    """llama.cpp loads optional biases for llama; so do we (Qwen2's are checked against transformers
    in test_architectures). A bias on v only shifts every attention output by it, which is the
    same as a bias W_o @ b_v on the output projection."""
    ids = list(range(VOCAB))
    base = write(tmp_path / "base.gguf")
    with_v = write(tmp_path / "v.gguf", extra={"blk.0.attn_v.bias": (DIM // 2,)})
    b_v = ModelFile(with_v).raw("blk.0.attn_v.bias").view(np.float32)
    w_o = ModelFile(base).raw("blk.0.attn_output.weight").view(np.float32).reshape(DIM, DIM)
    b_o = w_o @ np.repeat(b_v.reshape(2, -1), 2, axis=0).reshape(-1)  # query head h reads kv head h // 2
    m_v = LoadedModel(with_v)
    m_o = LoadedModel(base)
    m_o.weights.layers[0].bo = b_o.astype(np.float32)
    assert np.abs(score(m_v, ids) - score(LoadedModel(base), ids)).max() > 1e-3
    np.testing.assert_allclose(score(m_v, ids), score(m_o, ids), atol=1e-4)


def test_key_length_other_than_dim_over_heads_runs(tmp_path):
    """Mistral-Nemo style: head_dim from attention.key_length (checked against transformers on the
    llama3 fixture); a 16-wide head in a 32-wide model used to die in the first matmul."""
    w = {"attention.key_length": 16, "attention.value_length": 16}
    path = write(tmp_path / "kl.gguf", w, extra={"blk.0.attn_q.weight": (4 * 16, DIM), "blk.0.attn_k.weight": (2 * 16, DIM),
                                                 "blk.0.attn_v.weight": (2 * 16, DIM),
                                                 "blk.0.attn_output.weight": (DIM, 4 * 16)})
    model = LoadedModel(path)
    assert model.config.head_dim == 16
    assert np.isfinite(score(model, list(range(VOCAB)))).all()
    assert ModelFile(path).describe()["supported"] is True


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS])
def test_iq4_tensors_load_and_inspect_says_so(tmp_path, qtype):
    ffn = 256  # IQ4_XS blocks hold 256 weights: rows of ffn_down are ffn long
    path = tmp_path / "iq4.gguf"
    global FFN
    saved, FFN = FFN, ffn
    try:
        write(path, types={"blk.0.ffn_down.weight": qtype})
    finally:
        FFN = saved
    assert ModelFile(path).describe()["supported"] is True
    ids = list(range(VOCAB))
    f32 = score(LoadedModel(path, weights="f32"), ids)
    native = score(LoadedModel(path, weights="native"), ids)  # requantized to Q8_0: no kernel for IQ4
    assert np.isfinite(f32).all()
    assert np.abs(native - f32).max() < 0.05 * np.abs(f32).max()  # int8 activations on the native path


def test_unsupported_tensor_type_makes_inspect_say_unsupported(tmp_path):
    from tiny_gguf import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "iq2.gguf", odd_tensor_type=GGMLQuantizationType.IQ2_XXS)
    described = ModelFile(path).describe()
    assert described["supported"] is False and "IQ2_XXS is not supported" in described["unsupported_reason"]


# --- sliding-window attention ----------------------------------------------------------------

def brute_force_attention(q, k, v, positions, window):
    n, heads, hd = q.shape
    group = heads // k.shape[0]
    out = np.zeros((n, heads, hd))
    for i, p in enumerate(positions):
        for h in range(heads):
            keys = [j for j in range(k.shape[1]) if j <= p and (not window or p - j < window)]
            s = np.array([q[i, h] @ k[h // group, j] for j in keys]) / np.sqrt(hd)
            s = np.exp(s - s.max())
            out[i, h] = (s / s.sum()) @ v[h // group, keys]
    return out.reshape(n, heads * hd)


@pytest.mark.parametrize("kernels", ["auto", "numpy"])
@pytest.mark.parametrize("window", [0, 1, 5, 64])
def test_windowed_attention_sees_only_its_window(kernels, window):
    rng = np.random.default_rng(window)
    t, heads, kv_heads, hd = 40, 4, 2, 16
    q = rng.standard_normal((t, heads, hd)).astype(np.float32)
    k = rng.standard_normal((kv_heads, t, hd)).astype(np.float32)
    v = rng.standard_normal((kv_heads, t, hd)).astype(np.float32)
    positions = np.arange(t)
    be = CpuBackend(kernel_settings(), kernels=kernels)
    be.ATTENTION_BLOCK = 16  # several query blocks, each with its own window start
    got = be.attention(q, k, v, positions, window)
    np.testing.assert_allclose(got, brute_force_attention(q, k, v, positions, window), atol=1e-4)
    # the last 7 queries alone (a prompt chunk) see the same keys
    np.testing.assert_allclose(be.attention(q[-7:], k, v, positions[-7:], window), got[-7:], atol=1e-5)


def test_llama_sliding_window_key_is_applied(tmp_path):
    """Mistral's sliding window (`llama.attention.sliding_window`) on every layer: the first
    `window` positions are unchanged, later ones differ from the unwindowed model."""
    ids = list(range(VOCAB)) * 3
    plain = score(LoadedModel(write(tmp_path / "a.gguf")), ids)
    windowed = score(LoadedModel(write(tmp_path / "b.gguf", {"attention.sliding_window": 4})), ids)
    np.testing.assert_allclose(windowed[:4], plain[:4], atol=1e-5)
    assert np.abs(windowed[4:] - plain[4:]).max() > 1e-3


def test_cuda_backend_refuses_what_it_does_not_compute():
    pytest.importorskip("cupy")
    from backends.cuda.backend import CudaBackend
    config = ModelFile(Path(__file__).parent / "fixtures" / "arch" / "gemma3.gguf").config()
    with pytest.raises(UnsupportedModel, match="the cuda backend does not compute per-head q/k RMSNorm"):
        CudaBackend.check_model(None, config, config.variants())  # type: ignore[arg-type]


def test_model_without_chat_template_is_told(tmp_path, caplog):
    """No tokenizer.chat_template: chat messages are refused naming the key (llama.cpp would
    render ChatML, which the model was not trained on); a plain prompt still works."""
    from engine.model.chat import NoChatTemplate
    model = LoadedModel(write(tmp_path / "t.gguf"))
    try:
        assert model.chat_template is None
        assert "has no chat template (tokenizer.chat_template)" in caplog.text
        with pytest.raises(NoChatTemplate, match=r"t.gguf has no chat template \(GGUF key tokenizer.chat_template\)"):
            model.encode_prompt(messages=[{"role": "user", "content": "hi"}])
        assert model.encode_prompt(ids=[1]) == [1]
    finally:
        model.close()
