"""convserve.client: a light client for convserve and any Open Inference Protocol server.

    from convserve.client import Client
    with Client("localhost:8001") as client:
        for row in client.classify(["examples/sneaker_9.png"], top_k=3):
            print(row[0].label, row[0].score)

`Client` blocks, `AsyncClient` offers the same methods on grpc.aio; failed calls raise
`InferenceError` (with the gRPC `code` and the server's `message`). Importing this package
never imports numba or convserve.core; Pillow (the `images` extra) is needed only for
encoded images and resizing.
"""

from .aio import AsyncClient
from .client import Client
from .errors import InferenceError
from .protocol import ModelInfo, ModelVersionState, Prediction, TensorSpec
from .retry import RetryPolicy

__all__ = ["AsyncClient", "Client", "InferenceError", "ModelInfo", "ModelVersionState", "Prediction",
           "RetryPolicy", "TensorSpec"]
