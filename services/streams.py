"""Long-lived RPCs (Generate, WatchMetrics, Suggest) are bounded, so they never take the server.

A synchronous gRPC server runs every RPC on a thread of one pool, and a stream holds its thread
for as long as it is open. Left unbounded, some 70 idle WatchMetrics or Suggest streams used
every thread: health checks, GetMetrics and Generate then timed out. So:

- `StreamLimitInterceptor` admits at most `max_streams` long-lived streams at once (the pool
  size less a reserve, so unary RPCs and health checks always find a thread), and at most
  `max_idle_streams_per_client` WatchMetrics + Suggest streams per client (bearer token, or peer
  address without its port); beyond either: RESOURCE_EXHAUSTED, at once.
- `Closing` is set when the server begins to stop; every waiting stream wakes on it (and on its
  own cancellation), rather than sleeping out its interval.
- `requests_until_idle` ends a Suggest stream that sent nothing for `idle_s` with
  DEADLINE_EXCEEDED, and ends any Suggest stream as UNAVAILABLE when the server stops.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from engine.errors import EngineError, ResourceExhausted, Unavailable
from services.handlers import wrap_handler

SERVICE = "/planengine.v1.ControlPlane/"
LONG_LIVED = frozenset({SERVICE + "Generate", SERVICE + "WatchMetrics", SERVICE + "Suggest"})
IDLE_CAPABLE = frozenset({SERVICE + "WatchMetrics", SERVICE + "Suggest"})  # open with nothing to do


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int = 56  # open long-lived streams; the server's pool has this many threads plus a reserve
    max_idle_streams_per_client: int = 8  # WatchMetrics + Suggest streams of one client
    suggest_idle_s: float = 300.0  # a Suggest stream that sends nothing for this long is closed


def client_identity(metadata: Any, peer: str) -> str:
    """Who opened a stream: a digest of its bearer token, else its address without the port."""
    for key, value in metadata or ():
        if key == "authorization":
            return "token:" + hashlib.sha256(str(value).encode()).hexdigest()[:16]
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer


class Closing:
    """The server is stopping: every stream waiting for something is told at once."""

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()

    def set(self) -> None:
        with self._lock:
            self._set = True
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._set

    def subscribe(self, callback: Callable[[], None]) -> int:
        """Call `callback` when the server closes (now, if it already has); a key for unsubscribe."""
        with self._lock:
            key = next(self._ids)
            self._callbacks[key] = callback
            closed = self._set
        if closed:
            callback()
        return key

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)

    def waiter(self, context: grpc.ServicerContext) -> tuple[threading.Event, int]:
        """An event set when the server closes or this RPC ends (client cancel, deadline), and the
        key to unsubscribe it."""
        event = threading.Event()
        context.add_callback(event.set)
        return event, self.subscribe(event.set)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Admits long-lived streams within the limits; must sit inside the error-mapping interceptor."""

    def __init__(self, limits: StreamLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._open = 0
        self._per_client: dict[str, int] = {}

    def open_streams(self) -> int:
        with self._lock:
            return self._open

    def _acquire(self, method: str, client: str) -> None:
        with self._lock:
            if self._open >= self.limits.max_streams:
                raise ResourceExhausted(f"the server has {self._open} streams open, its limit; retry later",
                                        retry_after_s=1.0)
            if method in IDLE_CAPABLE:
                held = self._per_client.get(client, 0)
                if held >= self.limits.max_idle_streams_per_client:
                    raise ResourceExhausted(f"this client already has {held} WatchMetrics/Suggest streams open, "
                                            f"the limit per client; close one first")
                self._per_client[client] = held + 1
            self._open += 1

    def _release(self, method: str, client: str) -> None:
        with self._lock:
            self._open -= 1
            if method in IDLE_CAPABLE:
                left = self._per_client.pop(client) - 1
                if left:
                    self._per_client[client] = left

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        method = details.method
        if method not in LONG_LIVED:
            return handler

        def streaming(behavior: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                client = client_identity(context.invocation_metadata(), context.peer())
                self._acquire(method, client)
                try:
                    yield from behavior(request, context)
                finally:
                    self._release(method, client)
            return run

        return wrap_handler(handler, lambda behavior: behavior, streaming)


_END, _CLOSED = object(), object()


@dataclass(frozen=True)
class _Failed:
    error: Exception


def requests_until_idle(requests: Iterator[Any], idle_s: float, closing: Closing) -> Iterator[Any]:
    """The stream's requests, until the client half-closes. Raises DeadlineExceeded after `idle_s`
    without one and Unavailable when the server stops. A reader thread (not a pool thread) waits
    on the client; it ends when the RPC does."""
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for item in requests:
                inbox.put(item)
        except grpc.RpcError:  # the RPC ended (cancelled): nothing more will come
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed message: the handler raises it
            inbox.put(_Failed(exc))
            return
        inbox.put(_END)

    threading.Thread(target=read, name="suggest-reader", daemon=True).start()
    key = closing.subscribe(lambda: inbox.put(_CLOSED))
    try:
        while True:
            try:
                item = inbox.get(timeout=idle_s)
            except queue.Empty:
                raise DeadlineExceeded(f"no suggestion for {idle_s:g} s: closing the idle stream") from None
            if item is _END:
                return
            if item is _CLOSED:
                raise Unavailable("the server is shutting down")
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        closing.unsubscribe(key)
