"""Errors in OpenAI's JSON shape, with the HTTP status its SDKs map to their exception classes.

`{"error": {"message", "type", "param", "code"}}`. Domain errors map by their gRPC code name
through Google's HTTP mapping (google/rpc/code.proto), the one the gRPC side's codes come
from too: INVALID_ARGUMENT → 400 (openai.BadRequestError), UNAUTHENTICATED → 401
(AuthenticationError), PERMISSION_DENIED → 403, NOT_FOUND → 404 (NotFoundError),
RESOURCE_EXHAUSTED → 429 (RateLimitError), UNAVAILABLE → 503, INTERNAL → 500.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from engine.errors import ContextOverflow, EngineError, ModelNotFound, ResourceExhausted

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNKNOWN": 500, "INTERNAL": 500, "DATA_LOSS": 500,
               "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine(exc: EngineError, fields: dict[str, str] | None = None) -> ApiError:
    """The ApiError for a domain error; `fields` renames the engine's field names to the request's."""
    status = HTTP_STATUS.get(exc.code, 500)
    field = getattr(exc, "field", None)
    if field:
        # the engine names fields as the gRPC request does (sampling.top_p, chat.messages[0].role)
        field = (fields or {}).get(field, field.removeprefix("sampling.").removeprefix("chat."))
    code = None
    headers: dict[str, str] = {}
    if isinstance(exc, ContextOverflow):
        code = "context_length_exceeded"
    elif isinstance(exc, ModelNotFound):
        code = "model_not_found"
    elif isinstance(exc, ResourceExhausted):
        # the openai SDKs retry a 429 after Retry-After, and not at all when told it cannot help
        if exc.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
        else:
            headers["x-should-retry"] = "false"
    return ApiError(status, str(exc), field, code, headers)


def from_validation(exc: RequestValidationError) -> ApiError:
    """A request body that does not parse or validate: 400 naming the first bad field."""
    err = exc.errors()[0]
    loc = [x for x in err.get("loc", ()) if x != "body"]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"'{param}' is required"
    elif kind.startswith("json"):
        message, param = f"the request body is not valid JSON: {err.get('msg')}", None
    else:
        message = f"'{param}': {err.get('msg')} (got {err.get('input')!r})" if param else str(err.get("msg"))
    return ApiError(400, message, param)
