"""The OpenAI-compatible HTTP API, driven by the official `openai` SDK against a real server.

The fast tests run the whole path (uvicorn, FastAPI, the control plane, the engine) on the
tiny model; the slow ones use the real default model, where answers can be checked for
meaning and compared token for token with the gRPC API on the same engine.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from engine.errors import ContextOverflow, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from protos.planengine.v1 import control_plane_pb2 as pb
from services.client import PlanEngineClient, plan_from_json
from services.openai_api import PLAN_HEADER, HttpServer, create_app
from services.openai_api.errors import from_engine
from services.openai_api.protocol import IGNORED, UNSUPPORTED
from services.server import ServerConfig, create_server

OPERATOR, AGENT = "s3cret", "agent-token"


def start(tmp_path, model: str | None = None, **overrides):
    plan = plan_from_json(json.dumps({"id": "web", "model": model})) if model else None
    return create_server(ServerConfig(port=0, http_port=0, store_path=tmp_path / "plans.sqlite3", initial_plan=plan,
                                      **overrides))


def sdk(server, token: str = "unused", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token,
                         **{"max_retries": 0, "timeout": 60, **kwargs})


def http(server, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None):
    """A plain HTTP call, outside any SDK: (status, headers, body bytes)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def tiny_served(tiny, tmp_path_factory):
    server = start(tmp_path_factory.mktemp("http"), str(tiny))
    yield server, sdk(server), str(tiny)
    server.stop(1)


def kv_freed(server, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while server.control.runtime.worker.stats()["kv_bytes"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.control.runtime.worker.stats()["kv_bytes"] == 0


# --- the SDK on the tiny model --------------------------------------------------------------

def test_models_list_the_active_plans_model(tiny_served):
    server, client, model = tiny_served
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).owned_by == "plan-engine"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion_with_logprobs_and_usage(tiny_served):
    server, client, model = tiny_served
    raw = client.completions.with_raw_response.create(model=model, prompt="abcd", max_tokens=6, logprobs=2,
                                                      temperature=0, extra_body={"ignore_eos": True})
    out = raw.parse()
    plan = server.control.active_plan
    assert raw.headers[PLAN_HEADER] == out.system_fingerprint == f"web@{plan.version}#{plan.hash}"
    assert raw.headers["x-request-id"] == out.id and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3 and top[token] == logprob
        assert logprob == max(top.values())  # greedy: the sampled token is the most likely


def test_streamed_completion_equals_the_whole_one(tiny_served):
    server, client, model = tiny_served
    args = dict(model=model, prompt="abcd", max_tokens=8, temperature=1.0, seed=11, logprobs=1,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    streamed_lp = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed_lp == whole.choices[0].logprobs.token_logprobs
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}


def test_seed_reproduces_and_token_id_prompts(tiny_served):
    server, client, model = tiny_served
    args = dict(model=model, max_tokens=8, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    ids = server.control.tokenize("abcd")[0]
    a = client.completions.create(prompt="abcd", **args).choices[0].text
    b = client.completions.create(prompt=ids, **args).choices[0].text
    c = client.completions.create(prompt=[ids], **args).choices[0].text
    assert a == b == c


def test_stop_strings(tiny_served):
    server, client, model = tiny_served
    free = client.completions.create(model=model, prompt="abcd", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:5]
    assert stop and stop in free
    cut = client.completions.create(model=model, prompt="abcd", max_tokens=10, temperature=0, stop=[stop, "zzz"],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(model=model, prompt="abcd", max_tokens=10, temperature=0, stop=stop,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_streaming_with_usage_and_logprobs(tiny_served):
    server, client, model = tiny_served
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]}]
    args = dict(model=model, messages=messages, max_completion_tokens=6, temperature=0, logprobs=True,
                top_logprobs=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    content = choice.logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == choice.message.content
    assert all(bytes(t.bytes) == t.token.encode() for t in content)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    streamed = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.logprob for t in content]


@pytest.mark.parametrize("field", sorted(set(UNSUPPORTED) - {"best_of", "suffix", "echo"}))
def test_chat_refuses_what_the_engine_cannot_do_naming_the_field(tiny_served, field):
    server, client, model = tiny_served
    value = {"response_format": {"type": "json_object"},
             "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
             "functions": [{"name": "f"}], "function_call": "auto", "modalities": ["text", "audio"],
             "audio": {"voice": "x", "format": "wav"}, "prediction": {"type": "content", "content": "x"}}[field]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={field: value})
    assert err.value.body["param"] == field and field in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value", [("best_of", 3), ("echo", True), ("suffix", "x")])
def test_completions_refuse_what_the_engine_cannot_do(tiny_served, field, value):
    server, client, model = tiny_served
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="ab", max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field


def test_n_choices_streamed_and_not(tiny_served):
    server, client, model = tiny_served
    out = client.completions.create(model=model, prompt="ab", max_tokens=4, n=3, seed=7, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=model, prompt="ab", max_tokens=4, n=3, seed=7, temperature=1.0,
                                            stream=True, extra_body={"ignore_eos": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    assert texts == {c.index: c.text for c in out.choices}
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="ab", max_tokens=2, n=17)
    assert err.value.body["param"] == "n"


def test_logit_bias_stop_token_ids_and_min_tokens(tiny_served):
    server, client, model = tiny_served
    out = client.completions.create(model=model, prompt="ab", max_tokens=4, logit_bias={"2": 100},
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == "cccc"  # token 2 is "c" in the tiny vocabulary
    out = client.completions.create(model=model, prompt="ab", max_tokens=4, logit_bias={"7": 100},
                                    extra_body={"min_tokens": 2, "stop_token_ids": [2]})
    assert out.usage.completion_tokens == 2 and out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="ab", max_tokens=2, logit_bias={"x": 1})
    assert err.value.body["param"] == "logit_bias"


def test_defaults_of_unsupported_fields_and_ignored_fields_are_accepted(tiny_served):
    server, client, model = tiny_served
    defaults = {"n": 1, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                "user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "prompt_cache_key": "k", "safety_identifier": "s", "parallel_tool_calls": True}
    assert set(IGNORED) <= set(defaults)
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         extra_body=defaults)
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param, words", [
    ({"foo": 1}, "foo", "Unrecognized request argument"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"max_tokens": 10 ** 6}, "max_tokens", "exceeds the plan's limit"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "disagree"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0]", "deprecated"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]",
     "function"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"}, "tool_choice", "auto"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "only text parts"),
    ({"messages": []}, "messages", "at least 1"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop", "exceed the limit of 16"),  # the server's request limits
    ({"messages": [{"role": "user", "content": "a"}] * 1025}, "messages", "exceed the limit of 1024"),
])
def test_bad_chat_requests_are_400_naming_the_field(tiny_served, body, param, words):
    server, client, model = tiny_served
    request = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    status, _, raw = http(server, "POST", "/v1/chat/completions", request)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param and words in error["message"], error
    assert kv_freed(server)


def test_prompt_over_the_context_is_context_length_exceeded(tiny_served):
    server, client, model = tiny_served
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="ab" * 100, max_tokens=2)
    assert err.value.code == "context_length_exceeded" and "context length 64" in err.value.message


def test_not_json_unknown_route_and_method_in_openai_shape(tiny_served):
    server, client, model = tiny_served
    status, _, raw = http(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, _, raw = http(server, "GET", "/v1/embeddings")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    status, _, raw = http(server, "GET", "/v1/chat/completions")
    assert status == 405 and "GET" in json.loads(raw)["error"]["message"]
    status, _, raw = http(server, "GET", "/health")
    assert status == 200 and json.loads(raw)["plan"].startswith("web@")


def test_raw_server_sent_events(tiny_served):
    server, client, model = tiny_served
    status, headers, raw = http(server, "POST", "/v1/completions",
                                {"model": model, "prompt": "abcd", "max_tokens": 3, "stream": True, "ignore_eos": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers[PLAN_HEADER].startswith("web@")
    lines = [ln for ln in raw.decode().split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_same_engine_as_grpc(tiny_served):
    server, client, model = tiny_served
    before = server.control.metrics.snapshot()["requests_total"]
    args = dict(max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(model=model, prompt="abcd", **args).choices[0].text
    with PlanEngineClient(f"127.0.0.1:{server.port}") as grpc_client:
        final = list(grpc_client.generate(text="abcd", max_tokens=5, ignore_eos=True, include_text=True))[-1].final
        snap = grpc_client.stub.GetMetrics(pb.GetMetricsRequest())
    assert final.text == text
    assert snap.requests_total == before + 2  # both counted by the one metrics hub


# --- errors map to the SDK's classes ----------------------------------------------------------

def test_errors_map_to_the_sdks_exception_classes(tiny, tmp_path):
    policy = tmp_path / "agents.json"
    policy.write_text(json.dumps({"agents": {"tuner": {"token": AGENT, "mode": "dry_run",
                                                       "fields": {"batching.max_batch_size": {"min": 1, "max": 8}}}}}))
    server = start(tmp_path, str(tiny), auth_tokens=[OPERATOR], agent_policy=policy)
    try:
        chat = dict(model=str(tiny), messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError) as err:
            sdk(server, "wrong").chat.completions.create(**chat)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "wrong").models.list()
        with pytest.raises(openai.PermissionDeniedError):
            sdk(server, AGENT).chat.completions.create(**chat)
        good = sdk(server, OPERATOR)
        with pytest.raises(openai.NotFoundError) as err:
            good.chat.completions.create(**{**chat, "model": "gpt-4o"})
        assert err.value.code == "model_not_found" and err.value.param == "model"
        with pytest.raises(openai.BadRequestError):
            good.chat.completions.create(**chat, n=17)
        assert good.chat.completions.create(**chat).choices[0].message.role == "assistant"
        # the scheme in any case, as on the gRPC side
        for scheme in ("bearer", "BEARER"):
            status, _, raw = http(server, "GET", "/v1/models", headers={"authorization": f"{scheme} {OPERATOR}"})
            assert status == 200, raw
        assert http(server, "GET", "/health")[0] == 200  # open to probes
    finally:
        server.stop(1)


@pytest.mark.parametrize("exc, status, headers", [
    (InvalidArgument("bad", field="sampling.top_p"), 400, {}),
    (ContextOverflow("too long"), 400, {}),
    (ResourceExhausted("queue full", retry_after_s=1.2), 429, {"retry-after": "2"}),
    (ResourceExhausted("arena too small"), 429, {"x-should-retry": "false"}),  # waiting cannot help
    (Unavailable("loading"), 503, {}),
])
def test_domain_errors_get_their_http_status(exc, status, headers):
    err = from_engine(exc)
    assert err.status == status and err.headers == headers
    if isinstance(exc, InvalidArgument) and exc.field:
        assert err.param == "top_p"


class RefusingControl:
    """A control plane whose engine refuses every request with `exc`: the HTTP layer alone, on a real server."""

    def __init__(self, exc: Exception):
        self.exc = exc
        self.active_plan = SimpleNamespace(id="p", version=1, hash="h" * 64, model="m")
        self.runtime = SimpleNamespace(plan=self.active_plan, model=SimpleNamespace(tokenizer=None))

    def generate(self, request):
        raise self.exc


@pytest.mark.parametrize("exc, sdk_error, status", [
    (ResourceExhausted("the queue is full", retry_after_s=0.5), openai.RateLimitError, 429),
    (FailedPrecondition("the engine is draining"), openai.BadRequestError, 400),
    (Unavailable("the engine is not serving"), openai.InternalServerError, 503),
    (RuntimeError("a bug"), openai.InternalServerError, 500),
])
def test_engine_refusals_reach_the_sdk_as_its_exception_classes(exc, sdk_error, status):
    http = HttpServer(create_app(RefusingControl(exc))).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(sdk_error) as err:
            client.completions.create(model="m", prompt="ab", max_tokens=2)
        assert err.value.status_code == status and str(exc) in err.value.message
        if status == 429:
            assert err.value.response.headers["retry-after"] == "1"
    finally:
        http.stop(1)


# --- the real default model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_served(model_path, tmp_path_factory):
    server = start(tmp_path_factory.mktemp("http-real"))
    yield server, sdk(server), server.control.active_plan.model
    server.stop(5)


@pytest.mark.slow
def test_chat_with_the_real_model_streaming_and_not(real_served):
    server, client, model = real_served
    args = dict(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args)
    answer = whole.choices[0].message.content
    assert "Paris" in answer and whole.choices[0].finish_reason == "stop"
    plan = server.control.active_plan
    assert whole.model == "smollm2-135m-instruct-q4_1"
    assert whole.system_fingerprint == f"default@{plan.version}#{plan.hash}"
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == \
        [t.token for t in whole.choices[0].logprobs.content]


@pytest.mark.slow
def test_completion_stop_with_the_real_model(real_served):
    server, client, model = real_served
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
                                    stop=["Paris"], logprobs=1)
    choice = out.choices[0]
    assert "Paris" not in choice.text and choice.finish_reason == "stop"
    assert choice.logprobs.tokens[-1].strip() == "Paris"  # generated, then held back as the stop string
    streamed = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                              temperature=0, stop="Paris", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text


@pytest.mark.slow
def test_http_and_grpc_run_the_same_tokens(real_served, generation_reference):
    server, client, model = real_served
    case = generation_reference[0]
    out = client.completions.create(model=model, prompt=case["prompt_ids"], max_tokens=12, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    with PlanEngineClient(f"127.0.0.1:{server.port}") as grpc_client:
        responses = list(grpc_client.generate(ids=case["prompt_ids"], max_tokens=12, ignore_eos=True, logprobs=True,
                                              include_text=True))
    ids = [i for r in responses[:-1] for i in r.delta.token_ids]
    assert ids == case["hf_f32"]["greedy"][:12]
    assert out.choices[0].text == responses[-1].final.text
    grpc_logprobs = [lp for r in responses[:-1] for lp in r.delta.logprobs]
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(grpc_logprobs, abs=1e-5)


@pytest.mark.slow
def test_client_disconnect_cancels_the_request(real_served):
    server, client, model = real_served
    stream = client.completions.create(model=model, prompt="Tell me a long story", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    next(stream), next(stream)
    assert server.control.runtime.worker.stats()["kv_bytes"] > 0
    stream.close()  # the client goes away mid-stream
    assert kv_freed(server)
    # not streaming: the client gives up waiting
    slow = sdk(server, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        slow.completions.create(model=model, prompt="Tell me a long story", max_tokens=400,
                                extra_body={"ignore_eos": True})
    assert kv_freed(server)


@pytest.mark.slow
def test_grpc_cancel_stops_an_http_request(real_served):
    server, client, model = real_served
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a story"}],
                                            max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    first = next(stream)
    with PlanEngineClient(f"127.0.0.1:{server.port}") as grpc_client:
        assert grpc_client.cancel(first.id) is True  # the response id is the engine's request id
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "cancelled"
    assert kv_freed(server)


@pytest.mark.slow
def test_a_drain_lets_open_http_streams_finish(model_path, tmp_path):
    import threading
    server = start(tmp_path)
    client = sdk(server)
    stream = client.completions.create(model=server.control.active_plan.model, prompt="Once upon a time",
                                       max_tokens=24, stream=True, extra_body={"ignore_eos": True})
    first = next(stream)
    stopping = threading.Thread(target=server.stop, args=(30,))
    stopping.start()  # SIGTERM's path: the socket closes, the stream in flight goes on
    chunks = [first, *stream]
    stopping.join(60)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert not stopping.is_alive()
    with pytest.raises(openai.APIConnectionError):  # no new connections once draining began
        client.models.list()
