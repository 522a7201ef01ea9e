"""The synchronous client: `Client`.

from convserve.client import Client
with Client("localhost:8001") as client:
    probabilities = client.predict("examples/sneaker_9.png")
    best = client.classify(images, top_k=3)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from . import channel, protocol
from . import images as imaging
from .errors import InferenceError
from .protocol import ModelInfo, ModelVersionState, Prediction
from .retry import Deadline, RetryPolicy, call

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_STALE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


class ClientBase:
    """Settings and bookkeeping shared by Client and AsyncClient (no I/O)."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy | None = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        concurrency: int = 4,
        options: Sequence[tuple[str, Any]] = (),
    ):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        self.target, round_robin = channel.resolve(target)
        self.round_robin = round_robin
        self.timeout = float(timeout)
        self.retry = RetryPolicy.of(retries)
        self.concurrency = concurrency
        self._credentials = credentials
        self._options = channel.options(round_robin, options)
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._default_model: str | None = None
        self._connect()

    def _connect(self) -> None:
        """Open the channel (the sync and asyncio clients differ here)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout:g})"

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)

    def _choose_model(self, response: Any) -> str:
        """The only ready model in a RepositoryIndexResponse (UNAVAILABLE, so retried, while models load)."""
        index = protocol.repository_index(response)
        names = sorted({m.name for m in index if m.state.upper() == "READY"})
        if not names and index:
            loading = sorted({f"{m.name} ({m.state.lower()})" for m in index})
            raise InferenceError(
                f"no model given and no model of the server at {self.target} is ready yet: "
                f"{', '.join(loading)}",
                grpc.StatusCode.UNAVAILABLE,
            )
        if len(names) != 1:
            raise InferenceError(
                f"no model given and the server at {self.target} has {len(names)} ready models "
                f"{names}; pass model=NAME"
            )
        self._default_model = names[0]
        return names[0]

    def _unlisted(self, error: InferenceError) -> InferenceError:
        if error.code == grpc.StatusCode.UNIMPLEMENTED:
            return InferenceError(
                f"the server at {self.target} does not list its models (RepositoryIndex is "
                "unimplemented); pass model=NAME",
                error.code,
            )
        return error

    def _forget(self, error: InferenceError, key: tuple[str, str]) -> None:
        """After a refused inference, re-read the model's metadata next time (it may have changed)."""
        if error.code in _STALE:
            self._infos.pop(key, None)
            self._labels.pop(key, None)
            if self._default_model == key[0]:
                self._default_model = None

    @staticmethod
    def _check_top_k(top_k: int) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")

    @staticmethod
    def _labels_from(info: ModelInfo, rows: list[list[Prediction]]) -> tuple[str, ...]:
        by_index = {p.index: p.label for p in rows[0]}
        return tuple(by_index.get(i, str(i)) for i in range(info.num_classes or len(by_index)))

    @staticmethod
    def _probe(info: ModelInfo) -> np.ndarray:
        """One blank image of the model's input, used to learn its labels."""
        shape = tuple(d or 1 for d in info.input_shape)
        return np.zeros((1, *shape), dtype=info.input_dtype)


class Client(ClientBase):
    """A blocking client for convserve (or any Open Inference Protocol server with image models).

    `target` is "host:port", several of them (a list or comma-separated; requests are spread
    with gRPC's round_robin policy), or a gRPC name such as "dns:///convserve:8001"; by default
    $CONVSERVE_TARGET or "localhost:8001". `timeout` is each call's deadline in seconds (every
    attempt and chunk included), `retries` how often UNAVAILABLE is retried (or a RetryPolicy),
    `credentials` gRPC channel credentials for TLS (None: plaintext), `concurrency` how many
    chunks of a large input are in flight at once. Failed calls raise InferenceError.
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
        rpc: Callable[..., Any] = getattr(self._stub, method)
        policy = self.retry if retry else RetryPolicy(attempts=1)
        return call(lambda seconds: rpc(request, timeout=seconds), policy, deadline, method)

    def _model(self, model: str | None, deadline: Deadline) -> str:
        if model:
            return model
        if self._default_model:
            return self._default_model
        request = pb.RepositoryIndexRequest()
        try:
            return call(
                lambda seconds: self._choose_model(
                    self._stub.RepositoryIndex(request, timeout=seconds)
                ),
                self.retry,
                deadline,
                "RepositoryIndex",
            )
        except InferenceError as error:
            raise self._unlisted(error) from None

    def _info(self, model: str, version: str, deadline: Deadline) -> ModelInfo:
        key = (model, version)
        if key not in self._infos:
            meta = self._call(
                "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), deadline
            )
            try:
                config = self._call(
                    "ModelConfig", pb.ModelConfigRequest(name=model, version=version), deadline
                )
            except InferenceError as error:
                if error.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                config = None
            self._infos[key] = protocol.model_info(meta, config)
        return self._infos[key]

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
        return self._ask(
            lambda d: self._call("ServerLive", pb.ServerLiveRequest(), d, retry=False).live, timeout
        )

    def is_ready(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or one model) is ready; False when the server cannot be reached.

        An unknown model raises InferenceError (INVALID_ARGUMENT), as Triton does.
        """
        if model is None:
            return self._ask(
                lambda d: self._call("ServerReady", pb.ServerReadyRequest(), d, retry=False).ready,
                timeout,
            )
        request = pb.ModelReadyRequest(name=model, version=version)
        return self._ask(lambda d: self._call("ModelReady", request, d, retry=False).ready, timeout)

    def _ask(self, question: Callable[[Deadline], bool], timeout: float | None) -> bool:
        try:
            return bool(question(self._deadline(timeout)))
        except InferenceError as error:
            if error.code in _UNREACHABLE:
                return False
            raise

    def wait_until_ready(self, model: str | None = None, *, timeout: float | None = None) -> None:
        """Block until the server (or a model) is ready; InferenceError DEADLINE_EXCEEDED if it does not get there."""
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            if self.is_ready(model, timeout=max(min(deadline.remaining(), 2.0), 0.001)):
                return
            pause = min(0.05 * 2 ** min(attempt, 5), deadline.remaining())
            if pause <= 0:
                raise deadline.expired_error(
                    attempt, f"waiting for {model or 'the server'} at {self.target} to be ready"
                )
            time.sleep(pause)

    def models(self, *, timeout: float | None = None) -> list[str]:
        """Names of the server's ready models, sorted."""
        return sorted(
            {
                m.name
                for m in self._index(self._deadline(timeout), ready=True)
                if m.state.upper() == "READY"
            }
        )

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
        key = (info.name, version)
        if key not in self._labels:
            probe = self._probe(info)
            [(response, rows)] = self._infer(
                info, version, probe, info.num_classes or 1_000_000, deadline
            )
            self._labels[key] = self._labels_from(
                info, protocol.classifications(response, info.output.name, rows)
            )
        return self._labels[key]

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
        batch = imaging.prepare(images, info.input_shape, info.input_dtype)
        results = self._infer(info, version, batch, 0, deadline)
        return np.concatenate([protocol.probabilities(r, info.output.name, n) for r, n in results])

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
        batch = imaging.prepare(images, info.input_shape, info.input_dtype)
        results = self._infer(info, version, batch, top_k, deadline)
        return [row for r, n in results for row in protocol.classifications(r, info.output.name, n)]
