"""OpenTelemetry tracing: exporters, the gRPC server span, and the engine's spans for each request.

One Generate, as a trace backend shows it (docs/06_observability.md has the attributes):

    /planengine.v1.ControlPlane/Generate   SERVER    services/tracing.py; continues the client's traceparent
    └── planengine.generate                INTERNAL  gen_ai.* and planengine.* attributes
        ├── planengine.queue               arrival → first scheduled
        ├── planengine.prefill             first scheduled → first token
        └── planengine.decode              first token → last token

and a plan switch (ActivatePlan, RollbackPlan, SubmitPlan with activate) adds
`planengine.plan.apply` under its RPC's span.

The engine runs requests on its own thread, many per step, so the request spans are not
opened and closed around code: `RequestTrace.start` captures the submitting thread's
context and a monotonic→epoch clock pair, and `RequestTrace.finish` writes the spans
afterwards with explicit start and end times computed from the worker's timings.

Nothing here is required: with no tracer provider configured the API's no-op tracer is
used and every call costs a few microseconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from engine.errors import InvalidArgument

log = logging.getLogger(__name__)

TRACER_NAME = "planengine"
EXPORTERS = ("auto", "none", "console", "otlp")
# The standard variables the OTLP exporter reads; either one set means "an endpoint is configured".
ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# Span names.
SPAN_GENERATE = "planengine.generate"
SPAN_QUEUE = "planengine.queue"
SPAN_PREFILL = "planengine.prefill"
SPAN_DECODE = "planengine.decode"
SPAN_PLAN_APPLY = "planengine.plan.apply"

# GenAI semantic conventions (github.com/open-telemetry/semantic-conventions-genai,
# docs/gen-ai/client-inference.md; status: development). Spelled out here rather than
# imported: the Python semconv package marks its copies deprecated since the move.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
# The conventions' only span attribute for TTFT; `gen_ai.server.time_to_first_token` is a
# metric name there (our planengine_time_to_first_token_seconds histogram), not an attribute.
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ERROR_TYPE = "error.type"
PROVIDER = "plan-engine"

# Ours.
PLAN_ID = "planengine.plan.id"
PLAN_VERSION = "planengine.plan.version"
PLAN_HASH = "planengine.plan.hash"
PLAN_MODEL = "planengine.plan.model"
PLAN_PREVIOUS_ID = "planengine.plan.previous.id"
PLAN_PREVIOUS_VERSION = "planengine.plan.previous.version"
PLAN_PREVIOUS_HASH = "planengine.plan.previous.hash"
PLAN_RELOAD = "planengine.plan.reload"
REQUEST_ID = "planengine.request.id"
FINISH_REASON = "planengine.finish_reason"
TOKENS = "planengine.tokens"  # on prefill/decode: tokens that phase handled
ENERGY_J = "planengine.energy_j"
ENERGY_SOURCE = "planengine.energy_source"
PREEMPTIONS = "planengine.preemptions"


# ---------------------------------------------------------------------------------------------
# Exporters

def configure_tracing(exporter: str = "auto", endpoint: str | None = None,
                      service_name: str | None = None) -> TracerProvider | None:
    """A tracer provider exporting spans as asked, or None when tracing is off.

    exporter:
      "auto"    OTLP if an endpoint is configured (`endpoint`, or the standard
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT), else off.
      "none"    off, whatever the environment says.
      "console" every span printed to stdout as JSON when it ends (for debugging).
      "otlp"    OTLP/gRPC with batching, to `endpoint` or the exporter's own default
                (the environment, then localhost:4317). An http:// endpoint is plaintext.
    service_name defaults to $OTEL_SERVICE_NAME, then "plan-engine".

    The provider is not made the global one; pass it where spans are made
    (`ServerConfig.tracer_provider`), and `shutdown()` it on exit to flush the batch.
    """
    if exporter not in EXPORTERS:
        raise InvalidArgument(f"trace exporter {exporter!r} is not one of {EXPORTERS}", field="exporter")
    if exporter == "auto":
        exporter = "otlp" if endpoint or any(os.environ.get(v) for v in ENDPOINT_ENV) else "none"
    if exporter == "none":
        return None
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "plan-engine"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    if exporter == "console":
        # sys.stdout as it is now: the exporter's default is the one bound when it was imported
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
    else:
        # imported here: it brings a gRPC channel and the OTLP protos, needed only when used
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def engine_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The tracer for engine spans; with no provider, the global one (a no-op unless set)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)

# ---------------------------------------------------------------------------------------------
# Engine spans

class RequestTrace:
    """One request's engine spans: started where it is submitted, written when it finishes.

    `start` runs on the submitting (RPC) thread: it captures the current context, so the
    spans land under the gRPC server span, and a clock pair mapping `time.monotonic()`
    (the worker's clock) to epoch nanoseconds (OpenTelemetry's). `finish(final)` may run
    on any thread; it writes `planengine.generate` and its queue/prefill/decode children
    from the Final's timings, which count from the worker's arrival time. It anchors them
    at the moment it is called, so call it as soon as the Final is built (the worker's
    `on_final` hook does). It never raises: tracing must not break a request.
    """

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, attributes: dict[str, Any]):
        self._tracer = tracer
        self._parent = parent
        self._attributes = attributes
        self._mono0 = time.monotonic()
        self._ns0 = time.time_ns()
        self._finished = False

    @classmethod
    def start(cls, tracer: trace.Tracer, *, request_id: str, model: str, operation: str = "text_completion",
              max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, seed: int | None = None, plan: Any = None) -> RequestTrace:
        """Begin a request's trace. `operation` is "text_completion" or "chat"; `plan` has
        `id`, `version` and `hash` (a PlanStamp). Unset sampling values are left out."""
        attributes: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: PROVIDER,
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_REQUEST_STREAM: True,
            REQUEST_ID: request_id,
        }
        for key, value in ((GEN_AI_REQUEST_MAX_TOKENS, max_tokens), (GEN_AI_REQUEST_TEMPERATURE, temperature),
                           (GEN_AI_REQUEST_TOP_P, top_p), (GEN_AI_REQUEST_TOP_K, top_k or None),
                           (GEN_AI_REQUEST_SEED, seed)):
            if value is not None:
                attributes[key] = value
        if plan is not None:
            attributes.update({PLAN_ID: plan.id, PLAN_VERSION: int(plan.version), PLAN_HASH: plan.hash})
        return cls(tracer, otel_context.get_current(), attributes)

    def _ns(self, mono: float) -> int:
        return self._ns0 + int((mono - self._mono0) * 1e9)

    def finish(self, final: Any, end: float | None = None) -> None:
        """Write the spans for a finished request (an `engine.runtime.worker.Final`).

        `end` is the worker's `time.monotonic()` at the end, if known; else now.
        """
        if self._finished:
            return
        self._finished = True
        try:
            self._write(final, time.monotonic() if end is None else end)
        except Exception:  # a tracing bug must not fail the request
            log.warning("could not record the trace of request %s", self._attributes.get(REQUEST_ID), exc_info=True)

    def _write(self, final: Any, end: float) -> None:
        t = final.timings
        end_ns = self._ns(end)
        start_ns = self._ns0
        # the worker's arrival comes just after start() (tokenizing and admission between);
        # clamp so the children stay inside their parent
        arrival_ns = max(start_ns, end_ns - int(t["total_s"] * 1e9))
        scheduled_ns = min(end_ns, arrival_ns + int(t["queue_s"] * 1e9))
        first_ns = min(end_ns, max(scheduled_ns, arrival_ns + int(t["ttft_s"] * 1e9)))
        produced = final.completion_tokens > 0
        scheduled = t["queue_s"] < t["total_s"] or produced

        attributes = dict(self._attributes)
        attributes.update({
            GEN_AI_RESPONSE_ID: final.request_id,
            GEN_AI_RESPONSE_MODEL: self._attributes[GEN_AI_REQUEST_MODEL],
            GEN_AI_RESPONSE_FINISH_REASONS: [final.finish_reason],
            GEN_AI_USAGE_INPUT_TOKENS: final.prompt_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: final.completion_tokens,
            FINISH_REASON: final.finish_reason,
        })
        if produced:
            attributes[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = t["ttft_s"]
        if getattr(final, "energy_source", ""):  # the request's share of the metered energy
            attributes[ENERGY_J] = float(final.energy_j)
            attributes[ENERGY_SOURCE] = final.energy_source
        if getattr(final, "preemptions", 0):
            attributes[PREEMPTIONS] = int(final.preemptions)
        if final.finish_reason == "error":
            attributes[ERROR_TYPE] = "engine_error"

        span = self._tracer.start_span(SPAN_GENERATE, context=self._parent, kind=SpanKind.INTERNAL,
                                       attributes=attributes, start_time=start_ns)
        if final.finish_reason == "error":
            span.set_status(Status(StatusCode.ERROR, getattr(final, "error", "") or "engine error"))
        inside = trace.set_span_in_context(span, self._parent)

        def child(name: str, t0: int, t1: int, **attrs: Any) -> None:
            self._tracer.start_span(name, context=inside, kind=SpanKind.INTERNAL, attributes=attrs,
                                    start_time=t0).end(end_time=max(t0, t1))

        child(SPAN_QUEUE, arrival_ns, scheduled_ns if scheduled else end_ns)
        if scheduled:
            child(SPAN_PREFILL, scheduled_ns, first_ns if produced else end_ns, **{TOKENS: final.prompt_tokens})
        if produced:
            child(SPAN_DECODE, first_ns, end_ns, **{TOKENS: final.completion_tokens - 1})
        span.end(end_time=end_ns)


@contextmanager
def plan_apply_span(tracer: trace.Tracer, old: Any, new: Any, reload: bool | None = None) -> Iterator[trace.Span]:
    """A span around switching from plan `old` (None at start-up) to `new`.

    `reload` says whether the model is loaded anew (False: applied live); set it on the
    yielded span with `PLAN_RELOAD` once known. An exception is recorded and re-raised.
    """
    attributes: dict[str, Any] = {PLAN_ID: new.id, PLAN_VERSION: int(new.version), PLAN_HASH: new.hash,
                                  PLAN_MODEL: new.model}
    if old is not None:
        attributes.update({PLAN_PREVIOUS_ID: old.id, PLAN_PREVIOUS_VERSION: int(old.version),
                           PLAN_PREVIOUS_HASH: old.hash})
    if reload is not None:
        attributes[PLAN_RELOAD] = reload
    with tracer.start_as_current_span(SPAN_PLAN_APPLY, kind=SpanKind.INTERNAL, attributes=attributes) as span:
        yield span
