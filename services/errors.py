"""Domain errors → gRPC status, in one place, with google.rpc details where a client needs structure.

Every servicer method runs inside `ErrorMappingInterceptor`; a servicer never
builds a status itself. An `EngineError` maps by its `code`; an `InvalidPlan`
or an `InvalidArgument` naming a field carries a `google.rpc.BadRequest` with one
field violation each; `ResourceExhausted` carries a `google.rpc.RetryInfo` when waiting can help (`retry_after_s`).
Anything else is a bug: logged with its traceback, answered INTERNAL.

Messages travel in HTTP/2 trailers, which gRPC caps (8 KiB of metadata by default): a status
message and its field violations are cut to MAX_STATUS_CHARS and MAX_VIOLATION_CHARS here, whatever the domain put in
them (engine.errors.shown() already cuts a client's echoed values). A request that does not
parse is INVALID_ARGUMENT "malformed request: ...", before the servicer runs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import EngineError, InvalidArgument, ResourceExhausted
from services.handlers import reject_malformed, wrap_handler

log = logging.getLogger(__name__)

# The message travels twice (grpc-message, and inside grpc-status-details-bin, base64): these
# keep a whole status near 5 KiB, under the 8 KiB metadata limit.
MAX_STATUS_CHARS = 1000  # of a status message
MAX_VIOLATIONS, MAX_VIOLATION_CHARS = 10, 200  # field violations in a BadRequest, and each one's text


def _cut(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _violations(exc: EngineError) -> list[tuple[str, str]]:
    found = getattr(exc, "violations", None)
    if found:
        return [(v.field, v.description) for v in found]
    if isinstance(exc, InvalidArgument) and exc.field:
        return [(exc.field, str(exc))]
    return []


def to_status(exc: EngineError) -> status_pb2.Status:
    code = getattr(code_pb2, exc.code)
    status = status_pb2.Status(code=code, message=_cut(str(exc)))
    violations = _violations(exc)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_cut(f, MAX_VIOLATION_CHARS),
                                                        description=_cut(d, MAX_VIOLATION_CHARS))
            for f, d in violations[:MAX_VIOLATIONS]]))
        status.details.append(detail)
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        seconds = exc.retry_after_s
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(seconds), nanos=int((seconds % 1) * 1e9))))
        status.details.append(detail)
    return status


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, EngineError):
        context.abort_with_status(rpc_status.to_status(to_status(exc)))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, _cut(f"internal error: {type(exc).__name__}: {exc}"))


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Wraps every handler (and every streamed generator, for the whole stream)."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        def unary(behavior: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped or logged as INTERNAL
                    if isinstance(exc, grpc.RpcError) or _aborted(context):
                        raise
                    _abort(context, exc)
            return run

        def streaming(behavior: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    if isinstance(exc, grpc.RpcError) or _aborted(context):
                        raise
                    _abort(context, exc)
            return run

        handler = reject_malformed(continuation(details),
                                   lambda exc: InvalidArgument(f"malformed request: {_cut(str(exc), 200)}"))
        return wrap_handler(handler, unary, streaming)


def _aborted(context: grpc.ServicerContext) -> bool:
    """True when the servicer already aborted (grpc raises a plain Exception from abort())."""
    code = getattr(context, "code", lambda: None)()
    return code is not None and code != grpc.StatusCode.OK
