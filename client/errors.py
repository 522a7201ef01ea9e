"""The one exception type the client raises for failed calls."""

from __future__ import annotations

from typing import Any


class InferenceError(Exception):
    """A call to the server failed.

    `code` is the gRPC status code (a `grpc.StatusCode`, or None when the failure happened
    before any call, e.g. an unanswerable question about which model to use), `message` is
    the server's own message (or the client's explanation), `attempts` how many times the
    call was tried (retries of UNAVAILABLE included).
    """

    def __init__(self, message: str, code: Any = None, *, attempts: int = 1):
        self.message = message
        self.code = code
        self.attempts = attempts
        super().__init__(message)

    @property
    def status(self) -> str:
        """The code as text, e.g. "INVALID_ARGUMENT" ("" when there is none)."""
        return self.code.name if self.code is not None else ""

    def __str__(self) -> str:
        head = f"[{self.status}] " if self.code is not None else ""
        tail = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{head}{self.message}{tail}"


def from_rpc_error(error: Any, *, attempts: int = 1) -> InferenceError:
    """Turn a `grpc.RpcError` (sync or aio) into an InferenceError keeping code and details."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    return InferenceError(details or str(error), code, attempts=attempts)
