"""One request must never take the service down (issue 13), through a real server on the tiny model:
extreme sampling values, a failing request, idle and flooding streams, oversized input, shutdown."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

AGENT = "agent-token"


def start(tmp_path, tiny, **overrides):
    (tmp_path / "agents.json").write_text(json.dumps({"agents": {"tuner": {
        "token": AGENT, "mode": "auto", "fields": {"batching.max_batch_size": {"min": 1, "max": 64}}}}}))
    overrides.setdefault("agent_policy", tmp_path / "agents.json")
    overrides.setdefault("insecure_operator", True)  # agents and an unauthenticated operator: a test server
    config = ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3",
                          initial_plan=plan_pb2.ExecutionPlan(id="tiny", model=str(tiny)), **overrides)
    server = create_server(config)
    return server, PlanEngineClient(f"127.0.0.1:{server.port}", timeout=30)


@pytest.fixture
def served(tmp_path, tiny):
    server, client = start(tmp_path, tiny, max_workers=10, reserved_threads=4, max_idle_streams_per_client=3,
                           suggest_idle_s=1.0)
    yield server, client
    client.close()
    server.stop(5)


def idle_requests(until: threading.Event, timeout: float = 60):
    """A request stream that sends nothing (an idle agent) until `until` is set."""
    until.wait(timeout)
    return
    yield


def health(client) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def generate(client, **kwargs) -> pb.GenerateFinal:
    kwargs.setdefault("max_tokens", 4)
    responses = list(client.generate(text="abcd", ignore_eos=True, **kwargs))
    assert responses[-1].HasField("final")
    return responses[-1].final


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("sampling", [{"temperature": 1e-38}, {"temperature": 1e-45},
                                      {"temperature": 0.9, "repetition_penalty": 1e-38}])
def test_extreme_sampling_values_generate_and_the_engine_goes_on(served, sampling):
    server, client = served
    assert generate(client, sampling=sampling, seed=3).finish_reason == "length"
    assert generate(client).finish_reason == "length"
    assert health(client) == health_pb2.HealthCheckResponse.SERVING


def test_a_plan_default_of_temperature_1e_38_serves(served):
    _, client = served
    client.submit_plan({"id": "tiny", "model": client.active_plan().model,
                        "sampling": {"temperature": 1e-38, "repetition_penalty": 1e-38}}, activate=True)
    assert generate(client).finish_reason == "length"
    assert health(client) == health_pb2.HealthCheckResponse.SERVING


def test_a_failed_request_is_an_error_status_and_only_that_request_fails(served, monkeypatch):
    server, client = served
    transformer = server.control.runtime.model.transformer
    forward = transformer.forward
    monkeypatch.setattr(transformer, "forward", lambda segments: [x * float("nan") for x in forward(segments)])
    code, details = code_of(lambda: generate(client))
    assert code == grpc.StatusCode.INTERNAL and "NaN" in details, details
    monkeypatch.setattr(transformer, "forward", forward)
    assert generate(client).finish_reason == "length"
    assert health(client) == health_pb2.HealthCheckResponse.SERVING


def wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_watch_metrics_streams_are_capped_per_client_and_freed_on_cancel(served):
    server, client = served
    watches = [client.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600)) for _ in range(3)]
    for w in watches:
        next(w)  # each stream is open and has sent its first snapshot
    code, details = code_of(lambda: next(client.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in details
    assert health(client) == health_pb2.HealthCheckResponse.SERVING  # unary RPCs keep their threads
    assert client.stub.GetMetrics(pb.GetMetricsRequest(), timeout=5).requests_total >= 0
    for w in watches:
        w.cancel()
    # the handlers wake on the cancel (they do not sleep out their hour) and give their slots back
    assert wait_until(lambda: server.streams.open_streams() == 0)
    next(client.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600))).at  # room again


def test_streams_never_take_the_threads_unary_rpcs_need(served):
    server, client = served
    tokens = [PlanEngineClient(f"127.0.0.1:{server.port}", token=f"t{i}") for i in range(6)]
    open_streams = []
    for c in tokens:  # six clients, one stream each: the server admits max_workers - reserved = 6
        w = c.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600), metadata=c.metadata)
        next(w)
        open_streams.append(w)
    code, details = code_of(lambda: generate(client))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams open" in details
    assert health(client) == health_pb2.HealthCheckResponse.SERVING
    assert client.tokenize("ab").ids
    for w in open_streams:
        w.cancel()
    assert wait_until(lambda: server.streams.open_streams() == 0)
    assert generate(client).finish_reason == "length"
    for c in tokens:
        c.close()


def test_an_idle_suggest_stream_is_closed(served):
    _, client = served
    agent = [("authorization", f"Bearer {AGENT}")]
    stop = threading.Event()
    code, details = code_of(lambda: list(client.stub.Suggest(idle_requests(stop, 30), metadata=agent, timeout=30)))
    stop.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in details


def test_stop_ends_open_streams_at_once(tmp_path, tiny):
    server, client = start(tmp_path, tiny, suggest_idle_s=3600)
    watch = client.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600))
    next(watch)
    agent = [("authorization", f"Bearer {AGENT}")]
    release = threading.Event()
    suggest = client.stub.Suggest(idle_requests(release), metadata=agent)
    assert wait_until(lambda: server.streams.open_streams() == 2)
    started = time.monotonic()
    server.stop(30)
    took = time.monotonic() - started
    release.set()
    assert took < 15, f"stop took {took:.1f} s with a 30 s grace and two idle streams"  # no sleeping out an hour
    for stream in (watch, suggest):  # both ended (the watch cleanly or cancelled, the agent told why)
        try:
            list(stream)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
    client.close()


def test_a_generate_arriving_while_draining_is_refused_unavailable(tmp_path, tiny):
    """Between health leaving SERVING and grpc refusing new calls, a new Generate is told to go to
    another replica (UNAVAILABLE), not accepted and then cut off by the shutdown (CANCELLED: seen
    once in the two-replica container test)."""
    server, client = start(tmp_path, tiny)
    try:
        server.closing.set()  # the drain's first step, held here before grpc's stop
        code, details = code_of(lambda: list(client.generate(text="ab", max_tokens=1)))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details, details
        assert client.tokenize("ab").ids  # only new work is turned away
    finally:
        client.close()
        server.stop(5)


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(text="ab" * 400_000), "prompt"),  # far beyond what a 64-token context can hold
    (dict(text="ab", request_id="x" * 1_000_000), "request_id"),
    (dict(text="ab", stop=["s"] * 100_000), "stop"),
    (dict(text="ab", stop=["s" * 10_000]), "stop"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "chat.messages[0].role"),
    (dict(messages=[{"role": "user", "content": "a"}] * 2000), "chat.messages"),
])
def test_oversized_or_unknown_input_is_refused_before_work(served, request_kwargs, field):
    _, client = served
    code, details = code_of(lambda: list(client.generate(max_tokens=2, **request_kwargs)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field.split("[")[0] in details, details
    assert len(details) < 400  # the value is never echoed back whole
    assert generate(client).finish_reason == "length"


def test_tokenize_refuses_a_text_over_the_limit(served):
    _, client = served
    code, details = code_of(lambda: client.tokenize("ab" * 400_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text of 800,000+ bytes exceeds" in details


def test_a_long_prompt_is_tokenized_at_low_priority(served, monkeypatch):
    """Tokenizing a long prompt must not take a core from the engine's decode steps."""
    import os

    from engine.control.control_plane import LONG_PROMPT_CHARS, GenerateInput
    server, _ = served
    model = server.control.runtime.model
    seen = []

    def encode_prompt(**kwargs):
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return [1, 2]

    monkeypatch.setattr(model, "encode_prompt", encode_prompt)
    assert server.control._encode(model, GenerateInput(text="ab")) == [1, 2]
    assert server.control._encode(model, GenerateInput(text="a" * LONG_PROMPT_CHARS)) == [1, 2]
    (short_thread, _), (long_thread, long_nice) = seen
    assert short_thread != long_thread and long_thread.startswith("tokenize") and long_nice >= 10
