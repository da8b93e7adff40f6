"""Optional bearer-token authentication for every RPC except health checks and reflection."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Iterable

import grpc

from services.handlers import deny_handler

# Probes (Kubernetes, load balancers) and tooling (grpcurl list) work without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def parse_bearer(value: Any) -> str | None:
    """The token of an `Authorization` value `Bearer <token>`, else None.

    The scheme is matched case-insensitively (RFC 7235 §2.1: `bearer`, `BEARER` are the same
    scheme) and may be followed by more than one space; the token itself is compared exactly.
    """
    if not isinstance(value, str):
        return None
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def metadata_bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token of the first `authorization` metadata entry, if any (gRPC keys are lowercase)."""
    for key, value in metadata or ():
        if key == "authorization":
            return parse_bearer(value)
    return None


class OperatorTokens:
    """The operator tokens a server accepts; compared in constant time."""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("at least one non-empty token is required")

    def accepts(self, token: str | None) -> bool:
        return token is not None and any(hmac.compare_digest(token.encode(), t) for t in self._tokens)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` matching one of `tokens` (UNAUTHENTICATED)."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = OperatorTokens(tokens)

    def identity(self, metadata: Iterable[tuple[str, Any]]) -> bool:
        return self.tokens.accepts(metadata_bearer(metadata))

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_SERVICES) or self.identity(details.invocation_metadata or ()):
            return continuation(details)
        return deny_handler(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')")
