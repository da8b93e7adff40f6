"""logit_bias, stop_token_ids, min_tokens and prompt logprobs (issue 17, item 5): through a real
server on the tiny model (vocabulary a b c d ab cd <s> </s>; </s> = 7 ends a turn), and the
prompt logprobs checked against a whole-prompt scoring pass."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from engine.memory.paged import BlockArena
from engine.runtime.generate import LoadedModel, score
from engine.runtime.sampling import SamplingParams
from engine.runtime.worker import EngineWorker, RequestSpec, WorkerLimits
from engine.scheduler.base import FifoPolicy
from protos.planengine.v1 import plan_pb2
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

EOS = 7


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    server = create_server(ServerConfig(port=0, store_path=tmp / "plans.sqlite3",
                                        initial_plan=plan_pb2.ExecutionPlan(id="tiny", model=str(tiny))))
    client = PlanEngineClient(f"127.0.0.1:{server.port}", timeout=30)
    yield server, client
    client.close()
    server.stop(5)


def generate(client, **fields):
    fields.setdefault("max_tokens", 6)
    responses = list(client.generate(ids=[6, 0, 1, 2, 3], **fields))
    return [i for r in responses[:-1] for i in r.delta.token_ids], responses[-1].final


def test_logit_bias_forces_and_bans_tokens(served):
    _, client = served
    ids, _ = generate(client, logit_bias={2: 100.0}, ignore_eos=True)
    assert ids == [2] * 6
    greedy, _ = generate(client, ignore_eos=True)
    banned, _ = generate(client, logit_bias={greedy[0]: -100.0}, ignore_eos=True)
    assert greedy[0] not in banned


def test_stop_token_ids_end_generation_without_returning_the_token(served):
    _, client = served
    sampled = dict(ignore_eos=True, max_tokens=16, seed=5, sampling={"temperature": 1.5})
    free, _ = generate(client, **sampled)  # the same seed draws the same tokens up to the stop
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    ids, final = generate(client, stop_token_ids=[free[k]], **sampled)
    assert ids == free[:k] and final.finish_reason == "stop"


def test_min_tokens_holds_back_end_of_turn(served):
    _, client = served
    ids, final = generate(client, logit_bias={EOS: 100.0})
    assert ids == [] and final.finish_reason == "stop"
    ids, final = generate(client, logit_bias={EOS: 100.0}, min_tokens=3)
    assert len(ids) == 3 and EOS not in ids and final.finish_reason == "stop"
    ids, final = generate(client, logit_bias={EOS: 100.0, 1: 50.0}, min_tokens=2, stop_token_ids=[1])
    assert len(ids) == 2 and not {1, EOS} & set(ids) and final.finish_reason == "stop"  # 1 waits too


def test_prompt_logprobs_match_a_scoring_pass(served, tiny):
    _, client = served
    prompt = [6, 0, 1, 2, 3, 4, 5, 0, 0, 1]
    responses = list(client.generate(ids=prompt, max_tokens=2, prompt_logprobs=3))
    final = responses[-1].final
    assert [p.token_id for p in final.prompt_logprobs] == prompt[1:]
    model = LoadedModel(tiny)
    try:
        logits = score(model, prompt)[:-1].astype(np.float64)
    finally:
        model.close()
    reference = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    for i, p in enumerate(final.prompt_logprobs):
        assert p.logprob == pytest.approx(reference[i, prompt[i + 1]], abs=1e-4)
        top = [t.token_id for t in p.top_logprobs]
        assert len(top) == 3 and top[0] == int(np.argmax(reference[i]))
        assert [t.logprob for t in p.top_logprobs] == sorted((t.logprob for t in p.top_logprobs), reverse=True)
    # without the field: none
    assert not list(client.generate(ids=prompt, max_tokens=1))[-1].final.prompt_logprobs


@pytest.mark.parametrize("fields,field", [
    (dict(logit_bias={99: 1.0}), "logit_bias"), (dict(logit_bias={1: 200.0}), "logit_bias"),
    (dict(stop_token_ids=[8]), "stop_token_ids"), (dict(min_tokens=9, max_tokens=4), "min_tokens"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(stop_token_ids=list(range(65))), "stop_token_ids"),
])
def test_bad_values_are_invalid_argument(served, fields, field):
    _, client = served
    with pytest.raises(grpc.RpcError) as err:
        generate(client, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), err.value.details()


def test_prompt_logprobs_in_chunks_and_across_a_preemption(tiny, monkeypatch):
    """A long prompt's logprobs come chunk by chunk; a preempted request does not count them twice."""
    import engine.runtime.worker as worker_module
    monkeypatch.setattr(worker_module, "PROMPT_LOGPROBS_CHUNK", 5)
    model = LoadedModel(tiny)
    prompt = [6] + [int(x) for x in np.random.default_rng(3).integers(0, 6, 40)]
    try:
        whole = score(model, prompt)[:-1]
        w = EngineWorker(model, FifoPolicy(), WorkerLimits(max_batched_tokens=7),
                         arena=BlockArena.for_model(model.config, 64, 16))
        try:
            final = list(w.submit(RequestSpec("", prompt, SamplingParams(max_tokens=3), ignore_eos=True,
                                              prompt_logprobs=1)).events())[-1]
        finally:
            w.close()
    finally:
        model.close()
    assert [t for t, _, _ in final.prompt_logprobs] == prompt[1:] and w.steps >= 40 // 5
    z = np.log(np.exp(whole.astype(np.float64) - whole.max(1, keepdims=True)).sum(1)) + whole.max(1)
    assert np.allclose([lp for _, lp, _ in final.prompt_logprobs], whole[np.arange(40), prompt[1:]] - z, atol=1e-4)


# --- n > 1 (issue 17, item 4) --------------------------------------------------------------------

def completions(w, prompt, n, **params):
    params.setdefault("max_tokens", 8)
    events = list(w.submit(RequestSpec("", prompt, SamplingParams(**params), ignore_eos=True, n=n)).events())
    finals = sorted((e for e in events if hasattr(e, "finish_reason")), key=lambda f: f.index)
    streamed = {i: [e.token_id for e in events if getattr(e, "token_id", None) is not None and e.index == i]
                for i in range(n)}
    assert [f.index for f in finals] == list(range(n))
    assert all(streamed[f.index] == f.ids for f in finals)
    return finals


@pytest.fixture
def tiny_model(tiny):
    m = LoadedModel(tiny)
    yield m
    m.close()


def small_worker(model, num_blocks=40, prefix_caching=False):
    from engine.memory.paged import BlockArena
    c = model.config
    return EngineWorker(model, FifoPolicy(), arena=BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks, 4),
                        prefix_caching=prefix_caching)


@pytest.mark.parametrize("caching", [False, True])
def test_n_completions_each_equal_a_single_request_with_its_seed(tiny_model, caching):
    prompt = [6, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # 11 tokens: two full blocks and a partial one
    w = small_worker(tiny_model, prefix_caching=caching)
    try:
        greedy = completions(w, prompt, 3)
        single = completions(w, prompt, 1)[0].ids
        assert all(f.ids == single and f.finish_reason == "length" for f in greedy)
        sampled = completions(w, prompt, 4, temperature=1.3, seed=10)
        for f in sampled:
            assert f.ids == completions(w, prompt, 1, temperature=1.3, seed=10 + f.index)[0].ids
            assert f.seed == 10 + f.index
        assert len({tuple(f.ids) for f in sampled}) > 1
        assert w.arena.used_blocks == 0 and not w.arena._refs
    finally:
        w.close()


def test_n_completions_share_the_prompt_blocks(tiny_model):
    prompt = [6] + [1, 2, 3, 4] * 5  # 21 tokens: five full blocks and one token in a sixth
    w = small_worker(tiny_model)
    seen = []
    fork = w._fork

    def recording_fork(parent):
        children = fork(parent)
        seen.append(([w.arena.refs(b) for b in parent.kv.blocks[:5]],
                     [c.kv.blocks[5] != parent.kv.blocks[5] for c in children]))
        return children

    w._fork = recording_fork
    try:
        completions(w, prompt, 3)
    finally:
        w.close()
    (refs, own_tail), = seen
    assert refs == [3] * 5 and own_tail == [True, True]  # full blocks shared, the partial one copied


def test_n_completions_in_a_small_arena_and_cancelled(tiny_model):
    prompt = [6, 0, 1, 2, 3, 4, 5]
    w = small_worker(tiny_model, num_blocks=5)  # 20 positions: not all three choices' blocks at once
    try:
        single = completions(w, prompt, 1)[0].ids
        finals = completions(w, prompt, 3)
        assert all(f.ids == single for f in finals)
    finally:
        w.close()
    w = small_worker(tiny_model)
    try:
        handle = w.submit(RequestSpec("c", prompt, SamplingParams(max_tokens=50), ignore_eos=True, n=3))
        events = handle.events()
        next(events)
        assert handle.cancel()
        finals = [e for e in events if hasattr(e, "finish_reason")]
        assert sorted(f.index for f in finals) == [0, 1, 2] and all(f.finish_reason == "cancelled" for f in finals)
        assert w.arena.used_blocks == 0
    finally:
        w.close()


def test_n_through_the_server(served):
    _, client = served
    responses = list(client.generate(ids=[6, 0, 1, 2], max_tokens=5, n=3, seed=4, ignore_eos=True,
                                     sampling={"temperature": 1.0}))
    finals = [r for r in responses if r.HasField("final")]
    assert sorted(r.index for r in finals) == [0, 1, 2] and responses[-1].HasField("final")
    for r in finals:
        ids = [i for d in responses if d.HasField("delta") and d.index == r.index for i in d.delta.token_ids]
        assert len(ids) == r.final.usage.completion_tokens == 5 and r.final.seed == 4 + r.index
    with pytest.raises(grpc.RpcError) as err:
        generate(client, n=17)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n 17" in err.value.details()


def test_n_choices_each_follow_the_response_format(tiny_model):
    from engine.runtime.constraints import ResponseFormat
    w = small_worker(tiny_model)
    try:
        spec = RequestSpec("", [6, 0, 1], SamplingParams(max_tokens=8, temperature=1.5, seed=2), n=4,
                           response_format=ResponseFormat("choice", ("abcd", "cdab", "cdcd")))
        finals = [e for e in w.submit(spec).events() if hasattr(e, "finish_reason")]
    finally:
        w.close()
    assert sorted(f.index for f in finals) == [0, 1, 2, 3]
    assert all(f.text in ("abcd", "cdab", "cdcd") and f.finish_reason == "stop" for f in finals), finals


def test_cli_generate_flags_for_each_feature(served):
    import json as _json

    from cli_runner import cli
    server, _ = served
    r = cli("generate", "abcd", "--server", f"127.0.0.1:{server.port}", "-n", "3", "--json", "--n", "2",
            "--logit-bias", "2=100", "--min-tokens", "1", "--stop-token-id", "5", "--prompt-logprobs", "1")
    assert r.returncode == 0, r.stderr
    messages = [_json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    finals = [m for m in messages if "final" in m]
    assert sorted(m.get("index", 0) for m in finals) == [0, 1]
    assert all(m["final"]["prompt_logprobs"] for m in finals[:1])
    deltas = [i for m in messages if "delta" in m for i in m["delta"].get("token_ids", [])]
    assert deltas and set(deltas) == {2}  # the bias forces "c"
    r = cli("generate", "abcd", "--server", f"127.0.0.1:{server.port}", "--logit-bias", "x")
    assert r.returncode != 0 and "--logit-bias takes ID=BIAS" in r.stderr
