"""Dropout: inverted dropout in training, the identity at inference (it emits no step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from convserve.core.layers.base import Layer, fail, number


@dataclass(frozen=True, kw_only=True)
class Dropout(Layer):
    type: ClassVar[str] = "dropout"
    KEYS: ClassVar[frozenset[str]] = frozenset({"rate"})

    rate: float = 0.5

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        rate = number(raw.get("rate", 0.5), where, "rate")
        if not 0.0 <= rate < 1.0:
            raise fail(where, f"'rate' must be in [0, 1), got {rate}")
        return cls(**common, output_shape=in_shape, rate=rate)

    def describe(self) -> str:
        return f"{self.rate:g}"

    def forward(self, bound, x, rng):
        """Keeps each value with probability 1 - rate and scales it by 1/(1 - rate); the
        identity without `rng` (inference)."""
        if rng is None or self.rate == 0.0:
            return x, None
        keep = rng.random(x.shape, dtype=np.float32) >= np.float32(self.rate)
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.rate))
        return x * mask, mask

    def backward(self, bound, dout, cache, need_dx):
        return dout if cache is None else dout * cache
