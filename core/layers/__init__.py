"""Layer types, one module each: `Layer` subclasses that own their config schema and
validation, shape inference, weight shapes, inference steps and training forward/backward.

`LAYER_CLASSES` maps each architecture `type` string to its class; `parse_layer` builds a
validated layer from its JSON object. Fusion rules (which layers one kernel may compute
together) are in `fusion.py`.
"""

from __future__ import annotations

from typing import Any

from convserve.core.layers.activation import Activation
from convserve.core.layers.base import Layer, fail
from convserve.core.layers.conv2d import Conv2D
from convserve.core.layers.dense import Dense
from convserve.core.layers.dropout import Dropout
from convserve.core.layers.flatten import Flatten
from convserve.core.layers.pooling import AveragePooling2D, MaxPooling2D

LAYER_CLASSES: dict[str, type[Layer]] = {
    cls.type: cls
    for cls in (Conv2D, MaxPooling2D, AveragePooling2D, Flatten, Dense, Activation, Dropout)
}
LAYER_TYPES = tuple(LAYER_CLASSES)

__all__ = [
    "LAYER_CLASSES",
    "LAYER_TYPES",
    "Activation",
    "AveragePooling2D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "Layer",
    "MaxPooling2D",
    "parse_layer",
]


def parse_layer(index: int, raw: Any, in_shape: tuple[int, ...]) -> Layer:
    """Validate one layer's JSON object given its input shape; raises `ModelError`."""
    where = f"layer {index}"
    if not isinstance(raw, dict):
        raise fail(where, f"must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    cls = LAYER_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise fail(where, f"unknown layer type {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
    where = f"layer {index} ({kind})"
    allowed = cls.KEYS | {"type", "name"}
    unknown = set(raw) - allowed
    if unknown:
        raise fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise fail(where, f"'name' must be a string, got {name!r}")
    return cls.from_config(raw, in_shape, where, index=index, name=name, input_shape=in_shape)
