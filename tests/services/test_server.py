"""The gRPC service on a real server bound to 127.0.0.1:0, with the real default model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from paths import REPO

from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

pytestmark = pytest.mark.slow


def start(tmp_path: Path, **overrides) -> tuple:
    config = ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3", **overrides)
    server = create_server(config)
    return server, PlanEngineClient(f"127.0.0.1:{server.port}")


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    server, client = start(tmp_path_factory.mktemp("srv"))
    yield server, client
    client.close()
    server.stop(5)


def run(client: PlanEngineClient, **kwargs) -> tuple[list[pb.GenerateResponse], pb.GenerateFinal]:
    responses = list(client.generate(**kwargs))
    assert responses[-1].HasField("final")
    return responses[:-1], responses[-1].final


def ids_of(deltas) -> list[int]:
    return [i for d in deltas for i in d.delta.token_ids]


def bad_request_fields(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    fields = []
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return fields


def test_health_and_reflection(served):
    server, client = served
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="planengine.v1.ControlPlane")).status == \
        health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"planengine.v1.ControlPlane", "grpc.health.v1.Health"} <= names


def test_generate_streams_and_stamps_plan(served, generation_reference):
    server, client = served
    case = generation_reference[0]
    deltas, final = run(client, ids=case["prompt_ids"], max_tokens=16, ignore_eos=True)
    assert ids_of(deltas) == case["hf_f32"]["greedy"][:16]
    assert len(deltas) >= 2 and all(len(d.delta.token_ids) <= 1 for d in deltas)
    active = client.active_plan()
    assert (final.plan.id, final.plan.version, final.plan.hash) == (active.id, active.version, active.hash)
    assert len(final.plan.hash) == 64 and final.finish_reason == "length"
    assert final.usage.prompt_tokens == len(case["prompt_ids"]) and final.usage.completion_tokens == 16
    assert 0 <= final.timings.queue_s <= final.timings.time_to_first_token_s <= final.timings.total_s


def test_chat_and_text_prompts(served):
    server, client = served
    deltas, final = run(client, messages=[{"role": "user", "content": "What is the capital of France?"}],
                        max_tokens=24)
    assert "Paris" in "".join(d.delta.text for d in deltas) and final.finish_reason == "stop"
    deltas, final = run(client, text="The capital of France is", max_tokens=4, stop=["Paris"])
    assert "Paris" not in "".join(d.delta.text for d in deltas)


def test_logprobs(served):
    server, client = served
    deltas, _ = run(client, text="Once upon a time", max_tokens=3, logprobs=True, top_logprobs=3)
    for d in deltas:
        assert len(d.delta.logprobs) == 1 and d.delta.logprobs[0] <= 0
        assert len(d.delta.top_logprobs) == 3 and d.delta.top_logprobs[0].token_id == d.delta.token_ids[0]


def test_concurrent_clients(served, generation_reference):
    server, client = served
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        case = generation_reference[i]
        with PlanEngineClient(f"127.0.0.1:{server.port}") as own:
            deltas, final = run(own, ids=case["prompt_ids"], max_tokens=12, ignore_eos=True)
            results[i] = ids_of(deltas)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(generation_reference))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, case in enumerate(generation_reference):
        assert results[i] == case["hf_f32"]["greedy"][:12], case["prompt"]


def _kv_bytes(server) -> int:
    return server.control.runtime.worker.stats()["kv_bytes"]


def test_cancel_mid_stream_frees_memory(served):
    server, client = served
    stream = client.generate(text="Tell me a long story", max_tokens=400, ignore_eos=True, request_id="to-cancel")
    next(stream), next(stream)
    assert _kv_bytes(server) > 0
    assert client.cancel("to-cancel") is True
    rest = list(stream)
    assert rest[-1].final.finish_reason == "cancelled" and rest[-1].final.usage.completion_tokens < 400
    assert rest[-1].final.reason == pb.FINISH_REASON_CANCELLED
    assert _kv_bytes(server) == 0
    with pytest.raises(grpc.RpcError) as err:  # finished: no longer known
        client.cancel("to-cancel")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_disconnect_and_deadline_free_memory(served):
    server, client = served
    call = client.generate(text="Tell me a long story", max_tokens=400, ignore_eos=True)
    next(call)
    call.cancel()  # the client goes away
    deadline = time.monotonic() + 5
    while _kv_bytes(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _kv_bytes(server) == 0
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(pb.GenerateRequest(text="Tell me a story", max_tokens=400, ignore_eos=True),
                                  timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while _kv_bytes(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _kv_bytes(server) == 0


def test_plan_round_trip_activate_rollback(served):
    server, client = served
    before = client.active_plan()
    submitted = client.submit_plan({"id": "latency", "scheduler_policy": "SCHEDULER_POLICY_FIFO",
                                    "batching": {"max_batch_size": 8}, "description": "smaller batches"}).plan
    assert submitted.version == 1 and len(submitted.hash) == 64 and submitted.batching.max_batch_size == 8
    assert client.get_plan("latency").hash == submitted.hash
    assert "latency" in {p.id for p in client.list_plans().plans}
    response = client.activate("latency")
    assert response.plan.hash == submitted.hash and response.previous.id == before.id
    _, final = run(client, text="Hi", max_tokens=2)
    assert (final.plan.id, final.plan.version) == ("latency", 1)
    back = client.rollback()
    assert (back.plan.id, back.plan.version) == (before.id, before.version)
    _, final = run(client, text="Hi", max_tokens=2)
    assert final.plan.hash == before.hash
    actions = [e.action for e in client.history().events[:3]]
    assert actions[0] == "rollback" and "activate" in actions


def test_generate_pinned_to_a_plan(served):
    server, client = served
    active = client.active_plan()
    _, final = run(client, text="Hi", max_tokens=1, plan=pb.PlanRef(id=active.id, version=active.version))
    assert final.plan.version == active.version
    with pytest.raises(grpc.RpcError) as err:
        run(client, text="Hi", max_tokens=1, plan=pb.PlanRef(id=active.id, version=active.version + 99))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_input_gets_the_right_status_and_changes_nothing(served):
    server, client = served
    plans_before = client.list_plans()
    history_before = len(client.history(limit=1000).events)

    with pytest.raises(grpc.RpcError) as err:
        client.submit_plan({"id": "bad", "batching": {"max_batch_size": 100000}, "kv_cache": {"block_size": 3},
                            "limits": {"max_watts": -5}, "model": "no-such-model"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(err.value)
    assert {"batching.max_batch_size", "kv_cache.block_size", "limits.max_watts", "model"} <= set(fields)

    cases = [
        (lambda: client.get_plan("nope"), grpc.StatusCode.NOT_FOUND, None),
        (lambda: client.activate("nope"), grpc.StatusCode.NOT_FOUND, None),
        (lambda: client.inspect_model("no-such-model"), grpc.StatusCode.NOT_FOUND, None),
        (lambda: run(client, text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda: run(client, ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda: run(client, ids=[10 ** 6]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda: run(client, ids=[1] * 9000), grpc.StatusCode.INVALID_ARGUMENT, None),  # over the context
        (lambda: run(client, text="Hi", max_tokens=10 ** 6), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (lambda: run(client, text="Hi", sampling={"top_p": 2.0}), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.top_p"),
        (lambda: run(client, text="x" * (17 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, None),  # oversized
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, err.value.details()
        if field:
            assert field in bad_request_fields(err.value), err.value.details()
    assert client.list_plans() == plans_before
    assert len(client.history(limit=1000).events) == history_before
    assert _kv_bytes(server) == 0


def test_auth_required_when_configured(model_path, tmp_path):
    server, anonymous = start(tmp_path, auth_tokens=["s3cret"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.list_plans()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            run(anonymous, text="Hi", max_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with PlanEngineClient(f"127.0.0.1:{server.port}", token="wrong") as wrong:
            with pytest.raises(grpc.RpcError) as err:
                wrong.list_plans()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes
        health = health_pb2_grpc.HealthStub(anonymous.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with PlanEngineClient(f"127.0.0.1:{server.port}", token="s3cret") as authed:
            assert authed.list_plans().active_id == "default"
    finally:
        anonymous.close()
        server.stop(1)


def test_restart_keeps_plans_and_determinism(model_path, tmp_path):
    seeded = {"text": "Once upon a time", "max_tokens": 10, "seed": 7, "ignore_eos": True,
              "sampling": {"temperature": 0.9, "top_p": 0.95}}
    server, client = start(tmp_path)
    try:
        stored = [client.submit_plan({"id": f"p{i}", "sampling": {"temperature": 0.5}}).plan for i in range(3)]
        client.activate("p1")
        first = [ids_of(run(client, **seeded)[0]) for _ in range(2)]
        assert first[0] == first[1]
    finally:
        client.close()
        server.stop(1)
    server, client = start(tmp_path)
    try:
        for plan in stored:
            assert client.get_plan(plan.id, plan.version) == plan
        assert client.active_plan().id == "p1"
        deltas, final = run(client, **seeded)
        assert ids_of(deltas) == first[0] and final.plan.id == "p1" and final.seed == 7
    finally:
        client.close()
        server.stop(1)


def test_sigkill_during_plan_burst_keeps_acknowledged_plans(model_path, tmp_path):
    store = tmp_path / "plans.sqlite3"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def spawn() -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", "0", "--store", str(store)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        assert "serving on" in line, line
        return proc, int(line.split(":")[1].split()[0])

    proc, port = spawn()
    acknowledged: list[plan_pb2.ExecutionPlan] = []
    stop = threading.Event()

    def burst() -> None:
        with PlanEngineClient(f"127.0.0.1:{port}") as c:
            i = 0
            while not stop.is_set():
                try:
                    acknowledged.append(c.submit_plan({"id": "burst", "description": f"n{i}",
                                                       "sampling": {"temperature": 0.01 * (i % 50)}}).plan)
                except grpc.RpcError:
                    return
                i += 1

    t = threading.Thread(target=burst)
    t.start()
    while len(acknowledged) < 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    t.join()

    proc, port = spawn()
    try:
        with PlanEngineClient(f"127.0.0.1:{port}") as c:
            for plan in acknowledged:
                assert c.get_plan("burst", plan.version) == plan
            newest = c.get_plan("burst")
            assert newest.version >= acknowledged[-1].version
            assert sorted(p.version for p in acknowledged) == list(range(1, len(acknowledged) + 1))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_metrics_energy_and_prometheus(model_path, tmp_path):
    import urllib.request
    server, client = start(tmp_path, metrics_port=0)
    try:
        finals = [run(client, text=f"Count to {i}", max_tokens=5, ignore_eos=True)[1] for i in range(3)]
        for f in finals:
            assert f.energy_j > 0 and f.energy_source == "estimated"
            assert abs(f.joules_per_token - f.energy_j / 5) < 1e-9
        snap = client.stub.GetMetrics(pb.GetMetricsRequest())
        assert snap.requests_total == 3 and snap.generation_tokens_total == 15 and snap.prompt_tokens_total > 0
        assert snap.plan.id == "default" and snap.energy_source == "estimated" and snap.energy_j > 0
        assert 0 < snap.ttft.p50 <= snap.ttft.p99 and snap.itl.p50 > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        labels = 'model_name="smollm2-135m-instruct-q4_1",plan_id="default",plan_version="1"'
        for name, count in [("time_to_first_token_seconds", 3), ("e2e_request_latency_seconds", 3),
                            ("request_queue_time_seconds", 3), ("inter_token_latency_seconds", 12)]:
            line = next(ln for ln in text.splitlines() if ln.startswith(f"planengine_{name}_count"))
            assert labels in line and float(line.rsplit(" ", 1)[1]) == count, line
        watch = client.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=0.1))
        first, second = next(watch), next(watch)
        watch.cancel()
        assert second.at.ToNanoseconds() > first.at.ToNanoseconds()
    finally:
        client.close()
        server.stop(1)
