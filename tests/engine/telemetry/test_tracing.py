"""Tracing: exporters, the gRPC server span around a whole stream, and the engine's request spans.

The fast tests use a hand-built gRPC server (a generic handler, no model) with the same
interceptor order as `services.server`; the slow one runs one Generate on the real server
with the real default model and checks the documented span tree under the client's trace.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine.errors import InvalidArgument
from engine.runtime.worker import Final
from engine.telemetry import tracing
from services.auth import BearerTokenInterceptor
from services.errors import ErrorMappingInterceptor
from services.tracing import server_interceptor

STREAM = "/planengine.test.Echo/Stream"


@pytest.fixture
def spans():
    """A provider recording every ended span in memory: (provider, exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def wait_for(exporter: InMemorySpanExporter, name: str, timeout: float = 5.0):
    """The ended span called `name`. A server span ends on the server's thread after the
    client has its last message, so it can trail the call by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if found:
            assert len(found) == 1, f"{len(found)} spans named {name}"
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no span {name}; have {[s.name for s in exporter.get_finished_spans()]}")
        time.sleep(0.01)


def final(reason="stop", prompt=5, completion=4, queue_s=0.01, ttft_s=0.03, total_s=0.06, error="", **more):
    return Final("r1", reason, prompt, completion, 7,
                 {"queue_s": queue_s, "ttft_s": ttft_s, "decode_s": total_s - ttft_s, "total_s": total_s},
                 error=error, **more)


class Stamp:
    id, version, hash = "default", 3, "ab" * 32


# --- exporters ---------------------------------------------------------------------------

def test_off_by_default(monkeypatch):
    for var in tracing.ENDPOINT_ENV:
        monkeypatch.delenv(var, raising=False)
    assert tracing.configure_tracing() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.configure_tracing("none") is None
    with pytest.raises(InvalidArgument, match="'jaeger' is not one of"):
        tracing.configure_tracing("jaeger")


def test_console_exporter_prints_each_span(capsys):
    provider = tracing.configure_tracing("console", service_name="pe-test")
    provider.get_tracer("t").start_span("hello").end()
    provider.shutdown()
    out = capsys.readouterr().out
    assert '"name": "hello"' in out and '"service.name": "pe-test"' in out


class _Collector:
    """A minimal OTLP/gRPC trace collector on 127.0.0.1: what the exporter sends arrives here."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
        self.requests = []
        self.received = threading.Event()
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.requests.append(request)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.mark.parametrize("via_env", [False, True])
def test_otlp_exporter_sends_to_the_configured_endpoint(monkeypatch, via_env):
    collector = _Collector()
    try:
        endpoint = f"http://127.0.0.1:{collector.port}"  # http:// = plaintext
        for var in tracing.ENDPOINT_ENV:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        if via_env:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            provider = tracing.configure_tracing()  # "auto": an endpoint is configured, so OTLP
        else:
            provider = tracing.configure_tracing("otlp", endpoint=endpoint)
        provider.get_tracer("t").start_span("exported").end()
        assert provider.force_flush(10_000)
        assert collector.received.wait(10)
        provider.shutdown()
        resource_spans = collector.requests[0].resource_spans[0]
        names = [s.name for ss in resource_spans.scope_spans for s in ss.spans]
        service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
        assert names == ["exported"] and service == "plan-engine"
    finally:
        collector.server.stop(0)


# --- engine spans from a Final -----------------------------------------------------------

def by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


def test_request_spans_from_the_worker_timings(spans):
    provider, exporter = spans
    tracer = tracing.engine_tracer(provider)
    with tracer.start_as_current_span("rpc") as rpc:
        rt = tracing.RequestTrace.start(tracer, request_id="r1", model="smollm2", operation="chat", max_tokens=16,
                                        temperature=0.0, top_p=1.0, top_k=0, plan=Stamp)
    time.sleep(0.07)
    # finished on another thread, as the engine worker does
    done = threading.Thread(target=rt.finish, args=(final(energy_j=1.5, energy_source="estimated", preemptions=1),))
    done.start()
    done.join()

    s = by_name(exporter)
    gen, queue, prefill, decode = (s[n] for n in ("planengine.generate", "planengine.queue", "planengine.prefill",
                                                   "planengine.decode"))
    # the tree: rpc → generate → queue, prefill, decode, all one trace
    assert gen.parent.span_id == rpc.get_span_context().span_id
    assert {queue.parent.span_id, prefill.parent.span_id, decode.parent.span_id} == {gen.context.span_id}
    assert len({x.context.trace_id for x in s.values()}) == 1
    # the phases tile the request, with the worker's durations
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert decode.end_time == gen.end_time and gen.start_time <= queue.start_time
    def ms(span):
        return (span.end_time - span.start_time) / 1e6
    assert ms(queue) == pytest.approx(10, abs=0.01) and ms(prefill) == pytest.approx(20, abs=0.01)
    assert ms(decode) == pytest.approx(30, abs=0.01) and ms(gen) >= 60
    assert dict(gen.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "plan-engine", "gen_ai.request.model": "smollm2",
        "gen_ai.request.stream": True, "gen_ai.request.max_tokens": 16, "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0, "planengine.request.id": "r1", "planengine.plan.id": "default",
        "planengine.plan.version": 3, "planengine.plan.hash": "ab" * 32, "gen_ai.response.id": "r1",
        "gen_ai.response.model": "smollm2", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 4,
        "gen_ai.response.time_to_first_chunk": 0.03, "planengine.finish_reason": "stop",
        "planengine.energy_j": 1.5, "planengine.energy_source": "estimated", "planengine.preemptions": 1}
    assert prefill.attributes["planengine.tokens"] == 5 and decode.attributes["planengine.tokens"] == 3
    assert gen.status.status_code == StatusCode.UNSET and gen.kind == SpanKind.INTERNAL


def test_cancelled_while_queued_has_only_a_queue_span(spans):
    provider, exporter = spans
    rt = tracing.RequestTrace.start(tracing.engine_tracer(provider), request_id="r1", model="m")
    rt.finish(final("cancelled", completion=0, queue_s=0.02, ttft_s=0.02, total_s=0.02))
    rt.finish(final())  # a second finish is ignored
    s = by_name(exporter)
    assert sorted(s) == ["planengine.generate", "planengine.queue"]
    assert s["planengine.generate"].attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    assert "gen_ai.response.time_to_first_chunk" not in s["planengine.generate"].attributes


def test_engine_error_marks_the_request_span(spans):
    provider, exporter = spans
    rt = tracing.RequestTrace.start(tracing.engine_tracer(provider), request_id="r1", model="m")
    rt.finish(final("error", completion=0, queue_s=0.01, ttft_s=0.02, total_s=0.02, error="RuntimeError: boom"))
    s = by_name(exporter)
    assert sorted(s) == ["planengine.generate", "planengine.prefill", "planengine.queue"]
    gen = s["planengine.generate"]
    assert gen.status.status_code == StatusCode.ERROR and gen.status.description == "RuntimeError: boom"
    assert gen.attributes["error.type"] == "engine_error"


def test_finish_never_raises(spans, caplog):
    provider, exporter = spans
    rt = tracing.RequestTrace.start(tracing.engine_tracer(provider), request_id="r1", model="m")
    rt.finish(object())  # not a Final
    assert exporter.get_finished_spans() == () and "could not record the trace of request r1" in caplog.text


def test_plan_apply_span(spans):
    provider, exporter = spans
    tracer = tracing.engine_tracer(provider)

    class Plan:
        def __init__(self, version, model="smollm2"):
            self.id, self.version, self.hash, self.model = "default", version, f"h{version}", model

    with tracing.plan_apply_span(tracer, Plan(1), Plan(2)) as span:
        span.set_attribute(tracing.PLAN_RELOAD, False)
    with pytest.raises(RuntimeError), tracing.plan_apply_span(tracer, None, Plan(3, "other"), reload=True):
        raise RuntimeError("load failed")
    live, failed = exporter.get_finished_spans()
    assert live.name == failed.name == "planengine.plan.apply"
    assert dict(live.attributes) == {
        "planengine.plan.id": "default", "planengine.plan.version": 2, "planengine.plan.hash": "h2",
        "planengine.plan.model": "smollm2", "planengine.plan.previous.id": "default",
        "planengine.plan.previous.version": 1, "planengine.plan.previous.hash": "h1", "planengine.plan.reload": False}
    assert failed.attributes["planengine.plan.reload"] is True and "planengine.plan.previous.id" not in failed.attributes
    assert failed.status.status_code == StatusCode.ERROR and failed.events[0].name == "exception"


# --- the gRPC server span on a hand-built server ---------------------------------------------

class EchoServer:
    """A streaming method behind the interceptors `services.server` uses, in the same order."""

    def __init__(self, provider, behaviour, tokens=()):
        self.provider = provider
        self.last_sent_ns = 0
        interceptors = [server_interceptor(provider)]
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens))
        interceptors.append(ErrorMappingInterceptor())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        handler = grpc.unary_stream_rpc_method_handler(lambda request, context: behaviour(self, request))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("planengine.test.Echo", {"Stream": handler})])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(self, metadata=()):
        return list(self.channel.unary_stream(STREAM)(b"hi", metadata=list(metadata), timeout=10))

    def close(self):
        self.channel.close()
        self.server.stop(0)


def engine_like(server: EchoServer, request: bytes):
    """What the servicer and engine do: start a request trace on the RPC thread, finish it on
    another thread, stream three messages with pauses between."""
    rt = tracing.RequestTrace.start(tracing.engine_tracer(server.provider), request_id="r1", model="m")
    for i in range(3):
        time.sleep(0.05)
        if i == 2:
            worker = threading.Thread(target=rt.finish, args=(final(total_s=0.12, ttft_s=0.05),))
            worker.start()
            worker.join()
            server.last_sent_ns = time.time_ns()
        yield request + bytes([i])


def test_server_span_continues_the_client_trace_and_covers_the_whole_stream(spans):
    provider, exporter = spans
    server = EchoServer(provider, engine_like)
    try:
        with provider.get_tracer("client").start_as_current_span("client", kind=SpanKind.CLIENT) as client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # traceparent
            assert server.call(carrier.items()) == [b"hi\x00", b"hi\x01", b"hi\x02"]
        rpc = wait_for(exporter, STREAM)
    finally:
        server.close()
    gen = wait_for(exporter, "planengine.generate")
    assert rpc.kind == SpanKind.SERVER
    assert rpc.context.trace_id == client.get_span_context().trace_id
    assert rpc.parent.span_id == client.get_span_context().span_id and rpc.parent.is_remote
    assert gen.parent.span_id == rpc.context.span_id
    # the span stays open while the generator streams: it ends after the last message
    assert rpc.end_time >= server.last_sent_ns >= rpc.start_time + 150e6
    assert rpc.attributes["rpc.service"] == "planengine.test.Echo" and rpc.attributes["rpc.method"] == "Stream"
    assert rpc.attributes["rpc.grpc.status_code"] == 0


def failing(exc):
    def behaviour(server, request):
        yield b"first"
        raise exc
    return behaviour


@pytest.mark.parametrize("exc, code, status", [
    (InvalidArgument("max_tokens 0 is bad", field="max_tokens"), grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, StatusCode.ERROR),
])
def test_mapped_errors_reach_the_server_span(spans, exc, code, status):
    # services.errors answers a domain error with abort_with_status, which the standard
    # interceptor alone does not see; the status code must still be on the span
    provider, exporter = spans
    server = EchoServer(provider, failing(exc))
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.call()
        assert err.value.code() == code
        rpc = wait_for(exporter, STREAM)
    finally:
        server.close()
    assert rpc.attributes["rpc.grpc.status_code"] == code.value[0]
    assert rpc.status.status_code == status


def test_cancel_and_deadline_end_the_server_span_with_their_code(spans):
    provider, exporter = spans

    def endless(server, request):
        for i in range(200):
            time.sleep(0.02)
            yield bytes([i % 256])

    server = EchoServer(provider, endless)
    try:
        call = server.channel.unary_stream(STREAM)(b"x", timeout=10)
        next(call)
        call.cancel()
        cancelled = wait_for(exporter, STREAM)
        exporter.clear()
        with pytest.raises(grpc.RpcError) as err:
            list(server.channel.unary_stream(STREAM)(b"x", timeout=0.2))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        expired = wait_for(exporter, STREAM)
    finally:
        server.close()
    assert cancelled.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert cancelled.status.status_code == StatusCode.UNSET
    assert expired.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert expired.status.status_code == StatusCode.ERROR
    assert (expired.end_time - expired.start_time) / 1e9 < 2  # ended with the call, not with the generator


def test_server_span_covers_authentication(spans):
    provider, exporter = spans
    server = EchoServer(provider, engine_like, tokens=["sesame"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        rpc = wait_for(exporter, STREAM)
        assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert len(server.call([("authorization", "Bearer sesame")])) == 3
    finally:
        server.close()


# --- end to end on the real server -------------------------------------------------------------

@pytest.mark.slow
def test_generate_yields_the_documented_span_tree(model_path, tmp_path: Path, spans):
    from protos.planengine.v1 import control_plane_pb2 as pb
    from services.client import PlanEngineClient
    from services.server import ServerConfig, create_server

    provider, exporter = spans
    server = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3", tracer_provider=provider))
    client = PlanEngineClient(f"127.0.0.1:{server.port}")
    try:
        with provider.get_tracer("client").start_as_current_span("client", kind=SpanKind.CLIENT) as cspan:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            request = pb.GenerateRequest(text="The capital of France is", max_tokens=8, ignore_eos=True,
                                         request_id="trace-me")
            request.sampling.temperature = 0.0
            responses = list(client.stub.Generate(request, metadata=list(carrier.items()), timeout=60))
        done = responses[-1].final
        rpc = wait_for(exporter, "/planengine.v1.ControlPlane/Generate")

        # a live plan switch (policy only) is traced under its RPC's span
        client.submit_plan({"id": "fifo", "scheduler_policy": "SCHEDULER_POLICY_FIFO"}, activate=True)
        apply = [s for s in exporter.get_finished_spans() if s.name == "planengine.plan.apply"
                 and s.attributes["planengine.plan.id"] == "fifo"]
        submit = wait_for(exporter, "/planengine.v1.ControlPlane/SubmitPlan")
    finally:
        client.close()
        server.stop(5)

    trace_id = cspan.get_span_context().trace_id
    s = by_name(exporter)
    gen, queue, prefill, decode = (s[n] for n in ("planengine.generate", "planengine.queue", "planengine.prefill",
                                                   "planengine.decode"))
    # under the client's trace: client → gRPC server span → generate → queue, prefill, decode
    assert rpc.kind == SpanKind.SERVER and rpc.parent.span_id == cspan.get_span_context().span_id
    assert gen.parent.span_id == rpc.context.span_id
    assert {queue.parent.span_id, prefill.parent.span_id, decode.parent.span_id} == {gen.context.span_id}
    assert {x.context.trace_id for x in (rpc, gen, queue, prefill, decode)} == {trace_id}
    # nested in time: the server span outlives the engine's work (it ends after the last message)
    assert rpc.start_time <= gen.start_time <= queue.start_time and decode.end_time <= gen.end_time <= rpc.end_time
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert (decode.end_time - queue.start_time) / 1e9 == pytest.approx(done.timings.total_s, abs=1e-3)
    assert (prefill.end_time - queue.start_time) / 1e9 == pytest.approx(done.timings.time_to_first_token_s, abs=1e-3)

    a = gen.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"]
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["gen_ai.response.id"] == "trace-me"
    assert a["gen_ai.usage.input_tokens"] == done.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == done.usage.completion_tokens == 8
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(done.timings.time_to_first_token_s)
    assert (a["planengine.plan.id"], a["planengine.plan.version"], a["planengine.plan.hash"]) == \
        (done.plan.id, done.plan.version, done.plan.hash)
    assert a["planengine.request.id"] == "trace-me"
    if done.energy_source:
        assert a["planengine.energy_source"] == done.energy_source
        assert a["planengine.energy_j"] == pytest.approx(done.energy_j)

    assert len(apply) == 1 and apply[0].parent.span_id == submit.context.span_id
    assert apply[0].attributes["planengine.plan.reload"] is False
    assert apply[0].attributes["planengine.plan.previous.id"] == "default"
