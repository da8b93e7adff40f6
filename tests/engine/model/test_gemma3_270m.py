"""The real Gemma 3 270M Q4_K_M against transformers float32 on the same (dequantized) weights,
over 768 positions: past its 512-token sliding window; its `native` weights against
llama.cpp on two prompt sets; and its chat prompt under the declared gemma template. Runs when the model is in the cache (`plan-engine models pull gemma3-270m`, 253 MB);
the references come from tests/fixtures/make_gemma3_reference.py and
make_gemma3_llamacpp_reference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from paths import FIXTURES

from engine.errors import ModelNotFound
from engine.model.registry import resolve
from engine.runtime.generate import LoadedModel, score

REF = FIXTURES / "gemma3_270m_hf_f32.npz"


def gemma3_path() -> Path:
    try:
        return resolve("gemma3-270m", pull_missing=False)
    except ModelNotFound:
        pytest.skip("gemma3-270m is not in the cache: plan-engine models pull gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_f32_matches_transformers_past_the_window():
    path = gemma3_path()
    ref = np.load(REF)
    model = LoadedModel(path, backend="cpu", weights="f32")
    try:
        assert model.config.sliding_window == 512 and len(ref["ids"]) > 512
        logits = score(model, [int(t) for t in ref["ids"]])
    finally:
        model.close()
    assert (logits.argmax(1) == ref["top_ids"][:, 0]).all()
    err = np.abs(np.take_along_axis(logits, ref["top_ids"], 1) - ref["top_logits"]).max()
    assert err < 0.05, f"top-20 logits off by {err:.4f}"


# llama.cpp's activations are int8 (Q8_0 per 32, Q8_K per 256 for the K-quants) and Gemma's
# have large outliers, so its logits move by ~0.2 on average under any float-rounding change:
# nothing short of its exact float order reaches the 98 % (docs/13_architectures.md).
# Two prompt sets, 5 x 160 tokens each (make_gemma3_llamacpp_reference.py): five of our docs
# (markdown tables, code), and five passages of natural English prose. Asserted per set: what
# was measured (native against llama.cpp's f32 KV cache, 2026-12-04, with activations per 256
# for the K-quant matrices as llama.cpp's Q8_K: 745 -> 750 and 762 -> 767 from per 32), llama.cpp's own f16-vs-f32
# KV agreement on the same prompts (a fact of the fixture), and every disagreement a near-tie
# in llama.cpp's logits below the largest margin measured (rounded up).
LLAMA_CPP_SETS = {
    # set: (reference file, ours measured, at least, llama.cpp f16 vs f32, largest margin measured, bound)
    "docs": ("gemma3_270m_llamacpp.npz", 750, 745, 753, 0.530, 0.55),
    "prose": ("gemma3_270m_llamacpp_prose.npz", 767, 762, 760, 0.507, 0.55),
}


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(LLAMA_CPP_SETS))
def test_gemma3_270m_native_against_llama_cpp(which):
    path = gemma3_path()
    name, measured, least, floor, _largest, bound = LLAMA_CPP_SETS[which]
    ref = np.load(FIXTURES / name)
    top_ids, top_logits = ref["top_ids_f32"], ref["top_logits_f32"]
    # llama.cpp against itself: its f16 KV cache (its default) against its f32 one
    itself = ref["top_ids_f16"][:, :, 0] == top_ids[:, :, 0]
    assert itself.sum() == floor and itself.mean() < 0.98
    model = LoadedModel(path, backend="cpu", weights="native")
    try:
        got = np.stack([score(model, [int(t) for t in row]).argmax(1) for row in ref["ids"]])
    finally:
        model.close()
    agree = got == top_ids[:, :, 0]
    margins = []
    for p, j in zip(*np.nonzero(~agree)):
        ours = np.flatnonzero(top_ids[p, j] == got[p, j])
        assert ours.size, f"{which} prompt {p} at {j}: our top-1 is not in llama.cpp's top-20"
        margins.append(float(top_logits[p, j, 0] - top_logits[p, j, ours[0]]))
    print(f"gemma3-270m native top-1 vs llama.cpp (f32 KV), {which}: {agree.sum()}/{agree.size} (measured "
          f"{measured}; llama.cpp f16 vs f32 KV: {floor}); largest margin of a miss {max(margins, default=0):.3f}")
    assert max(margins, default=0.0) < bound, f"{which}: a disagreement llama.cpp prefers by {max(margins):.3f}"
    assert agree.sum() >= least


def test_gemma3_270m_chat_renders_gemmas_turns_as_special_tokens():
    """The base model's file has no template; an operator may declare llama.cpp's built-in
    gemma (model_options.chat_template): its turn markers must reach the model as Gemma's special
    tokens, not as text. llama-server --no-jinja --chat-template gemma counts 16 prompt tokens."""
    from engine.model.chat import chat_template_for
    from engine.model.gguf_file import ModelFile
    from engine.model.tokenizer import Tokenizer
    file = ModelFile(gemma3_path())
    meta = file.metadata
    file.close()  # the header's values stay; the mapping goes
    assert "tokenizer.chat_template" not in meta
    text = chat_template_for(meta, "gemma").render([{"role": "user", "content": "What is the capital of France?"}])
    assert text == "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    tok = Tokenizer.from_metadata(meta)
    ids = tok.encode(text, parse_special=True)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert len(ids) == 16 and pieces[:2] == ["<bos>", "<start_of_turn>"] and pieces.count("<start_of_turn>") == 2
    assert all(tok.is_special(i) for i, piece in zip(ids, pieces) if piece in ("<start_of_turn>", "<end_of_turn>"))
