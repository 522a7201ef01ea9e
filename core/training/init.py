"""Weight initialisation: He (for ReLU layers) and Glorot (otherwise), as Keras and torch do."""

from __future__ import annotations

import numpy as np
from convserve.core.architecture import LayerSpec

INITS = ("auto", "he", "glorot")


def fans(spec: LayerSpec) -> tuple[int, int]:
    """(fan_in, fan_out) of a conv2d or dense layer."""
    if spec.type == "conv2d":
        field = spec.kernel_size[0] * spec.kernel_size[1]
        return field * spec.input_shape[2], field * spec.filters
    return spec.input_shape[0], spec.units


def init_kernel(
    spec: LayerSpec, shape: tuple[int, ...], rng: np.random.Generator, method: str = "auto"
) -> np.ndarray:
    """A float32 kernel of `shape`: He normal for ReLU layers (auto), else Glorot uniform."""
    if method not in INITS:
        raise ValueError(f"unknown initialisation {method!r}; choose one of {', '.join(INITS)}")
    fan_in, fan_out = fans(spec)
    if method == "he" or (method == "auto" and spec.activation == "relu"):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)
