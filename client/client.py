"""The synchronous client: `Client`.

from convserve.client import Client
with Client("localhost:8001") as client:
    probabilities = client.predict("examples/sneaker_9.png")
    best = client.classify(images, top_k=3)
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from . import images as imaging
from . import protocol
from .base import ClientBase
from .errors import InferenceError
from .protocol import ModelInfo, ModelVersionState, Prediction
from .retry import Deadline, call


class Client(ClientBase):
    """A blocking client for convserve (or any Open Inference Protocol server with image models).

    `target` is "host:port", several of them (a list or comma-separated; requests are spread
    with gRPC's round_robin policy), or a gRPC name such as "dns:///convserve:8001"; by default
    $CONVSERVE_TARGET or "localhost:8001". `timeout` is each call's deadline in seconds (every
    attempt and chunk included), `retries` how often UNAVAILABLE is retried (or a RetryPolicy),
    `concurrency` how many chunks of a large input are in flight at once. Failed calls raise
    InferenceError.

    Security: TLS is on when any `tls_*` file is given: `tls_ca_file` is the PEM CA that signed
    the server's certificate (default: the system's CAs), `tls_cert_file` and `tls_key_file`
    the client's certificate and key for mutual TLS. `token` is sent as `authorization: Bearer
    <token>` (default: $CONVSERVE_TOKEN; "" sends none); without TLS only to a loopback target.
    `credentials` (gRPC channel credentials) replaces the `tls_*` files for full control.
    """

    def _connect(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(
                self.target, self._credentials, options=self._options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- lifecycle

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing

    def _call(self, method: str, request: Any, deadline: Deadline, retry: bool = True) -> Any:
        attempt = self._attempt(getattr(self._stub, method), request)
        try:
            return call(attempt, self._policy(retry), deadline, method)
        except InferenceError as error:
            raise self._explain(error) from None

    def _model(self, model: str | None, deadline: Deadline) -> str:
        if model:
            return model
        if self._default_model:
            return self._default_model
        request = pb.RepositoryIndexRequest()
        try:
            return call(
                lambda seconds: self._choose_model(
                    self._stub.RepositoryIndex(request, timeout=seconds, metadata=self._metadata)
                ),
                self.retry,
                deadline,
                "RepositoryIndex",
            )
        except InferenceError as error:
            raise self._explain(self._unlisted(error)) from None

    def _info(self, model: str, version: str, deadline: Deadline) -> ModelInfo:
        if (model, version) in self._infos:
            return self._infos[(model, version)]
        meta_request, config_request = self._metadata_requests(model, version)
        meta = self._call("ModelMetadata", meta_request, deadline)
        config = None
        try:
            config = self._call("ModelConfig", config_request, deadline)
        except InferenceError as error:
            self._config_missing(error)
        return self._remember(model, version, meta, config)

    def _index(self, deadline: Deadline, ready: bool = False) -> list[ModelVersionState]:
        try:
            response = self._call(
                "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), deadline
            )
        except InferenceError as error:
            raise self._unlisted(error) from None
        return protocol.repository_index(response)

    def _infer(
        self, info: ModelInfo, version: str, batch: np.ndarray, class_count: int, deadline: Deadline
    ) -> list[tuple[Any, int]]:
        """Send `batch` in chunks of at most max_batch_size, concurrently; responses in order."""

        def one(part: slice) -> tuple[Any, int]:
            request = protocol.infer_request(info, version, batch[part], class_count)
            return self._call("ModelInfer", request, deadline), part.stop - part.start

        parts = protocol.chunks(len(batch), info.max_batch_size)
        try:
            if len(parts) == 1 or self.concurrency == 1:
                return [one(p) for p in parts]
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.concurrency, thread_name_prefix="convserve-client"
                    )
                pool = self._pool
            return list(pool.map(one, parts))
        except InferenceError as error:
            self._forget(error, (info.name, version))
            raise

    # -- health and metadata

    def is_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server answers and says it is live (False when it cannot be reached)."""
        return self._ask("ServerLive", pb.ServerLiveRequest(), "live", timeout)

    def is_ready(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or one model) is ready; False when the server cannot be reached.

        An unknown model raises InferenceError (INVALID_ARGUMENT), as Triton does.
        """
        if model is None:
            return self._ask("ServerReady", pb.ServerReadyRequest(), "ready", timeout)
        request = pb.ModelReadyRequest(name=model, version=version)
        return self._ask("ModelReady", request, "ready", timeout)

    def _ask(self, method: str, request: Any, field: str, timeout: float | None) -> bool:
        try:
            response = self._call(method, request, self._deadline(timeout), retry=False)
        except InferenceError as error:
            return self._answer_or_false(error)
        return bool(getattr(response, field))

    def wait_until_ready(self, model: str | None = None, *, timeout: float | None = None) -> None:
        """Block until the server (or a model) is ready; InferenceError DEADLINE_EXCEEDED if it does not get there."""
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            if self.is_ready(model, timeout=self._ready_question_timeout(deadline)):
                return
            time.sleep(self._ready_pause(deadline, attempt, model))

    def models(self, *, timeout: float | None = None) -> list[str]:
        """Names of the server's ready models, sorted."""
        return self._ready_names(self._index(self._deadline(timeout), ready=True))

    def repository(self, *, timeout: float | None = None) -> list[ModelVersionState]:
        """Every model version the server knows, with its state (READY, UNAVAILABLE, ...)."""
        return self._index(self._deadline(timeout))

    def metadata(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        """The model's inputs, outputs, versions and max_batch_size (cached per client)."""
        deadline = self._deadline(timeout)
        return self._info(self._model(model, deadline), version, deadline)

    def labels(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> tuple[str, ...]:
        """The model's class labels, by output index (learned from one classification; cached)."""
        deadline = self._deadline(timeout)
        info = self._info(self._model(model, deadline), version, deadline)
        if (info.name, version) in self._labels:
            return self._labels[(info.name, version)]
        probe = self._infer(info, version, self._probe(info), self._probe_classes(info), deadline)
        return self._learn_labels(info, version, probe)

    # -- inference

    def predict(
        self,
        images: imaging.ImageSource,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Class probabilities, shape (N, classes), for `images`.

        `images`: an array (H, W, C) or (N, H, W, C) of uint8 or float pixels (0..255), a list
        of arrays, PNG/JPEG bytes or file paths (mixed lists too). They are converted to the
        model's input channels and size; large inputs go in chunks of max_batch_size.
        """
        deadline = self._deadline(timeout)
        info = self._info(self._model(model, deadline), version, deadline)
        results = self._infer(info, version, self._batch(images, info), 0, deadline)
        return self._probabilities(info, results)

    def classify(
        self,
        images: imaging.ImageSource,
        top_k: int = 5,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> list[list[Prediction]]:
        """The `top_k` best classes of each image, best first (label, index, score)."""
        self._check_top_k(top_k)
        deadline = self._deadline(timeout)
        info = self._info(self._model(model, deadline), version, deadline)
        results = self._infer(info, version, self._batch(images, info), top_k, deadline)
        return self._rows(info, results)
