"""Weight initialisation: He (for ReLU layers) and Glorot (otherwise), as Keras and torch do."""

from __future__ import annotations

import numpy as np
from convserve.core.layers import Layer

INITS = ("auto", "he", "glorot")


def init_kernel(
    spec: Layer, shape: tuple[int, ...], rng: np.random.Generator, method: str = "auto"
) -> np.ndarray:
    """A float32 kernel of `shape`: He normal for ReLU layers (auto), else Glorot uniform."""
    if method not in INITS:
        raise ValueError(f"unknown initialisation {method!r}; choose one of {', '.join(INITS)}")
    fan_in, fan_out = spec.fans()
    if method == "he" or (method == "auto" and spec.activation == "relu"):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)
