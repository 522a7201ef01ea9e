"""`ClientBase`: the settings and non-I/O logic that `Client` and `AsyncClient` share.

The two clients differ only in how they wait for the network (blocking calls against
coroutines). Everything else, from checking arguments and choosing the model to building
requests and reading responses, lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb

from . import channel, protocol
from . import credentials as tls
from . import images as imaging
from .errors import InferenceError
from .protocol import ModelInfo, ModelVersionState, Prediction, StreamResult
from .retry import Deadline, RetryPolicy

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_STALE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
READY_POLL_CAP = 2.0  # seconds: the longest single readiness question in wait_until_ready


class ClientBase:
    """Settings and bookkeeping shared by Client and AsyncClient (no I/O)."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout:g})"

    # -- calls

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)

    def _attempt(self, rpc: Callable[..., Any], request: Any) -> Callable[[float], Any]:
        """One try of `rpc` with the seconds left, carrying the token metadata."""
        return lambda seconds: rpc(request, timeout=seconds, metadata=self._metadata)

    def _policy(self, retry: bool) -> RetryPolicy:
        return self.retry if retry else RetryPolicy(attempts=1)

    @staticmethod
    def _answer_or_false(error: InferenceError) -> bool:
        """A health question's answer when the call failed: False if unreachable, else raise."""
        if error.code in UNREACHABLE:
            return False
        raise error

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

    def _ready_pause(self, deadline: Deadline, attempt: int, model: str | None) -> float:
        """Seconds to wait before readiness question `attempt + 1`; raises once time is up."""
        pause = min(0.05 * 2 ** min(attempt, 5), deadline.remaining())
        if pause <= 0:
            raise deadline.expired_error(
                attempt, f"waiting for {model or 'the server'} at {self.target} to be ready"
            )
        return pause

    @staticmethod
    def _ready_question_timeout(deadline: Deadline) -> float:
        return max(min(deadline.remaining(), READY_POLL_CAP), 0.001)

    # -- models and metadata

    @staticmethod
    def _ready_names(index: list[ModelVersionState]) -> list[str]:
        return sorted({m.name for m in index if m.state.upper() == "READY"})

    def _choose_model(self, response: Any) -> str:
        """The only ready model in a RepositoryIndexResponse (UNAVAILABLE, so retried, while models load)."""
        index = protocol.repository_index(response)
        names = self._ready_names(index)
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

    @staticmethod
    def _metadata_requests(model: str, version: str) -> tuple[Any, Any]:
        return (
            pb.ModelMetadataRequest(name=model, version=version),
            pb.ModelConfigRequest(name=model, version=version),
        )

    @staticmethod
    def _config_missing(error: InferenceError) -> None:
        """ModelConfig failed: fine (None) when the server does not implement it, else raise."""
        if error.code != grpc.StatusCode.UNIMPLEMENTED:
            raise error

    def _remember(self, model: str, version: str, meta: Any, config: Any) -> ModelInfo:
        info = protocol.model_info(meta, config)
        self._infos[(model, version)] = info
        return info

    def _forget(self, error: InferenceError, key: tuple[str, str]) -> None:
        """After a refused inference, re-read the model's metadata next time (it may have changed)."""
        if error.code in _STALE:
            self._infos.pop(key, None)
            self._labels.pop(key, None)
            if self._default_model == key[0]:
                self._default_model = None

    # -- requests and responses

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

    @staticmethod
    def _probe(info: ModelInfo) -> np.ndarray:
        """One blank image of the model's input, used to learn its labels."""
        shape = tuple(d or 1 for d in info.input_shape)
        return np.zeros((1, *shape), dtype=info.input_dtype)

    @staticmethod
    def _probe_classes(info: ModelInfo) -> int:
        """How many classes to ask for in the label probe (every class)."""
        return info.num_classes or 1_000_000

    def _learn_labels(
        self, info: ModelInfo, version: str, results: list[tuple[Any, int]]
    ) -> tuple[str, ...]:
        """Labels by output index from the probe's classification (cached)."""
        [(response, rows)] = results
        by_index = {p.index: p.label for p in self._rows(info, [(response, rows)])[0]}
        labels = tuple(by_index.get(i, str(i)) for i in range(info.num_classes or len(by_index)))
        self._labels[(info.name, version)] = labels
        return labels

    # -- streams

    def _stream_request(
        self,
        info: ModelInfo,
        version: str,
        images: imaging.ImageSource,
        class_count: int,
        index: int,
    ) -> Any:
        """Request `index` of a stream: the whole batch in one message, its index as the id."""
        return protocol.infer_request(
            info, version, self._batch(images, info), class_count, str(index)
        )

    def _stream_result(self, info: ModelInfo, response: Any, class_count: int) -> StreamResult:
        """A ModelStreamInferResponse as a StreamResult (matched to its request by `id`)."""
        answer = response.infer_response
        try:
            index = int(answer.id)
        except ValueError:
            index = -1  # not one of ours (a server that does not echo ids)
        if response.error_message:
            message = response.error_message
            return StreamResult(index, error=InferenceError(message, _stream_code(message)))
        rows = answer.outputs[0].shape[0] if answer.outputs and answer.outputs[0].shape else 0
        results = [(answer, rows)]
        if class_count:
            return StreamResult(index, self._rows(info, results))
        return StreamResult(index, self._probabilities(info, results))


def _stream_code(message: str) -> grpc.StatusCode:
    """A stream's error carries only a message: UNAVAILABLE for the retryable refusals (busy,
    exiting, queue full, not ready, queue timeout), INVALID_ARGUMENT otherwise."""
    retryable = ("Server busy", "Server exiting", "Server not ready", "Exceeds maximum queue size")
    if message.startswith(retryable) or message.startswith("Request timeout expired"):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT
