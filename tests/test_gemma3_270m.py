"""The real Gemma 3 270M Q4_K_M against transformers float32 on the same (dequantized) weights,
over 768 positions: past its 512-token sliding window; and its `native` weights against
llama.cpp. Runs when the model is in the cache (`plan-engine models pull gemma3-270m`, 253 MB);
the references come from tests/fixtures/make_gemma3_reference.py and
make_gemma3_llamacpp_reference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelNotFound
from engine.model.registry import resolve
from engine.runtime.generate import LoadedModel, score

REF = Path(__file__).parent / "fixtures" / "gemma3_270m_hf_f32.npz"
LLAMA_CPP_REF = Path(__file__).parent / "fixtures" / "gemma3_270m_llamacpp.npz"


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
# have large outliers, so its logits move by ~0.2 on average under any float-rounding change
# (its own f16 KV cache against its f32 one: 753/800 top-1): nothing short of its exact float
# order reaches the 98 % (docs/13_architectures.md). Asserted: what is measured,
# with every disagreement a near-tie in llama.cpp's own logits.
LLAMA_CPP_TOP1 = 0.92  # measured 744/800 (93.0 %) against the f32 KV cache
LLAMA_CPP_NEAR_TIE = 0.75  # measured: the largest margin of a disagreement is 0.53


@pytest.mark.slow
def test_gemma3_270m_native_against_llama_cpp():
    path = gemma3_path()
    ref = np.load(LLAMA_CPP_REF)
    model = LoadedModel(path, backend="cpu", weights="native")
    try:
        got = np.stack([score(model, [int(t) for t in row]).argmax(1) for row in ref["ids"]])
    finally:
        model.close()
    top_ids, top_logits = ref["top_ids_f32"], ref["top_logits_f32"]
    agree = got == top_ids[:, :, 0]
    for p, j in zip(*np.nonzero(~agree)):
        ours = np.flatnonzero(top_ids[p, j] == got[p, j])
        assert ours.size, f"prompt {p} at {j}: our top-1 is not in llama.cpp's top-20"
        margin = top_logits[p, j, 0] - top_logits[p, j, ours[0]]
        assert margin < LLAMA_CPP_NEAR_TIE, f"prompt {p} at {j}: llama.cpp prefers its top-1 by {margin:.3f}"
    print(f"gemma3-270m native top-1 vs llama.cpp (f32 KV): {agree.sum()}/{agree.size}")
    assert agree.mean() >= LLAMA_CPP_TOP1
