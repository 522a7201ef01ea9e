"""Max and average pooling over (H, W) windows, any stride, `valid` or `same` padding; padding
cells are ignored (Keras/TF semantics: average divides by the real cells only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from convserve.core.kernels import pool as kpool
from convserve.core.layers.base import (
    NO_PADS,
    PADDINGS,
    Layer,
    choice,
    image_input,
    pair,
    window_geometry,
)
from convserve.core.steps import Program, Step
from convserve.core.training import kernels as K


@dataclass(kw_only=True)
class PoolStep(Step):
    window: tuple[int, int]
    strides: tuple[int, int]
    pt: int
    pl: int
    average: bool

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        program.add(
            kpool.pool2d, x, out, *self.window, *self.strides, self.pt, self.pl, self.average
        )
        return out


@dataclass(frozen=True, kw_only=True)
class Pooling2D(Layer):
    """Common to both pooling types: window, strides, padding."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"pool_size", "strides", "padding"})
    AVERAGE: ClassVar[bool] = False

    pool_size: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: str = "valid"
    pads: tuple[int, int, int, int] = NO_PADS

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        image_input(in_shape, where)
        window = pair(raw.get("pool_size", 2), where, "pool_size")
        strides = pair(raw.get("strides", list(window)), where, "strides")
        padding = choice(raw.get("padding", "valid"), where, "padding", PADDINGS)
        out_h, out_w, pads = window_geometry(in_shape, window, strides, padding, where)
        return cls(
            **common,
            output_shape=(out_h, out_w, in_shape[2]),
            pool_size=window,
            strides=strides,
            padding=padding,
            pads=pads,
        )

    def describe(self) -> str:
        return f"{self.pool_size[0]}x{self.pool_size[1]}/{self.strides[0]} {self.padding}"

    @property
    def tiles_input(self) -> bool:
        """The windows tile the input: stride = window, no padding (`valid`, or `same` on sides
        the stride divides, which pads nothing)."""
        return self.strides == self.pool_size and not any(self.pads)

    def inference_steps(self, block, weights, first, variant=None):
        return [self.step()]

    def step(self) -> PoolStep:
        return PoolStep(
            shape=self.output_shape,
            window=self.pool_size,
            strides=self.strides,
            pt=self.pads[0],
            pl=self.pads[2],
            average=self.AVERAGE,
        )

    def _geometry(self) -> tuple[int, ...]:
        return (*self.pool_size, *self.strides, self.pads[0], self.pads[2])


@dataclass(frozen=True, kw_only=True)
class MaxPooling2D(Pooling2D):
    type: ClassVar[str] = "max_pooling2d"

    def forward(self, bound, x, rng):
        out = np.empty((x.shape[0], *self.output_shape), x.dtype)
        arg = np.empty(out.shape, np.int32)
        K.maxpool_forward(x, out, arg, *self._geometry())
        return out, (x.shape, arg, out)

    def backward(self, bound, dout, cache, need_dx):
        shape, arg, _ = cache
        dx = np.empty(shape, dout.dtype)
        K.maxpool_backward(np.ascontiguousarray(dout), arg, dx)
        return dx


@dataclass(frozen=True, kw_only=True)
class AveragePooling2D(Pooling2D):
    type: ClassVar[str] = "average_pooling2d"
    AVERAGE: ClassVar[bool] = True

    def forward(self, bound, x, rng):
        out = np.empty((x.shape[0], *self.output_shape), x.dtype)
        K.avgpool_forward(x, out, *self._geometry())
        return out, x.shape

    def backward(self, bound, dout, cache, need_dx):
        dx = np.empty(cache, dout.dtype)
        K.avgpool_backward(np.ascontiguousarray(dout), dx, *self._geometry())
        return dx
