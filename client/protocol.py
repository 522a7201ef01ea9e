"""Plain data the clients hand out, and conversions between it and the protocol's messages.

No I/O here: the sync and asyncio clients share these functions and differ only in how they
call the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from convserve.proto import grpc_service_pb2 as pb

from .errors import InferenceError

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass(frozen=True)
class Prediction:
    """One class of a classification: its label, its index in the model's output, its score."""

    label: str
    index: int
    score: float

    def __str__(self) -> str:
        return f"{self.label} ({self.score:.4f})"


@dataclass(frozen=True)
class StreamResult:
    """The answer to one request of a stream (`AsyncClient.predict_stream` / `classify_stream`).

    `index` is the request's position in the input sequence (answers arrive in completion
    order, not input order). `value` holds the probabilities, shape (N, classes), or the rows of
    `Prediction`s; `error` says why this request failed (the stream went on). `result()`
    returns `value` or raises `error`.
    """

    index: int
    value: Any = None
    error: InferenceError | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the server's metadata announces it (shape with -1 for batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A model's metadata (ModelMetadata) plus what its configuration (ModelConfig) adds."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0  # 0: unknown (ModelConfig not offered), no chunking

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def input_shape(self) -> tuple[int | None, int | None, int | None]:
        """(H, W, C) of one image; None where the model accepts any size."""
        dims = self.input.shape[1:] if len(self.input.shape) == 4 else self.input.shape
        if len(dims) != 3:
            raise InferenceError(
                f"model '{self.name}' input '{self.input.name}' has shape {list(self.input.shape)}; "
                "expected an image input [-1, H, W, C]"
            )
        return tuple(d if d > 0 else None for d in dims)  # type: ignore[return-value]

    @property
    def input_dtype(self) -> np.dtype:
        try:
            return np.dtype(NUMPY_DTYPES[self.input.datatype])
        except KeyError:
            raise InferenceError(
                f"model '{self.name}' input '{self.input.name}' has datatype "
                f"{self.input.datatype}; expected a numeric type such as UINT8 or FP32"
            ) from None

    @property
    def num_classes(self) -> int | None:
        dims = self.output.shape[1:] if len(self.output.shape) > 1 else self.output.shape
        return int(np.prod(dims)) if dims and all(d > 0 for d in dims) else None


@dataclass(frozen=True)
class ModelVersionState:
    """One row of the server's repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


def model_info(meta: Any, config: Any | None) -> ModelInfo:
    """ModelInfo from a ModelMetadataResponse and an optional ModelConfigResponse."""

    def spec(t: Any) -> TensorSpec:
        return TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))

    if not meta.inputs or not meta.outputs:
        raise InferenceError(
            f"model '{meta.name}' announces {len(meta.inputs)} inputs and {len(meta.outputs)} "
            "outputs; the client needs at least one of each"
        )
    return ModelInfo(
        name=meta.name,
        versions=tuple(meta.versions),
        platform=meta.platform,
        inputs=tuple(spec(t) for t in meta.inputs),
        outputs=tuple(spec(t) for t in meta.outputs),
        max_batch_size=int(config.config.max_batch_size) if config is not None else 0,
    )


def infer_request(
    info: ModelInfo, version: str, batch: np.ndarray, class_count: int = 0, request_id: str = ""
) -> Any:
    """A ModelInferRequest sending `batch` as raw bytes to the model's first input."""
    request = pb.ModelInferRequest(model_name=info.name, model_version=version, id=request_id)
    tensor = request.inputs.add()
    tensor.name = info.input.name
    tensor.datatype = info.input.datatype
    tensor.shape.extend(batch.shape)
    output = request.outputs.add()
    output.name = info.output.name
    if class_count:
        output.parameters["classification"].int64_param = class_count
    request.raw_input_contents.append(batch.tobytes())
    return request


def _output(response: Any, name: str) -> tuple[Any, bytes]:
    for i, tensor in enumerate(response.outputs):
        if tensor.name == name:
            if i >= len(response.raw_output_contents):
                raise InferenceError(
                    f"response of model '{response.model_name}' has no raw contents for output "
                    f"'{name}' (expected raw_output_contents[{i}])"
                )
            return tensor, response.raw_output_contents[i]
    names = [t.name for t in response.outputs]
    raise InferenceError(
        f"response of model '{response.model_name}' lacks output '{name}'; got {names}"
    )


def probabilities(response: Any, name: str, rows: int) -> np.ndarray:
    """The FP32 (or other numeric) output `name` as an (N, classes) array."""
    tensor, raw = _output(response, name)
    dtype = NUMPY_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InferenceError(
            f"output '{name}' has datatype {tensor.datatype}; expected a numeric type like FP32"
        )
    shape = tuple(int(d) for d in tensor.shape)
    values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if values.size != int(np.prod(shape)) or not shape or shape[0] != rows:
        raise InferenceError(
            f"output '{name}' has shape {list(shape)} and {values.size} values; expected "
            f"{rows} rows"
        )
    return values.reshape(rows, -1).astype(np.float32 if dtype != np.float64 else np.float64)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor contents: each element is a little-endian uint32 length and the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InferenceError("malformed BYTES output: truncated length prefix")
        n = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            raise InferenceError("malformed BYTES output: element runs past the end")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def parse_class(entry: bytes | str) -> Prediction:
    """One classification string, "score:index" or "score:index:label" (labels may hold ':')."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    parts = text.split(":", 2)
    try:
        score, index = float(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise InferenceError(
            f"malformed classification entry {text!r}; expected 'score:index:label'"
        ) from None
    return Prediction(label=parts[2] if len(parts) > 2 else str(index), index=index, score=score)


def classifications(response: Any, name: str, rows: int) -> list[list[Prediction]]:
    """The classification extension's BYTES output as rows of Predictions, best first."""
    tensor, raw = _output(response, name)
    if tensor.datatype != "BYTES":
        raise InferenceError(
            f"output '{name}' came as {tensor.datatype}; the classification extension returns "
            "BYTES (does the server support it?)"
        )
    entries = [parse_class(e) for e in _bytes_elements(raw)]
    if rows == 0 or len(entries) % rows:
        raise InferenceError(f"classification output has {len(entries)} entries for {rows} images")
    k = len(entries) // rows
    return [sorted(entries[r * k : (r + 1) * k], key=lambda p: -p.score) for r in range(rows)]


def chunks(n: int, size: int) -> list[slice]:
    """Slices covering range(n) with at most `size` items each (size <= 0: one slice)."""
    if size <= 0 or n <= size:
        return [slice(0, n)]
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def repository_index(response: Any) -> list[ModelVersionState]:
    return [ModelVersionState(m.name, m.version, m.state, m.reason) for m in response.models]
