"""Fusion rules, in one place for inference and training: which consecutive layers form one
block that a single kernel may compute.

- A conv2d or dense layer with a linear activation absorbs a standalone `activation` layer
  right after it (the block applies that activation).
- A conv2d block whose activation is monotonic (not softmax) absorbs a max pool right after it:
  max pooling commutes with the per-channel bias and with a monotonic activation.
- At inference, a conv2d block (not softmax) also absorbs an average pool right after it: the
  kernel averages the activated conv outputs of each window, as the layers would.

A block is a grouping, not a promise: each backend runs it with one kernel when it has one for
that shape (inference: any pool after a direct conv, a 2x2/2 one after the other conv
kernels; training: linear or ReLU, windows tiling the output for the forward) and layer by layer
otherwise. At inference dropout is the identity and is dropped before grouping, so it never
splits a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from convserve.core.activations import CODES, MONOTONIC
from convserve.core.layers.activation import Activation
from convserve.core.layers.base import Layer
from convserve.core.layers.conv2d import Conv2D
from convserve.core.layers.dense import Dense
from convserve.core.layers.dropout import Dropout
from convserve.core.layers.pooling import AveragePooling2D, MaxPooling2D, Pooling2D


@dataclass(frozen=True)
class Block:
    """`layer` plus what fusion merged into it: the activation it applies (its own or a merged
    activation layer's) and a merged pool (max, or average at inference only)."""

    layer: Layer
    activation: str | None = None  # None: the layer has no activation of its own
    pool: Pooling2D | None = None
    merged: tuple[Layer, ...] = ()

    @property
    def layers(self) -> tuple[Layer, ...]:
        return (self.layer, *self.merged)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].output_shape


def blocks(layers: Sequence[Layer], inference: bool) -> list[Block]:
    """Group `layers` into blocks by the rules above (`inference`: drop dropout first)."""
    if inference:
        layers = [layer for layer in layers if not isinstance(layer, Dropout)]
    out: list[Block] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        i += 1
        act = getattr(layer, "activation", None)
        merged: list[Layer] = []
        if isinstance(layer, (Conv2D, Dense)):
            nxt = layers[i] if i < len(layers) else None
            if act == "linear" and isinstance(nxt, Activation):
                act = nxt.activation
                merged.append(nxt)
                i += 1
        pool = None
        if isinstance(layer, Conv2D) and CODES[act] in MONOTONIC:
            nxt = layers[i] if i < len(layers) else None
            if isinstance(nxt, MaxPooling2D) or (inference and isinstance(nxt, AveragePooling2D)):
                pool = nxt
                merged.append(nxt)
                i += 1
        out.append(Block(layer, act, pool, tuple(merged)))
    return out
