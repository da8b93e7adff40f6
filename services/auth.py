"""Optional bearer-token authentication for every RPC except health checks and reflection."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Iterable

import grpc

from services.handlers import deny_handler

# Probes (Kubernetes, load balancers) and tooling (grpcurl list) work without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` matching one of `tokens` (UNAUTHENTICATED)."""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("at least one non-empty token is required")

    def identity(self, metadata: Iterable[tuple[str, Any]]) -> bool:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer "):].encode()
                return any(hmac.compare_digest(given, t) for t in self._tokens)
        return False

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_SERVICES) or self.identity(details.invocation_metadata or ()):
            return continuation(details)
        return deny_handler(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')")
