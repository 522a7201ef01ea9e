"""Architecture JSON: parsing, validation and shape inference (no weights, no numba).

The JSON is the `architecture` metadata of a `convserve/1` model file; semantics follow Keras
with `channels_last` (see docs/architecture.md). `parse_architecture` turns it into an
`Architecture` whose `layers` carry normalized hyperparameters and inferred shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from convserve.core.errors import ModelError

LAYER_TYPES = (
    "conv2d",
    "max_pooling2d",
    "average_pooling2d",
    "flatten",
    "dense",
    "activation",
    "dropout",
)
ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "softmax")
PADDINGS = ("valid", "same")

_ALLOWED_KEYS = {
    "conv2d": {
        "type",
        "name",
        "filters",
        "kernel_size",
        "strides",
        "padding",
        "activation",
        "use_bias",
    },
    "max_pooling2d": {"type", "name", "pool_size", "strides", "padding"},
    "average_pooling2d": {"type", "name", "pool_size", "strides", "padding"},
    "flatten": {"type", "name"},
    "dense": {"type", "name", "units", "activation", "use_bias"},
    "activation": {"type", "name", "activation"},
    "dropout": {"type", "name", "rate"},
}


@dataclass(frozen=True)
class LayerSpec:
    """One layer: normalized hyperparameters plus inferred per-image shapes.

    Shapes exclude the batch dimension: `(H, W, C)` for images, `(features,)` after flatten.
    `pads` is `(top, bottom, left, right)` for conv and pooling layers, zeros otherwise.
    """

    index: int
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    activation: str = "linear"
    filters: int = 0
    units: int = 0
    kernel_size: tuple[int, int] = (0, 0)
    pool_size: tuple[int, int] = (0, 0)
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    use_bias: bool = True
    rate: float = 0.0
    name: str = ""

    @property
    def label(self) -> str:
        """How messages and summaries name this layer, e.g. `layer 2 (conv2d)`."""
        return f"layer {self.index} ({self.name or self.type})"

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors this layer owns in a model file, by name."""
        prefix = f"layers.{self.index}"
        if self.type == "conv2d":
            shapes = {f"{prefix}.kernel": (*self.kernel_size, self.input_shape[2], self.filters)}
            if self.use_bias:
                shapes[f"{prefix}.bias"] = (self.filters,)
            return shapes
        if self.type == "dense":
            shapes = {f"{prefix}.kernel": (self.input_shape[0], self.units)}
            if self.use_bias:
                shapes[f"{prefix}.bias"] = (self.units,)
            return shapes
        return {}

    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())


@dataclass(frozen=True)
class Architecture:
    """A validated architecture: input description, labels and layers with shapes."""

    name: str
    input_shape: tuple[int, int, int]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    source: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].output_shape if self.layers else self.input_shape

    @property
    def num_outputs(self) -> int:
        return math.prod(self.output_shape)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            shapes.update(layer.weight_shapes())
        return shapes

    def param_count(self) -> int:
        return sum(layer.param_count() for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document as given (normalized keys are not written back)."""
        return self.source


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras `same`: total = max((ceil(in/stride) - 1) * stride + k - in, 0), half before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def window_output(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


def _fail(where: str, message: str) -> ModelError:
    return ModelError(f"architecture: {where}: {message}")


def _int(value: Any, where: str, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"'{key}' must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise _fail(where, f"'{key}' must be >= {minimum}, got {value}")
    return value


def _pair(value: Any, where: str, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(where, f"'{key}' must be an integer or a list of 2 integers, got {value!r}")
    return _int(value[0], where, key), _int(value[1], where, key)


def _choice(value: Any, where: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(where, f"'{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _parse_layer(index: int, raw: Any, in_shape: tuple[int, ...]) -> LayerSpec:
    where = f"layer {index}"
    if not isinstance(raw, dict):
        raise _fail(where, f"must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in LAYER_TYPES:
        raise _fail(where, f"unknown layer type {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
    where = f"layer {index} ({kind})"
    unknown = set(raw) - _ALLOWED_KEYS[kind]
    if unknown:
        raise _fail(
            where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS[kind])}"
        )
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise _fail(where, f"'name' must be a string, got {name!r}")
    common: dict[str, Any] = {"index": index, "type": kind, "input_shape": in_shape, "name": name}

    if kind in ("conv2d", "max_pooling2d", "average_pooling2d"):
        if len(in_shape) != 3:
            raise _fail(where, f"needs an image input (H, W, C), got shape {list(in_shape)}")
        if kind == "conv2d":
            if "filters" not in raw or "kernel_size" not in raw:
                raise _fail(where, "'filters' and 'kernel_size' are required")
            window = _pair(raw["kernel_size"], where, "kernel_size")
            strides = _pair(raw.get("strides", 1), where, "strides")
        else:
            window = _pair(raw.get("pool_size", 2), where, "pool_size")
            strides = _pair(raw.get("strides", list(window)), where, "strides")
        padding = _choice(raw.get("padding", "valid"), where, "padding", PADDINGS)
        height, width, channels = in_shape
        out_h = window_output(height, window[0], strides[0], padding)
        out_w = window_output(width, window[1], strides[1], padding)
        if out_h < 1 or out_w < 1:
            raise _fail(
                where,
                f"window {list(window)} with strides {list(strides)} and padding '{padding}' "
                f"shrinks the {height}x{width} input below 1x1",
            )
        if padding == "same":
            pads = (
                *same_padding(height, window[0], strides[0]),
                *same_padding(width, window[1], strides[1]),
            )
        else:
            pads = (0, 0, 0, 0)
        if kind == "conv2d":
            filters = _int(raw["filters"], where, "filters")
            activation = _choice(raw.get("activation", "linear"), where, "activation", ACTIVATIONS)
            use_bias = raw.get("use_bias", True)
            if not isinstance(use_bias, bool):
                raise _fail(where, f"'use_bias' must be true or false, got {use_bias!r}")
            return LayerSpec(
                **common,
                output_shape=(out_h, out_w, filters),
                filters=filters,
                kernel_size=window,
                strides=strides,
                padding=padding,
                pads=pads,
                activation=activation,
                use_bias=use_bias,
            )
        return LayerSpec(
            **common,
            output_shape=(out_h, out_w, channels),
            pool_size=window,
            strides=strides,
            padding=padding,
            pads=pads,
        )

    if kind == "flatten":
        return LayerSpec(**common, output_shape=(math.prod(in_shape),))
    if kind == "dense":
        if len(in_shape) != 1:
            raise _fail(
                where,
                f"needs a flat input (features,), got shape {list(in_shape)}; add a 'flatten' layer first",
            )
        if "units" not in raw:
            raise _fail(where, "'units' is required")
        units = _int(raw["units"], where, "units")
        activation = _choice(raw.get("activation", "linear"), where, "activation", ACTIVATIONS)
        use_bias = raw.get("use_bias", True)
        if not isinstance(use_bias, bool):
            raise _fail(where, f"'use_bias' must be true or false, got {use_bias!r}")
        return LayerSpec(
            **common, output_shape=(units,), units=units, activation=activation, use_bias=use_bias
        )
    if kind == "activation":
        if "activation" not in raw:
            raise _fail(where, "'activation' is required")
        activation = _choice(raw["activation"], where, "activation", ACTIVATIONS)
        if activation == "softmax" and len(in_shape) != 1:
            raise _fail(
                where, f"softmax needs a flat input (features,), got shape {list(in_shape)}"
            )
        return LayerSpec(**common, output_shape=in_shape, activation=activation)
    # dropout
    rate = _number(raw.get("rate", 0.5), where, "rate")
    if not 0.0 <= rate < 1.0:
        raise _fail(where, f"'rate' must be in [0, 1), got {rate}")
    return LayerSpec(**common, output_shape=in_shape, rate=rate)


def parse_architecture(doc: Any) -> Architecture:
    """Validate an architecture document and infer every layer's output shape.

    Raises `ModelError` naming the key or layer that is wrong, what was expected and what came.
    """
    if not isinstance(doc, dict):
        raise ModelError(f"architecture: must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"name", "input", "labels", "layers", "format", "version"}
    if unknown:
        raise _fail("top level", f"unknown key(s) {sorted(unknown)}")
    name = doc.get("name", "model")
    if not isinstance(name, str) or not name or "/" in name:
        raise _fail("top level", f"'name' must be a non-empty string without '/', got {name!r}")

    spec = doc.get("input")
    if not isinstance(spec, dict):
        raise _fail("input", f"must be an object with 'shape', got {spec!r}")
    shape = spec.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise _fail("input", f"'shape' must be [height, width, channels], got {shape!r}")
    input_shape = tuple(_int(v, "input", "shape") for v in shape)
    channels = input_shape[2]
    scale = _number(spec.get("scale", 1.0), "input", "scale")
    mean = spec.get("mean", [0.0] * channels)
    std = spec.get("std", [1.0] * channels)
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, (list, tuple)) or len(values) not in (1, channels):
            raise _fail(
                "input", f"'{key}' must be a list of 1 or {channels} numbers, got {values!r}"
            )
    mean_t = tuple(_number(v, "input", "mean") for v in mean)
    std_t = tuple(_number(v, "input", "std") for v in std)
    if any(v == 0 for v in std_t):
        raise _fail("input", f"'std' must be non-zero, got {list(std_t)}")
    if len(mean_t) == 1:
        mean_t *= channels
    if len(std_t) == 1:
        std_t *= channels

    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise _fail("layers", f"must be a non-empty list, got {raw_layers!r}")
    layers: list[LayerSpec] = []
    current: tuple[int, ...] = input_shape
    for index, raw in enumerate(raw_layers):
        layer = _parse_layer(index, raw, current)
        layers.append(layer)
        current = layer.output_shape
    if len(current) != 1:
        raise _fail(
            "layers",
            f"the last layer must give a flat output (classes,), got shape {list(current)}; end with flatten/dense",
        )

    labels = doc.get("labels")
    if labels is None:
        labels = [str(i) for i in range(current[0])]
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise _fail("labels", f"must be a list of strings, got {labels!r}")
    if len(labels) != current[0]:
        raise _fail(
            "labels", f"has {len(labels)} entries but the model outputs {current[0]} classes"
        )

    return Architecture(
        name=name,
        input_shape=input_shape,
        scale=scale,
        mean=mean_t,
        std=std_t,
        labels=tuple(labels),
        layers=tuple(layers),
        source=doc,
    )
