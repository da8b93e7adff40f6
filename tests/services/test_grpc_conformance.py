"""What real gRPC clients trip on, on a real server (the tiny model, so it runs in a second):
reflection v1 beside v1alpha, the Bearer scheme in any case, no spans for probes,
Cancel of an unknown id, the final message's full text and enum finish reason."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protos.planengine.v1 import control_plane_pb2 as pb
from services.auth import parse_bearer
from services.client import PlanEngineClient, plan_from_json
from services.server import ServerConfig, create_server


def start(tmp_path, tiny, **overrides):
    plan = plan_from_json(json.dumps({"id": "tiny", "model": str(tiny)}))
    server = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3", initial_plan=plan, **overrides))
    return server, PlanEngineClient(f"127.0.0.1:{server.port}")


@pytest.fixture
def served(tmp_path, tiny):
    server, client = start(tmp_path, tiny)
    yield server, client
    client.close()
    server.stop(1)


def reflect(channel, service: str, *requests):
    """Ask the reflection `service` as a client built from that version's own messages would."""
    pool = descriptor_pool.Default()
    request_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{service.rsplit('.', 1)[0]}"
                                                                             ".ServerReflectionRequest"))
    response_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{service.rsplit('.', 1)[0]}"
                                                                              ".ServerReflectionResponse"))
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo", request_serializer=request_cls.SerializeToString,
                                 response_deserializer=response_cls.FromString)
    return list(call(iter([request_cls(**r) for r in requests]), timeout=10))


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha_list_and_describe(served, service):
    _, client = served
    listed, described, missing = reflect(client.channel, service, {"list_services": ""},
                                         {"file_containing_symbol": "planengine.v1.ControlPlane"},
                                         {"file_containing_symbol": "no.such.Service"})
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"planengine.v1.ControlPlane", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    [control] = [f for f in files if f.package == "planengine.v1" and f.service]
    methods = {m.name for m in control.service[0].method}
    assert {"Generate", "Cancel", "SubmitPlan"} <= methods
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1_describes_itself(served):
    # grpcurl describe grpc.reflection.v1.ServerReflection: the v1 descriptor is in the pool, in its own package
    _, client = served
    [reply] = reflect(client.channel, "grpc.reflection.v1.ServerReflection",
                      {"file_containing_symbol": "grpc.reflection.v1.ServerReflection"})
    [fd] = [descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in reply.file_descriptor_response.file_descriptor_proto]
    assert fd.package == "grpc.reflection.v1" and fd.service[0].name == "ServerReflection"
    assert fd.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


@pytest.mark.parametrize("header, token", [
    ("Bearer s3cret", "s3cret"), ("bearer s3cret", "s3cret"), ("BEARER s3cret", "s3cret"),
    ("bEaReR   s3cret ", "s3cret"), ("Basic s3cret", None), ("Bearers3cret", None), ("Bearer", None),
    ("Bearer ", None), ("", None), (None, None),
])
def test_bearer_scheme_is_case_insensitive(header, token):
    assert parse_bearer(header) == token


def test_server_accepts_the_bearer_scheme_in_any_case(tmp_path, tiny):
    server, anonymous = start(tmp_path, tiny, auth_tokens=["s3cret"])
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            md = [("authorization", f"{scheme} s3cret")]
            assert anonymous.stub.ListPlans(pb.ListPlansRequest(), metadata=md, timeout=10).active_id == "tiny"
        for value in ("Bearer S3CRET", "Basic s3cret", "s3cret"):  # the token itself stays exact
            with pytest.raises(grpc.RpcError) as err:
                anonymous.stub.ListPlans(pb.ListPlansRequest(), metadata=[("authorization", value)], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        anonymous.close()
        server.stop(1)


def traced_server(tmp_path, tiny, **overrides):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server, client = start(tmp_path, tiny, tracer_provider=provider, **overrides)
    return server, client, provider, exporter


def probe(client):
    """What a Kubernetes probe and `grpcurl list` send."""
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    reflect(client.channel, "grpc.reflection.v1.ServerReflection", {"list_services": ""})
    reflect(client.channel, "grpc.reflection.v1alpha.ServerReflection", {"list_services": ""})
    client.list_plans()  # traced: the last call, so its span ends after the probes' would have


def wait_for_span(exporter, name):
    import time
    deadline = time.monotonic() + 5
    while not any(s.name == name for s in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, f"no span {name}"
        time.sleep(0.01)


def test_health_and_reflection_make_no_spans(tmp_path, tiny):
    server, client, provider, exporter = traced_server(tmp_path, tiny)
    try:
        probe(client)
        wait_for_span(exporter, "/planengine.v1.ControlPlane/ListPlans")
        server_spans = [s.name for s in exporter.get_finished_spans() if s.name.startswith("/")]
        assert server_spans == ["/planengine.v1.ControlPlane/ListPlans"]
    finally:
        client.close()
        server.stop(1)
        provider.shutdown()


def test_tracing_probes_is_configurable(tmp_path, tiny):
    server, client, provider, exporter = traced_server(tmp_path, tiny, untraced_services=())
    try:
        probe(client)
        wait_for_span(exporter, "/planengine.v1.ControlPlane/ListPlans")
        names = {s.name for s in exporter.get_finished_spans()}
        assert {"/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} <= names
    finally:
        client.close()
        server.stop(1)
        provider.shutdown()


def test_cancel_of_an_unknown_id_is_not_found(served):
    _, client = served
    with pytest.raises(grpc.RpcError) as err:
        client.cancel("no-such-request")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-request" in err.value.details()


def test_cancel_a_queued_or_running_request(served, monkeypatch):
    server, client = served
    # the tiny model's 40 steps can finish before a Cancel reaches the server: every step after
    # the first waits (up to 10 s) until the Cancel has been answered, so the request is running
    transformer = server.control.runtime.model.transformer
    forward, answered, steps = transformer.forward, threading.Event(), []

    def held(segments):
        if steps:
            answered.wait(10)
        steps.append(segments)
        return forward(segments)

    monkeypatch.setattr(transformer, "forward", held)
    stream = client.generate(text="abcd", max_tokens=40, ignore_eos=True, request_id="r-cancel")
    next(stream)
    try:
        assert client.cancel("r-cancel") is True
    finally:
        answered.set()
    final = list(stream)[-1].final
    assert final.usage.completion_tokens < 40
    assert final.finish_reason == "cancelled" and final.reason == pb.FINISH_REASON_CANCELLED
    with pytest.raises(grpc.RpcError) as err:  # gone now
        client.cancel("r-cancel")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_final_message_carries_the_full_text_when_asked(served):
    _, client = served
    responses = list(client.generate(text="abcd", max_tokens=8, ignore_eos=True, seed=3, include_text=True))
    final = responses[-1].final
    joined = "".join(r.delta.text for r in responses[:-1])
    assert final.text == joined and final.usage.completion_tokens == 8
    assert final.finish_reason == "length" and final.reason == pb.FINISH_REASON_LENGTH
    plain = list(client.generate(text="abcd", max_tokens=8, ignore_eos=True, seed=3))[-1].final
    assert plain.text == "" and plain.reason == pb.FINISH_REASON_LENGTH  # not asked: deltas only, as before


def test_finish_reason_enum_matches_the_string(served):
    _, client = served
    assert pb.FinishReason.Name(pb.FINISH_REASON_STOP) == "FINISH_REASON_STOP"
    final = list(client.generate(text="abcd", max_tokens=4, stop=["a", "b", "c", "d", "e", " "], seed=1,
                                 include_text=True))[-1].final
    assert pb.FinishReason.Name(final.reason) == "FINISH_REASON_" + final.finish_reason.upper()
