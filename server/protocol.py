"""Converters between Open Inference Protocol messages and NumPy (no gRPC context, no I/O).

`decode_request` checks a ModelInferRequest against the model's signature and returns the
images as a zero-copy NumPy view of the request bytes; `encode_response` builds the
ModelInferResponse (raw little-endian outputs, optional Triton classification strings).
Error messages keep Triton's prefixes and add what was expected and what came.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.server.errors import InvalidRequest, Unimplemented, shown

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
INPUT_DTYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
ADVERTISED_INPUT_DTYPE = "UINT8"  # what metadata and config announce; FP32 is accepted too
TYPED_FIELD = {"UINT8": "uint_contents", "FP32": "fp32_contents"}
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
IGNORED_PARAMETERS = ("binary_data_output", "binary_data", "headers")


@dataclass(frozen=True)
class Signature:
    """What one model version accepts and returns."""

    model: str
    height: int
    width: int
    channels: int
    classes: int
    labels: tuple[bytes, ...]
    max_request_images: int
    max_abs_pixel: float = float("inf")  # see convserve.core.limits.max_safe_pixel

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def image_elements(self) -> int:
        return self.height * self.width * self.channels

    @property
    def shape_text(self) -> str:
        return f"[-1,{self.height},{self.width},{self.channels}]"

    def describe_input(self) -> str:
        return f"'{INPUT_NAME}' (UINT8 or FP32, shape {self.shape_text})"


def signature_for(name: str, model, max_request_images: int) -> Signature:
    from convserve.core.limits import max_safe_pixel

    h, w, c = model.input_shape
    labels = tuple(str(label).encode() for label in model.labels)
    if len(labels) != model.num_classes:
        labels = ()
    bound = max_safe_pixel(model.architecture, model.weights)
    return Signature(name, h, w, c, model.num_classes, labels, max_request_images, bound)


class Decoded:
    """A checked request: images (N, H, W, C) and what to send back."""

    __slots__ = ("images", "outputs", "priority", "timeout_us")

    def __init__(
        self,
        images: np.ndarray,
        outputs: tuple[tuple[str, int], ...],
        priority: int,
        timeout_us: int | None,
    ):
        self.images = images
        self.outputs = outputs  # (name, classification k or 0)
        self.priority = priority  # 0 = default level
        self.timeout_us = timeout_us  # queue timeout (Triton `timeout`), None = none


_DEFAULT_OUTPUTS = ((OUTPUT_NAME, 0),)


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def decode_request(request: pb.ModelInferRequest, sig: Signature) -> Decoded:
    """Check the request against `sig` and view its pixels as NumPy; raises InvalidRequest."""
    model = sig.model
    inputs = request.inputs
    if len(inputs) != 1:
        got = [shown(i.name) for i in inputs[:4]]
        raise InvalidRequest(
            f"expected 1 inputs but got {len(inputs)} inputs for model '{model}'. Got input(s) {got}, "
            f"expected exactly {sig.describe_input()}"
        )
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidRequest(
            f"unexpected inference input '{shown(tensor.name)}' for model '{model}': "
            f"the model's only input is {sig.describe_input()}"
        )
    datatype = tensor.datatype
    dtype = INPUT_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(
            f"inference input '{INPUT_NAME}' data-type is '{shown(datatype)}', but model '{model}' "
            "expects 'UINT8' or 'FP32'"
        )
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != sig.image_shape or shape[0] < 1:
        hint = ""
        if len(shape) == 3:
            hint = (
                f" (the first dimension is the batch size: send [1,{sig.height},{sig.width},{sig.channels}] "
                "for one image)"
            )
        elif len(shape) == 4 and shape[0] < 1:
            hint = " (the batch size must be at least 1)"
        raise InvalidRequest(
            f"unexpected shape for input '{INPUT_NAME}' for model '{model}'. "
            f"Expected {sig.shape_text}, got {_shape_text(shape)}{hint}"
        )
    n = shape[0]
    if n > sig.max_request_images:
        raise InvalidRequest(
            f"inference request batch-size must be <= {sig.max_request_images} for '{model}', "
            f"got {n} images"
        )
    raw = request.raw_input_contents
    count = n * sig.image_elements
    if raw:
        if tensor.HasField("contents"):
            raise InvalidRequest(
                f"contents field must not be specified when using raw_input_contents for "
                f"'{INPUT_NAME}' for model '{model}'"
            )
        if len(raw) != 1:
            raise InvalidRequest(
                f"expected 1 raw_input_contents entry (one per input) for model '{model}', "
                f"got {len(raw)}"
            )
        data = raw[0]
        expected = count * dtype.itemsize
        if len(data) != expected:
            raise InvalidRequest(
                f"input byte size mismatch for input '{INPUT_NAME}' for model '{model}'. Expected {expected}, "
                f"got {len(data)} (shape {_shape_text(shape)} x {datatype} = {dtype.itemsize} byte(s) per value)"
            )
        images = np.frombuffer(data, dtype).reshape(n, sig.height, sig.width, sig.channels)
    elif tensor.HasField("contents"):
        images = _typed_contents(tensor.contents, datatype, dtype, count, model).reshape(
            n, sig.height, sig.width, sig.channels
        )
    else:
        raise InvalidRequest(
            f"unable to find data for input tensor '{INPUT_NAME}' for model '{model}' in "
            f"request: expected raw_input_contents[0] or contents.{TYPED_FIELD[datatype]}"
        )
    if datatype == "FP32" or sig.max_abs_pixel < 255:
        _check_magnitude(images, sig)
    outputs = _requested_outputs(request, sig) if request.outputs else _DEFAULT_OUTPUTS
    priority, timeout_us = _request_parameters(request, model) if request.parameters else (0, None)
    return Decoded(images, outputs, priority, timeout_us)


def _check_magnitude(images: np.ndarray, sig: Signature) -> None:
    """Refuse NaN, Inf and values that could overflow the model's float32 arithmetic."""
    bound = sig.max_abs_pixel
    low, high = float(images.min()), float(images.max())  # NaN propagates and fails both tests
    if -bound <= low and high <= bound:
        return
    if not np.isfinite(images).all():
        raise InvalidRequest(
            f"input '{INPUT_NAME}' for model '{sig.model}' contains NaN or Inf; FP32 pixel "
            "values must be finite"
        )
    raise InvalidRequest(
        f"input '{INPUT_NAME}' for model '{sig.model}' has pixel values up to "
        f"{max(high, -low):.4g} in magnitude; this model accepts at most {bound:.4g} (larger "
        "values could overflow its float32 arithmetic)"
    )


def _typed_contents(
    contents: pb.InferTensorContents, datatype: str, dtype: np.dtype, count: int, model: str
) -> np.ndarray:
    field = TYPED_FIELD[datatype]
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InvalidRequest(
            f"input '{INPUT_NAME}' for model '{model}' has datatype {datatype}, whose values go "
            f"in contents.{field}; got contents.{', contents.'.join(others)}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(
            f"unexpected number of values for input '{INPUT_NAME}' for model '{model}'. "
            f"Expected {count} in contents.{field}, got {len(values)}"
        )
    if datatype == "UINT8":
        wide = np.fromiter(values, np.uint32, count)
        if count and wide.max() > 255:
            raise InvalidRequest(
                f"input '{INPUT_NAME}' for model '{model}' has UINT8 values above 255 "
                f"(max {int(wide.max())}) in contents.uint_contents"
            )
        return wide.astype(np.uint8)
    return np.fromiter(values, np.float32, count)


def _int_parameter(p: pb.InferParameter, what: str, model: str) -> int:
    kind = p.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return p.int64_param
    if kind == "uint64_param":
        return p.uint64_param
    raise InvalidRequest(
        f"parameter '{what}' for model '{model}' must be an int64 or uint64 parameter, got "
        f"{kind or 'no value'}"
    )


def _non_negative_parameter(p: pb.InferParameter, key: str, model: str, unit: str) -> int:
    """An integer request parameter that must be >= 0; `unit` follows the bound in the message."""
    value = _int_parameter(p, key, model)
    if value < 0:
        raise InvalidRequest(
            f"parameter '{key}' for model '{model}' must be >= 0{unit}, got {value}"
        )
    return value


def _request_parameters(request: pb.ModelInferRequest, model: str) -> tuple[int, int | None]:
    priority, timeout_us = 0, None
    for key, p in request.parameters.items():
        if key == "priority":
            priority = _non_negative_parameter(p, key, model, " (1 is highest, 0 the default)")
        elif key == "timeout":
            timeout_us = _non_negative_parameter(p, key, model, " microseconds")
            if timeout_us == 0:
                timeout_us = None  # Triton: 0 = no timeout
        elif key in SEQUENCE_PARAMETERS:
            raise InvalidRequest(
                f"parameter '{key}': model '{model}' is not a sequence (stateful) model; "
                "sequence parameters are not supported"
            )
        elif key.startswith("shared_memory"):
            raise Unimplemented(
                f"parameter '{shown(key)}': shared memory is not supported by this server"
            )
        # other keys (binary_data_output, custom parameters) are accepted and ignored
    return priority, timeout_us


def _requested_outputs(
    request: pb.ModelInferRequest, sig: Signature
) -> tuple[tuple[str, int], ...]:
    if len(request.outputs) > 2:  # each copy would repeat the whole result in the response
        raise InvalidRequest(
            f"output '{OUTPUT_NAME}' of model '{sig.model}' is requested {len(request.outputs)} "
            "times; request it at most twice: once as scores, once with 'classification'"
        )
    wanted = []
    for out in request.outputs:
        if out.name != OUTPUT_NAME:
            raise InvalidRequest(
                f"unexpected inference output '{shown(out.name)}' for model '{sig.model}': the "
                f"model's only output is '{OUTPUT_NAME}' (FP32, shape [-1,{sig.classes}])"
            )
        k = 0
        for key, p in out.parameters.items():
            if key == "classification":
                k = _int_parameter(p, "classification", sig.model)
                if k < 1:
                    raise InvalidRequest(
                        f"parameter 'classification' of output '{OUTPUT_NAME}' for model "
                        f"'{sig.model}' must be >= 1 (the number of classes to return), got {k}"
                    )
                k = min(k, sig.classes)
            elif key.startswith("shared_memory"):
                raise Unimplemented(
                    f"output parameter '{shown(key)}': shared memory is not supported by this server"
                )
        wanted.append((OUTPUT_NAME, k))
    return tuple(wanted)


_U32 = struct.Struct("<I")


def classification_bytes(probs: np.ndarray, k: int, labels: tuple[bytes, ...]) -> bytes:
    """Triton's classification output: per row the top k as b"score:index[:label]", highest first,
    each element framed by its 4-byte little-endian length."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    parts = []
    for row, indices in zip(probs, top):
        for i in indices.tolist():
            text = b"%f:%d:%s" % (row[i], i, labels[i]) if labels else b"%f:%d" % (row[i], i)
            parts.append(_U32.pack(len(text)))
            parts.append(text)
    return b"".join(parts)


def encode_response(
    request: pb.ModelInferRequest,
    version: str,
    decoded: Decoded,
    result: np.ndarray,
    sig: Signature,
    queue_us: int,
    compute_us: int,
    batch_size: int,
) -> pb.ModelInferResponse:
    """Build the response: outputs and raw_output_contents index-aligned, plus timing parameters."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    n = result.shape[0]
    for name, k in decoded.outputs:
        if k:
            response.outputs.add(name=name, datatype="BYTES", shape=(n, k))
            response.raw_output_contents.append(classification_bytes(result, k, sig.labels))
        else:
            response.outputs.add(name=name, datatype="FP32", shape=result.shape)
            response.raw_output_contents.append(result.astype("<f4", copy=False).tobytes())
    params = response.parameters
    params["queue_us"].int64_param = queue_us
    params["compute_us"].int64_param = compute_us
    params["batch_size"].int64_param = batch_size
    return response
