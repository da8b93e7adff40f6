"""Domain errors, one class per kind of failure a client can act on.

The domain never imports grpc: each error carries a `code` naming the
canonical status (grpc's StatusCode names), and the service layer maps it in
one place. The CLI prints `str(error)` as one line and exits non-zero.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports to a user."""

    code = "INTERNAL"


class InvalidArgument(EngineError, ValueError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(EngineError):
    code = "NOT_FOUND"


class FailedPrecondition(EngineError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(EngineError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when a retry may succeed; None: not by waiting


class Unavailable(EngineError):
    code = "UNAVAILABLE"


class RequestFailed(EngineError):
    """The engine could not finish a request (e.g. the model produced non-finite logits);
    other requests are unaffected. The message names the cause."""


class DataLoss(EngineError):
    """Stored data that cannot be read back (a corrupt row or database file): named, never served."""

    code = "DATA_LOSS"


class ModelNotFound(NotFound):
    """A model name that is neither in the registry nor an existing file."""


class ModelFormatError(InvalidArgument):
    """A file that is not a readable GGUF model: bad magic, truncated, inconsistent."""


class UnsupportedModel(InvalidArgument):
    """A valid GGUF file whose architecture or tensor types we cannot run."""


class DownloadError(Unavailable):
    """Fetching or verifying a model from the package registry failed."""


class ContextOverflow(InvalidArgument):
    """A prompt (plus requested tokens) longer than the context allows."""


SHOWN_CHARS = 120  # how much of a client's value an error message echoes


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters with its full length noted:
    a client's 100,000-character value must not come back in a status (gRPC's metadata limit)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters shown"
    return f"{text[:limit]}... ({size})"
