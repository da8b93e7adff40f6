"""One request must never take the engine down (issue 13): extreme sampling values, non-finite
logits, a failing step and a lost worker each end only what they must, on the tiny model."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tiny_gguf import write_tiny_gguf

from engine.errors import ModelFormatError, Unavailable
from engine.memory.paged import BlockArena
from engine.runtime.generate import LoadedModel
from engine.runtime.sampling import SamplingParams
from engine.runtime.worker import EngineWorker, Final, RequestSpec
from engine.scheduler.base import FifoPolicy

POISON = 3  # a prompt starting with this token gets NaN logits from the poisoned forward below


@pytest.fixture
def model(tiny):
    m = LoadedModel(tiny)
    yield m
    m.close()


@pytest.fixture
def lost():
    return []


@pytest.fixture
def worker(model, lost):
    w = EngineWorker(model, FifoPolicy(), arena=BlockArena.for_model(model.config, 64, 16), on_lost=lost.append)
    yield w
    w.close()


def run(worker, prompt, **params) -> Final:
    params.setdefault("max_tokens", 4)
    handle = worker.submit(RequestSpec("", list(prompt), SamplingParams(**params), ignore_eos=True))
    events = list(handle.events())
    assert isinstance(events[-1], Final)
    return events[-1]


@pytest.mark.parametrize("params", [dict(temperature=1e-38), dict(temperature=1e-40), dict(temperature=1e-45),
                                    dict(temperature=0.8, repetition_penalty=1e-38),
                                    dict(temperature=5.0, repetition_penalty=1e38, top_p=0.5, min_p=0.2)])
def test_extreme_but_valid_sampling_values_generate(worker, params):
    final = run(worker, [6, 1, 2], seed=1, **params)
    assert final.finish_reason == "length" and not final.error and len(final.ids) == 4
    assert run(worker, [6, 1]).finish_reason == "length"  # and the engine goes on
    assert worker.lost is None


def poison(model, monkeypatch, fail_with: Exception | None = None):
    forward = model.transformer.forward

    def poisoned(segments):
        if fail_with is not None and any(int(s.tokens[0]) == POISON for s in segments):
            raise fail_with
        out = forward(segments)
        return [np.full_like(lg, np.nan) if int(s.tokens[0]) == POISON and s.start == 0 else lg
                for s, lg in zip(segments, out)]

    monkeypatch.setattr(model.transformer, "forward", poisoned)


def test_non_finite_logits_fail_only_that_request(model, worker, monkeypatch):
    poison(model, monkeypatch)
    good = [worker.submit(RequestSpec("", [6, 1, 2], SamplingParams(max_tokens=6), ignore_eos=True))
            for _ in range(3)]
    bad = worker.submit(RequestSpec("bad", [POISON, 1], SamplingParams(max_tokens=6), ignore_eos=True))
    final = list(bad.events())[-1]
    assert final.finish_reason == "error" and "NaN" in final.error, final.error
    for h in good:
        assert list(h.events())[-1].finish_reason == "length"
    assert worker.lost is None and worker.failed_requests == 1
    assert worker.stats()["kv_blocks_used"] == 0
    assert run(worker, [6, 2]).finish_reason == "length"


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(model, worker, monkeypatch):
    poison(model, monkeypatch, fail_with=RuntimeError("kernel exploded"))
    final = run(worker, [POISON, 1])
    assert final.finish_reason == "error" and "RuntimeError: kernel exploded" in final.error
    assert run(worker, [6, 1, 2]).finish_reason == "length"
    assert worker.lost is None and worker.stats()["kv_blocks_used"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated loss
def test_a_lost_worker_says_so_and_refuses_new_requests(model, worker, lost, monkeypatch):
    def broken_reap(force=False):
        raise SystemExit("simulated loss of the engine thread")

    handle = worker.submit(RequestSpec("", [6, 1], SamplingParams(max_tokens=400), ignore_eos=True))
    monkeypatch.setattr(worker, "_reap", broken_reap)
    final = list(handle.events())[-1]
    assert final.finish_reason == "error"
    worker._thread.join(5)
    assert worker.lost and "simulated loss" in worker.lost and lost == [worker.lost]
    with pytest.raises(Unavailable, match="engine worker stopped"):
        worker.submit(RequestSpec("", [6, 1], SamplingParams(max_tokens=2)))


@pytest.mark.parametrize("tensor", ["blk.0.attn_q.weight", "blk.0.ffn_norm.weight", "output_norm.weight"])
def test_a_model_with_nan_weights_is_refused_at_load(tmp_path, tensor):
    path = write_tiny_gguf(tmp_path / "nan.gguf", nan_tensor=tensor)
    with pytest.raises(ModelFormatError, match=f"tensor '{tensor}' holds NaN"):
        LoadedModel(path)


def test_non_finite_scales_of_quantized_blocks_are_found(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from tiny_gguf import tiny_writer

    from engine.model.gguf_file import ModelFile
    from engine.model.integrity import check_finite

    def model(scale: float):
        w = tiny_writer(tmp_path / f"q{scale}.gguf")
        rng = np.random.default_rng(0)
        for name, shape in [("token_embd.weight", (8, 32)), ("blk.0.attn_q.weight", (32, 32))]:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        block = quants.quantize(rng.standard_normal((64, 32)).astype(np.float32), Q.Q8_0)
        block.reshape(-1, 34)[5, 0:2] = np.array([scale], np.float16).view(np.uint8)
        w.add_tensor("blk.0.ffn_up.weight", block, raw_dtype=Q.Q8_0)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return ModelFile(tmp_path / f"q{scale}.gguf")

    check_finite(model(0.5))
    for bad in (np.nan, np.inf):
        with pytest.raises(ModelFormatError, match="blk.0.ffn_up.weight"):
            check_finite(model(bad))


def test_tokenizing_a_long_text_lets_other_threads_run(model):
    """The tokenizer releases the GIL: while a 2 MB prompt is tokenized, the engine thread and
    other clients' streams go on (encode held it for ~30 s on a 12 MB prompt)."""
    import threading
    ticks, done = [0], threading.Event()

    def ticker():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.05)
    before = ticks[0]
    ids = model.tokenizer.encode("abcd" * 500_000)
    during = ticks[0] - before
    done.set()
    t.join()
    assert len(ids) == 1_000_000  # "ab" "cd" merges
    assert during > 10, f"only {during} ticks of another thread while tokenizing: the GIL was held"
