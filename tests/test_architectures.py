"""Every architecture against transformers, on tiny random-weight models (tests/fixtures/arch/).

The GGUF files were converted by llama.cpp's convert_hf_to_gguf.py from transformers models,
whose float32 logits are the reference (tests/fixtures/make_arch_models.py; not run here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.memory.paged import BlockArena, PagedKV
from engine.runtime.generate import Generation, LoadedModel, score
from engine.runtime.model import Segment
from engine.runtime.sampling import SamplingParams

ARCH = Path(__file__).parent / "fixtures" / "arch"
CASES = sorted(json.loads((ARCH / "manifest.json").read_text()))
TOP_K, LOGIT_TOLERANCE = 20, 0.05


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model = LoadedModel(ARCH / f"{request.param}.gguf", backend="cpu", weights="f32")
    yield request.param, model, np.load(ARCH / f"{request.param}.npz")
    model.close()


def test_teacher_forced_logits_match_transformers(case):
    name, model, ref = case
    ids, want = ref["teacher_ids"], ref["logits"]
    assert len(ids) >= 64
    got = score(model, [int(t) for t in ids])
    assert got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).all(), f"{name}: top-1 differs at {np.flatnonzero(got.argmax(1) != want.argmax(1))}"
    top = np.argsort(-want, axis=1)[:, :TOP_K]
    err = np.abs(np.take_along_axis(got, top, 1) - np.take_along_axis(want, top, 1)).max()
    assert err < LOGIT_TOLERANCE, f"{name}: top-{TOP_K} logits off by {err:.4f}"
    print(f"{name}: top-1 equal at {len(ids)}/{len(ids)} positions, max |top-{TOP_K} logit diff| {err:.2e}")


def test_greedy_32_tokens_equal_transformers(case):
    name, model, ref = case
    gen = Generation(model, [int(t) for t in ref["prompt_ids"]], SamplingParams(temperature=0.0, max_tokens=32),
                     ignore_eos=True)
    list(gen)
    assert gen.completion.ids == [int(t) for t in ref["greedy_ids"]], name


def test_paged_batched_decode_equals_one_pass(case):
    """Two sequences through one paged arena (chunked prefill, then decoding side by side, the
    worker's path) give the logits of one full pass: sliding layers included."""
    name, model, ref = case
    ids = [int(t) for t in ref["teacher_ids"]][:48]
    full = score(model, ids)
    arena = BlockArena(model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, 16, 8)
    seqs = [PagedKV(arena, 64), PagedKV(arena, 64)]
    for kv in seqs:
        assert kv.reserve(len(ids))
    t = model.transformer
    t.forward([Segment(seqs[0], np.array(ids[:20]), 0, "none"), Segment(seqs[1], np.array(ids[:5]), 0, "none")])
    t.forward([Segment(seqs[1], np.array(ids[5:20]), 5, "none")])
    for pos in range(20, len(ids)):
        out = t.forward([Segment(kv, np.array([ids[pos]]), pos, "last") for kv in seqs])
        for logits in out:
            np.testing.assert_allclose(logits[0], full[pos], atol=2e-3, err_msg=f"{name} at {pos}")
