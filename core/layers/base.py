"""The `Layer` base class and the config-parsing helpers every layer type uses.

A layer is a frozen dataclass: its validated hyperparameters plus the per-image input and output
shapes (batch dimension excluded). A layer type owns, in its own module: its config keys and
their validation (`from_config`), shape inference, the tensors it has in a model file
(`weight_shapes`), the inference steps it emits (`inference_steps`) and its training forward and
backward (`forward` / `backward`, on a `Bound` layer that holds the parameter views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from convserve.core.activations import ACTIVATIONS
from convserve.core.errors import ModelError

if TYPE_CHECKING:
    from convserve.core.layers.fusion import Block
    from convserve.core.steps import Step

NO_PADS = (0, 0, 0, 0)
Weights = dict[str, np.ndarray]


def fail(where: str, message: str) -> ModelError:
    return ModelError(f"architecture: {where}: {message}")


def integer(value: Any, where: str, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"'{key}' must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise fail(where, f"'{key}' must be >= {minimum}, got {value}")
    return value


def pair(value: Any, where: str, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise fail(where, f"'{key}' must be an integer or a list of 2 integers, got {value!r}")
    return integer(value[0], where, key), integer(value[1], where, key)


def choice(value: Any, where: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise fail(where, f"'{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(where, f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def activation(raw: dict[str, Any], where: str, default: str | None = "linear") -> str:
    if default is None and "activation" not in raw:
        raise fail(where, "'activation' is required")
    return choice(raw.get("activation", default), where, "activation", ACTIVATIONS)


def use_bias(raw: dict[str, Any], where: str) -> bool:
    value = raw.get("use_bias", True)
    if not isinstance(value, bool):
        raise fail(where, f"'use_bias' must be true or false, got {value!r}")
    return value


PADDINGS = ("valid", "same")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras `same`: total = max((ceil(in/stride) - 1) * stride + k - in, 0), half before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def window_output(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


def window_geometry(
    in_shape: tuple[int, ...],
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: str,
    where: str,
) -> tuple[int, int, tuple[int, int, int, int]]:
    """Output height and width and the pads (top, bottom, left, right) of a sliding window
    (conv kernel or pool) over an (H, W, C) input."""
    height, width, _ = in_shape
    out_h = window_output(height, window[0], strides[0], padding)
    out_w = window_output(width, window[1], strides[1], padding)
    if out_h < 1 or out_w < 1:
        raise fail(
            where,
            f"window {list(window)} with strides {list(strides)} and padding '{padding}' "
            f"shrinks the {height}x{width} input below 1x1",
        )
    if padding == "valid":
        return out_h, out_w, NO_PADS
    return (
        out_h,
        out_w,
        (*same_padding(height, window[0], strides[0]), *same_padding(width, window[1], strides[1])),
    )


def image_input(in_shape: tuple[int, ...], where: str) -> None:
    if len(in_shape) != 3:
        raise fail(where, f"needs an image input (H, W, C), got shape {list(in_shape)}")


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One layer of an architecture. Subclasses set `type` and `KEYS` and implement
    `from_config`; layers with weights or compute override the rest."""

    type: ClassVar[str]
    KEYS: ClassVar[frozenset[str]] = frozenset()  # config keys besides `type` and `name`
    # window geometry, overridden by the windowed layers (conv, pooling): for the others a
    # 1x1 window, stride 1, no pads, so code that walks every layer may read them
    pads: ClassVar[tuple[int, int, int, int]] = NO_PADS  # (top, bottom, left, right)
    strides: ClassVar[tuple[int, int]] = (1, 1)

    index: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    name: str = ""

    # -- config -------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, raw: dict[str, Any], in_shape: tuple[int, ...], where: str, **common: Any
    ) -> Layer:
        """Validate this type's keys of `raw` and build the layer (`common`: index, name,
        input_shape)."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """How messages and summaries name this layer, e.g. `layer 2 (conv2d)`."""
        return f"layer {self.index} ({self.name or self.type})"

    def describe(self) -> str:
        """The hyperparameters a summary shows after the type, e.g. `3x3/1 same relu`."""
        return ""

    # -- weights ------------------------------------------------------------------------------
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors this layer owns in a model file, by name."""
        return {}

    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())

    def tensor(self, weights: Weights, short: str) -> np.ndarray | None:
        """This layer's tensor `short` (`kernel`, `bias`) from a model's weights, if it has one."""
        return weights.get(f"layers.{self.index}.{short}")

    # -- inference ----------------------------------------------------------------------------
    def inference_variants(self, block: Block) -> tuple[str, ...]:
        """The names of the kernel variants that can compute `block`, today's heuristic choice
        first; empty when there is no choice. The planner times them (`core/planner.py`)."""
        return ()

    def inference_steps(
        self, block: Block, weights: Weights, first: bool, variant: str | None = None
    ) -> list[Step]:
        """The kernel steps that compute `block` (this layer, plus what fusion merged into it).
        `first`: the block reads the raw model input (its step may apply the preprocessing).
        `variant`: one of `inference_variants(block)` (None: the first)."""
        return []

    # -- training -----------------------------------------------------------------------------
    def train_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes in the training kernels' layout, by short name."""
        return {}

    def to_file_layout(self, short: str, value: np.ndarray) -> np.ndarray:
        """A training-layout parameter in the model file's layout (inverse: `from_file_layout`)."""
        return value

    def from_file_layout(self, short: str, value: np.ndarray) -> np.ndarray:
        return value

    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) of the kernel, for initialisation."""
        raise NotImplementedError

    def forward(
        self, bound: Any, x: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, Any]:
        """Train-mode forward: (output, cache for backward). Identity by default."""
        return x, None

    def backward(
        self, bound: Any, dout: np.ndarray, cache: Any, need_dx: bool
    ) -> np.ndarray | None:
        """dL/d(input) from dL/d(output); parameter gradients go into `bound.grads`."""
        return dout
