"""convserve.client: a light client for convserve and any Open Inference Protocol server.

    from convserve.client import Client
    with Client("localhost:8001") as client:
        for row in client.classify(["examples/sneaker_9.png"], top_k=3):
            print(row[0].label, row[0].score)

`Client` blocks, `AsyncClient` offers the same methods on grpc.aio; failed calls raise
`InferenceError` (with the gRPC `code` and the server's `message`). Importing this package
never imports numba or convserve.core; Pillow (the `images` extra) is needed only for
encoded images and resizing. Names load on first use, so `convserve health` (which needs only
grpc) starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncClient": "convserve.client.aio",
    "Client": "convserve.client.client",
    "InferenceError": "convserve.client.errors",
    "ModelInfo": "convserve.client.protocol",
    "ModelVersionState": "convserve.client.protocol",
    "Prediction": "convserve.client.protocol",
    "TensorSpec": "convserve.client.protocol",
    "RetryPolicy": "convserve.client.retry",
    "StreamResult": "convserve.client.protocol",
}

__all__ = [
    "AsyncClient",
    "Client",
    "InferenceError",
    "ModelInfo",
    "ModelVersionState",
    "Prediction",
    "RetryPolicy",
    "StreamResult",
    "TensorSpec",
]

if TYPE_CHECKING:  # for type checkers and IDEs
    from .aio import AsyncClient
    from .client import Client
    from .errors import InferenceError
    from .protocol import ModelInfo, ModelVersionState, Prediction, StreamResult, TensorSpec
    from .retry import RetryPolicy


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convserve.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
