"""Domain errors of the server, each carrying the gRPC status code name it maps to.

The batcher and repository raise these without knowing gRPC; the servicer turns `code` into a
`grpc.StatusCode` and `str(error)` into the status details (Triton's message prefixes).
"""

from __future__ import annotations

SHOWN_CHARS = 80  # a client's text echoed in an error message is cut to this length


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied string as quoted in error messages: cut short, control characters escaped."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")


class ServingError(Exception):
    """An error answered to the caller: `code` is a gRPC status code name."""

    code = "INTERNAL"
    reason = "error"  # the `outcome` label in metrics

    def __init__(self, message: str, code: str | None = None, reason: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason


class InvalidRequest(ServingError):
    code = "INVALID_ARGUMENT"
    reason = "invalid"


class ModelNotFound(ServingError):
    code = "NOT_FOUND"
    reason = "invalid"


class Unavailable(ServingError):
    code = "UNAVAILABLE"
    reason = "rejected"


class QueueFull(Unavailable):
    reason = "rejected"


class RequestTimeout(Unavailable):
    """Triton's `timeout` parameter expired while the request waited in the queue."""

    reason = "timeout"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"
    reason = "timeout"


class Cancelled(ServingError):
    code = "CANCELLED"
    reason = "cancelled"


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"
    reason = "invalid"
