"""Architecture JSON: parsing, validation and shape inference (no weights).

The JSON is the `architecture` metadata of a `convserve/1` model file; semantics follow Keras
with `channels_last`. `parse_architecture` turns it into an `Architecture` whose `layers` are
typed `Layer` objects (`convserve.core.layers`, one class per layer type, each validating its
own keys) with normalized hyperparameters and inferred shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from convserve.core.activations import ACTIVATIONS
from convserve.core.errors import ModelError
from convserve.core.layers import LAYER_TYPES, Layer, parse_layer
from convserve.core.layers.base import PADDINGS, fail, integer, number, same_padding, window_output

__all__ = [
    "ACTIVATIONS",
    "LAYER_TYPES",
    "PADDINGS",
    "Architecture",
    "parse_architecture",
    "same_padding",
    "window_output",
]


@dataclass(frozen=True)
class Architecture:
    """A validated architecture: input description, labels and layers with shapes."""

    name: str
    input_shape: tuple[int, int, int]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    layers: tuple[Layer, ...]
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


def parse_architecture(doc: Any) -> Architecture:
    """Validate an architecture document and infer every layer's output shape.

    Raises `ModelError` naming the key or layer that is wrong, what was expected and what came.
    """
    if not isinstance(doc, dict):
        raise ModelError(f"architecture: must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"name", "input", "labels", "layers", "format", "version"}
    if unknown:
        raise fail("top level", f"unknown key(s) {sorted(unknown)}")
    name = doc.get("name", "model")
    if not isinstance(name, str) or not name or "/" in name:
        raise fail("top level", f"'name' must be a non-empty string without '/', got {name!r}")

    spec = doc.get("input")
    if not isinstance(spec, dict):
        raise fail("input", f"must be an object with 'shape', got {spec!r}")
    shape = spec.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise fail("input", f"'shape' must be [height, width, channels], got {shape!r}")
    input_shape = tuple(integer(v, "input", "shape") for v in shape)
    channels = input_shape[2]
    scale = number(spec.get("scale", 1.0), "input", "scale")
    mean = spec.get("mean", [0.0] * channels)
    std = spec.get("std", [1.0] * channels)
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, (list, tuple)) or len(values) not in (1, channels):
            raise fail(
                "input", f"'{key}' must be a list of 1 or {channels} numbers, got {values!r}"
            )
    mean_t = tuple(number(v, "input", "mean") for v in mean)
    std_t = tuple(number(v, "input", "std") for v in std)
    if any(v == 0 for v in std_t):
        raise fail("input", f"'std' must be non-zero, got {list(std_t)}")
    if len(mean_t) == 1:
        mean_t *= channels
    if len(std_t) == 1:
        std_t *= channels

    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise fail("layers", f"must be a non-empty list, got {raw_layers!r}")
    layers: list[Layer] = []
    current: tuple[int, ...] = input_shape
    for index, raw in enumerate(raw_layers):
        layer = parse_layer(index, raw, current)
        layers.append(layer)
        current = layer.output_shape
    if len(current) != 1:
        raise fail(
            "layers",
            f"the last layer must give a flat output (classes,), got shape {list(current)}; end with flatten/dense",
        )

    labels = doc.get("labels")
    if labels is None:
        labels = [str(i) for i in range(current[0])]
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise fail("labels", f"must be a list of strings, got {labels!r}")
    if len(labels) != current[0]:
        raise fail(
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
