"""A standalone activation layer. Fusion (`fusion.py`) merges it into a linear conv2d or dense
layer right before it; otherwise it runs as its own in-place step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from convserve.core.activations import CODES
from convserve.core.layers import base
from convserve.core.layers.base import Layer
from convserve.core.steps import Activate
from convserve.core.training.layers import activate, activation_grad


@dataclass(frozen=True, kw_only=True)
class Activation(Layer):
    type: ClassVar[str] = "activation"
    KEYS: ClassVar[frozenset[str]] = frozenset({"activation"})

    activation: str = "linear"

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        act = base.activation(raw, where, default=None)
        if act == "softmax" and len(in_shape) != 1:
            raise base.fail(
                where, f"softmax needs a flat input (features,), got shape {list(in_shape)}"
            )
        return cls(**common, output_shape=in_shape, activation=act)

    def describe(self) -> str:
        return self.activation

    def inference_steps(self, block, weights, first, variant=None):
        return [Activate(act=CODES[block.activation], width=self.output_shape[-1])]

    def forward(self, bound, x, rng):
        y = activate(x.copy(), bound.act)
        return y, y

    def backward(self, bound, dout, cache, need_dx):
        return activation_grad(dout, cache, bound.act)
