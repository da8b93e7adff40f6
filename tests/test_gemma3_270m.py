"""The real Gemma 3 270M Q4_K_M against transformers float32 on the same (dequantized) weights,
over 768 positions: past its 512-token sliding window. Runs when the model is in the cache
(`plan-engine models pull gemma3-270m`, 253 MB); the reference comes from
tests/fixtures/make_gemma3_reference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelNotFound
from engine.model.registry import resolve
from engine.runtime.generate import LoadedModel, score

REF = Path(__file__).parent / "fixtures" / "gemma3_270m_hf_f32.npz"


@pytest.mark.slow
def test_gemma3_270m_f32_matches_transformers_past_the_window():
    try:
        path = resolve("gemma3-270m", pull_missing=False)
    except ModelNotFound:
        pytest.skip("gemma3-270m is not in the cache: plan-engine models pull gemma3-270m")
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
