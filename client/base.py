"""`ClientBase`: everything `Client` and `AsyncClient` share, which is all but the waiting.

Every public operation (predict, classify, labels, is_ready, ...) is written here once, as a
plan (client/plan.py): a generator that yields the gRPC calls it needs and receives their
answers. `Client` runs plans with blocking calls, `AsyncClient` with coroutines; checking
arguments, choosing the model, caching its metadata, building requests and reading responses
happen here for both.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb

from . import channel, protocol
from . import credentials as tls
from . import images as imaging
from .errors import InferenceError
from .plan import Call, Concurrently, Plan, Sleep, operation
from .protocol import ModelInfo, ModelVersionState, Prediction
from .retry import Deadline, RetryPolicy

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A readiness question answered NOT_FOUND: convserve and Triton never answer it so (an unknown
# model is INVALID_ARGUMENT), but a proxy with no server behind it yet does (Ray Serve's, before its
# application is deployed or after it is shut down), so it means "not ready".
NOT_READY = UNREACHABLE + (grpc.StatusCode.NOT_FOUND,)
_STALE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
READY_POLL_CAP = 2.0  # seconds: the longest single readiness question in wait_until_ready


class ClientBase:
    """Settings, caches and the public operations of Client and AsyncClient (no I/O)."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy | None = DEFAULT_RETRIES,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        token: str | None = None,
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
        if credentials is not None and (tls_ca_file or tls_cert_file or tls_key_file):
            raise ValueError("pass either credentials= or the tls_* files, not both")
        self._credentials = credentials or tls.channel_credentials(
            tls_ca_file, tls_cert_file, tls_key_file
        )
        self._secure = self._credentials is not None
        # sent with every call; never shown (repr, errors)
        self._metadata = tls.token_metadata(token, self._secure, self.target)
        self._options = channel.options(round_robin, options)
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._default_model: str | None = None
        self._connect()

    def _connect(self) -> None:
        """Open the channel (the sync and asyncio clients differ here)."""

    def _run(self, plan: Plan[T]) -> Any:
        """Drive `plan` to its result: `Client` blocks, `AsyncClient` returns a coroutine."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout:g})"

    # -- calls

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)

    def _call(
        self,
        method: str,
        request: Any,
        deadline: Deadline,
        *,
        retry: bool = True,
        check: Callable[[Any], Any] | None = None,
    ) -> Call:
        """The effect of calling `method` with the token metadata (retry=False: tried once)."""
        policy = self.retry if retry else RetryPolicy(attempts=1)
        return Call(method, request, deadline, policy, self._metadata, check)

    def _explain(self, error: InferenceError) -> InferenceError:
        """The error, with a hint when a plaintext channel was closed (as a TLS server does)."""
        if (
            self._secure
            or error.code != grpc.StatusCode.UNAVAILABLE
            or "Socket closed" not in error.message
        ):
            return error
        hint = "; if the server uses TLS, pass tls_ca_file (CLI: --tls-ca-file)"
        return InferenceError(error.message + hint, error.code, attempts=error.attempts)

    # -- health

    @operation
    def is_live(self, *, timeout: float | None = None) -> Plan[bool]:
        """Whether the server answers and says it is live (False when it cannot be reached)."""
        return (yield from self._ask("ServerLive", pb.ServerLiveRequest(), "live", timeout))

    @operation
    def is_ready(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> Plan[bool]:
        """Whether the server (or one model) is ready; False when the server cannot be reached
        (or a proxy in front of it answers NOT_FOUND: nothing behind it yet).

        An unknown model raises InferenceError (INVALID_ARGUMENT), as Triton does.
        """
        return (yield from self._ready(model, version, timeout))

    def _ready(self, model: str | None, version: str, timeout: float | None) -> Plan[bool]:
        if model is None:
            request = pb.ServerReadyRequest()
            return (yield from self._ask("ServerReady", request, "ready", timeout, NOT_READY))
        request = pb.ModelReadyRequest(name=model, version=version)
        return (yield from self._ask("ModelReady", request, "ready", timeout, NOT_READY))

    def _ask(
        self,
        method: str,
        request: Any,
        field: str,
        timeout: float | None,
        false_on: tuple[grpc.StatusCode, ...] = UNREACHABLE,
    ) -> Plan[bool]:
        """A health question, asked once: the answer's `field`, False on an error in `false_on`."""
        try:
            response = yield self._call(method, request, self._deadline(timeout), retry=False)
        except InferenceError as error:
            if error.code in false_on:
                return False
            raise
        return bool(getattr(response, field))

    @operation
    def wait_until_ready(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> Plan[None]:
        """Wait until the server (or a model) is ready; InferenceError DEADLINE_EXCEEDED if it does not get there."""
        deadline = self._deadline(timeout)
        for attempt in itertools.count(1):
            question = max(min(deadline.remaining(), READY_POLL_CAP), 0.001)
            if (yield from self._ready(model, "", question)):
                return
            pause = min(0.05 * 2 ** min(attempt, 5), deadline.remaining())
            if pause <= 0:
                raise deadline.expired_error(
                    attempt, f"waiting for {model or 'the server'} at {self.target} to be ready"
                )
            yield Sleep(pause)

    # -- models and metadata

    @operation
    def models(self, *, timeout: float | None = None) -> Plan[list[str]]:
        """Names of the server's ready models, sorted."""
        response = yield from self._repository_index(self._deadline(timeout), ready=True)
        return _ready_names(protocol.repository_index(response))

    @operation
    def repository(self, *, timeout: float | None = None) -> Plan[list[ModelVersionState]]:
        """Every model version the server knows, with its state (READY, UNAVAILABLE, ...)."""
        response = yield from self._repository_index(self._deadline(timeout))
        return protocol.repository_index(response)

    @operation
    def metadata(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> Plan[ModelInfo]:
        """The model's inputs, outputs, versions and max_batch_size (cached per client)."""
        return (yield from self._model_info(model, version, self._deadline(timeout)))

    @operation
    def labels(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> Plan[tuple[str, ...]]:
        """The model's class labels, by output index (learned from one classification; cached)."""
        deadline = self._deadline(timeout)
        info = yield from self._model_info(model, version, deadline)
        key = (info.name, version)
        if key not in self._labels:
            # One blank image, classified into every class, names every output index.
            probe = np.zeros((1, *(d or 1 for d in info.input_shape)), dtype=info.input_dtype)
            every_class = info.num_classes or 1_000_000
            results = yield from self._infer(info, version, probe, every_class, deadline)
            by_index = {p.index: p.label for p in self._rows(info, results)[0]}
            count = info.num_classes or len(by_index)
            self._labels[key] = tuple(by_index.get(i, str(i)) for i in range(count))
        return self._labels[key]

    def _repository_index(
        self, deadline: Deadline, *, ready: bool = False, check: Callable[[Any], Any] | None = None
    ) -> Plan[Any]:
        """RepositoryIndex's answer (passed through `check`), retried."""
        request = pb.RepositoryIndexRequest(ready=ready)
        try:
            return (yield self._call("RepositoryIndex", request, deadline, check=check))
        except InferenceError as error:
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                raise InferenceError(
                    f"the server at {self.target} does not list its models (RepositoryIndex is "
                    "unimplemented); pass model=NAME",
                    error.code,
                ) from None
            raise

    def _model_info(self, model: str | None, version: str, deadline: Deadline) -> Plan[ModelInfo]:
        """The metadata of `model` (by default the server's only ready model), cached."""
        name = model or self._default_model
        if not name:
            name = yield from self._repository_index(deadline, check=self._choose_model)
        if (name, version) in self._infos:
            return self._infos[(name, version)]
        meta = yield self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), deadline
        )
        config = None
        try:
            request = pb.ModelConfigRequest(name=name, version=version)
            config = yield self._call("ModelConfig", request, deadline)
        except InferenceError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:  # without it: max_batch_size unknown
                raise
        info = protocol.model_info(meta, config)
        self._infos[(name, version)] = info
        return info

    def _choose_model(self, response: Any) -> str:
        """The only ready model in a RepositoryIndexResponse (UNAVAILABLE, so retried, while models load)."""
        index = protocol.repository_index(response)
        names = _ready_names(index)
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

    def _forget(self, error: InferenceError, key: tuple[str, str]) -> None:
        """After a refused inference, re-read the model's metadata next time (it may have changed)."""
        if error.code in _STALE:
            self._infos.pop(key, None)
            self._labels.pop(key, None)
            if self._default_model == key[0]:
                self._default_model = None

    # -- inference

    @operation
    def predict(
        self,
        images: imaging.ImageSource,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> Plan[np.ndarray]:
        """Class probabilities, shape (N, classes), for `images`.

        `images`: an array (H, W, C) or (N, H, W, C) of uint8 or float pixels (0..255), a list
        of arrays, PNG/JPEG bytes or file paths (mixed lists too). They are converted to the
        model's input channels and size; large inputs go in chunks of max_batch_size.
        """
        deadline = self._deadline(timeout)
        info = yield from self._model_info(model, version, deadline)
        results = yield from self._infer(info, version, self._batch(images, info), 0, deadline)
        return self._probabilities(info, results)

    @operation
    def classify(
        self,
        images: imaging.ImageSource,
        top_k: int = 5,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> Plan[list[list[Prediction]]]:
        """The `top_k` best classes of each image, best first (label, index, score)."""
        self._check_top_k(top_k)
        deadline = self._deadline(timeout)
        info = yield from self._model_info(model, version, deadline)
        results = yield from self._infer(info, version, self._batch(images, info), top_k, deadline)
        return self._rows(info, results)

    def _infer(
        self, info: ModelInfo, version: str, batch: np.ndarray, class_count: int, deadline: Deadline
    ) -> Plan[list[tuple[Any, int]]]:
        """Send `batch` in chunks of at most max_batch_size, concurrently: (response, rows) in order."""
        parts = protocol.chunks(len(batch), info.max_batch_size)

        def chunk(part: slice) -> Call:
            request = protocol.infer_request(info, version, batch[part], class_count)
            return self._call("ModelInfer", request, deadline)

        try:
            responses = yield Concurrently([functools.partial(chunk, part) for part in parts])
        except InferenceError as error:
            self._forget(error, (info.name, version))
            raise
        return [(r, part.stop - part.start) for r, part in zip(responses, parts, strict=True)]

    @staticmethod
    def _check_top_k(top_k: int) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")

    @staticmethod
    def _batch(images: imaging.ImageSource, info: ModelInfo) -> np.ndarray:
        return imaging.prepare(images, info.input_shape, info.input_dtype)

    @staticmethod
    def _probabilities(info: ModelInfo, results: list[tuple[Any, int]]) -> np.ndarray:
        return np.concatenate([protocol.probabilities(r, info.output.name, n) for r, n in results])

    @staticmethod
    def _rows(info: ModelInfo, results: list[tuple[Any, int]]) -> list[list[Prediction]]:
        return [row for r, n in results for row in protocol.classifications(r, info.output.name, n)]


def _ready_names(index: list[ModelVersionState]) -> list[str]:
    return sorted({m.name for m in index if m.state.upper() == "READY"})
