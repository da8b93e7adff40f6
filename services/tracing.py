"""The gRPC server span: OpenTelemetry's standard server interceptor, plus the status codes it misses.

The engine's own spans (engine.telemetry.tracing) hang under the span this opens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.handlers import wrap_handler


# Codes that are the server's fault: the span status is ERROR for these only, as the RPC
# semantic conventions say (a client's INVALID_ARGUMENT leaves it UNSET).
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


# Probes and tooling: a Kubernetes probe every ~10 s per pod would otherwise be a trace each.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection")


class TracingServerInterceptor(grpc.ServerInterceptor):
    """The standard OpenTelemetry server interceptor, plus the status codes it misses.

    Put it FIRST in the server's interceptors: the span it opens then covers the
    interceptors after it (authentication, error mapping), continues the trace context the
    client sent in its metadata (`traceparent`), and, for a streaming method, stays open
    until the last message is sent. opentelemetry-instrumentation-grpc records a status set
    with `context.abort()` or `set_code()`, but not one set with `abort_with_status()`,
    which is how `services.errors` answers domain errors; the wrapper below reads the
    final code after the handler and records it on the server span.

    Calls to the services named in `untraced` (full names, e.g. `grpc.health.v1.Health`)
    make no span at all.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 untraced: Iterable[str] = UNTRACED_SERVICES):
        from opentelemetry.instrumentation.grpc import server_interceptor as otel_server_interceptor
        self._otel = otel_server_interceptor(tracer_provider=tracer_provider)
        self._untraced = tuple(f"/{name}/" for name in untraced)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if self._untraced and details.method.startswith(self._untraced):
            return continuation(details)
        return self._otel.intercept_service(lambda d: _record_status(continuation(d)), details)


def server_interceptor(tracer_provider: trace.TracerProvider | None = None,
                       untraced: Iterable[str] = UNTRACED_SERVICES) -> grpc.ServerInterceptor:
    """The interceptor that makes one SERVER span per RPC, named `/package.Service/Method`,
    except for calls to the `untraced` services."""
    return TracingServerInterceptor(tracer_provider, untraced)


def _record_status(handler: Any) -> Any:
    def unary(behavior: Callable) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            finally:
                _set_rpc_status(context)
        return run

    def streaming(behavior: Callable) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            cut_short = False
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # grpc stopped pulling: the client cancelled or the deadline passed
                cut_short = True
                raise
            finally:
                _set_rpc_status(context, cut_short)
        return run

    return wrap_handler(handler, unary, streaming)


def _set_rpc_status(context: grpc.ServicerContext, cut_short: bool = False) -> None:
    code = context.code() if hasattr(context, "code") else None
    if (code is None or code == grpc.StatusCode.OK) and cut_short:
        # grpc sets no code on the server side when the call ends under it
        remaining = context.time_remaining()
        code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    if code is None or code == grpc.StatusCode.OK:
        return
    # the server span: the instrumentation's context wrapper holds it (it is also the current
    # span while the handler runs, which is the fallback should that private name change)
    span = getattr(context, "_active_span", None) or trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        details = context.details() or b""
        if isinstance(details, bytes):  # grpc keeps them encoded
            details = details.decode("utf-8", "replace")
        span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))


