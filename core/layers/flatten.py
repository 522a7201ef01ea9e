"""Flatten: (H, W, C) to (H*W*C,). NHWC is already in H, W, C order, so it is a view."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from convserve.core.layers.base import Layer
from convserve.core.steps import INPUT, Program, Step


@dataclass(kw_only=True)
class FlattenStep(Step):
    VIEW: ClassVar[bool] = True
    ROWS: ClassVar[bool] = True

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        if x is INPUT:  # the caller's array, passed flattened (`InferencePlan._flat_input`)
            return x
        return x.reshape(program.n, -1)  # a buffer: a conv or preprocess step came first


@dataclass(frozen=True, kw_only=True)
class Flatten(Layer):
    type: ClassVar[str] = "flatten"

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        return cls(**common, output_shape=(math.prod(in_shape),))

    def inference_steps(self, block, weights, first, variant=None):
        return [FlattenStep(shape=self.output_shape)]

    def forward(self, bound, x, rng):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, bound, dout, cache, need_dx):
        return np.ascontiguousarray(dout).reshape(cache)
