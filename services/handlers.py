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
