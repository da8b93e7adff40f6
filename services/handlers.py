"""Rewriting a grpc method handler's behaviour: the one mechanism every interceptor here uses."""

from __future__ import annotations

from typing import Any, Callable

import grpc

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def wrap_handler(handler: Any, unary: Callable[[Behavior], Behavior],
                 streaming: Callable[[Behavior], Behavior]) -> Any:
    """The handler with its behaviour wrapped: `unary` for methods that return one response,
    `streaming` (which must return a generator function) for methods that stream responses,
    so a wrapper around a stream covers the whole stream."""
    if handler is None:
        return None
    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.stream_stream:
        return handler._replace(stream_stream=streaming(handler.stream_stream))
    return handler


def deny_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """The handler answering every call with `code` and `message`, without running the method."""
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def deny_stream(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    return wrap_handler(handler, lambda _: deny, lambda _: deny_stream)


class MalformedRequest:
    """What a guarded deserializer hands on for bytes that do not parse as the request message."""

    def __init__(self, error: Exception):
        self.error = error


def reject_malformed(handler: Any, error: Callable[[Exception], Exception]) -> Any:
    """The handler with its request deserializer guarded: grpc answers INTERNAL (and logs a
    traceback) when a deserializer raises, so the guarded one returns a MalformedRequest
    instead, and the wrapped behaviour raises `error(the decode error)` before the method runs
    (for a request stream: when the servicer reaches the bad message), for the caller's error
    mapping to answer."""
    if handler is None or handler.request_deserializer is None:
        return handler
    deserialize = handler.request_deserializer

    def guarded(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or whatever a deserializer raises
            return MalformedRequest(exc)

    def check(request: Any) -> Any:
        if isinstance(request, MalformedRequest):
            raise error(request.error)
        return request

    def checked_stream(requests: Any) -> Any:
        for request in requests:
            yield check(request)

    inspect = checked_stream if handler.request_streaming else check

    def unary(behavior: Behavior) -> Behavior:
        return lambda request, context: behavior(inspect(request), context)

    def streaming(behavior: Behavior) -> Behavior:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            yield from behavior(inspect(request), context)
        return run

    return wrap_handler(handler._replace(request_deserializer=guarded), unary, streaming)
