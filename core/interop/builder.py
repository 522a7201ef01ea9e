"""`ModelBuilder`: what importers emit, layer by layer, as a `convserve/1` document plus tensors.

The builder owns the semantics both importers share: deciding whether a source padding is our
`valid` or `same` (or `same` with a zero-extended kernel, which is exact for convolutions),
fusing activations, folding batch normalization and other per-channel affine steps into the
preceding conv/dense (or into the input preprocessing when no layer came before), and the
dense-row permutation after a C,H,W flatten. Every refusal names the source node or layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from convserve.core.interop import UnsupportedModel

ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "softmax")


# -- padding arithmetic -------------------------------------------------------------------------
def tf_window(size: int, window: int, stride: int, padding: str) -> tuple[int, int]:
    """(begin pad, output size) of TF/Keras `valid` or `same` on one axis."""
    if padding == "valid":
        return 0, (size - window) // stride + 1 if size >= window else 0
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, out


def onnx_window(
    size: int, window: int, stride: int, begin: int, end: int, ceil_mode: bool = False
) -> int:
    """Output size of an ONNX Conv/pool on one axis with explicit pads."""
    span = size + begin + end - window
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + begin:  # a window starting in the end padding is dropped
        out -= 1
    return out


def auto_pads(size: int, window: int, stride: int, mode: str) -> tuple[int, int]:
    """ONNX `auto_pad` SAME_UPPER / SAME_LOWER / VALID as explicit (begin, end) pads."""
    if mode == "VALID":
        return 0, 0
    total = max((-(-size // stride) - 1) * stride + window - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


@dataclass(frozen=True)
class Window:
    """A resolved window layer: our padding string and the (possibly grown) window size."""

    padding: str
    size: tuple[int, int]
    out: tuple[int, int]


def resolve_window(
    shape: tuple[int, int],
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    ceil_mode: bool = False,
    grow: bool = False,
) -> Window | None:
    """Our padding that gives the same windows as explicit `pads` (top, bottom, left, right).

    Equal begin pad and equal output size mean equal windows (an end pad that adds no output is
    never read). With `grow` (convolutions), a window may be extended at its end with zero
    weights: `same` with a larger kernel reproduces any begin pad TF would not choose, e.g.
    PyTorch's `Conv2d(3, stride=2, padding=1)` on an even input is `same` with a 4x4 kernel.
    """
    for padding in ("valid", "same"):
        sizes, outs = [], []
        for axis in range(2):
            n, k, s = shape[axis], window[axis], strides[axis]
            begin, end = pads[2 * axis], pads[2 * axis + 1]
            out = onnx_window(n, k, s, begin, end, ceil_mode)
            candidates = [k]
            if grow and padding == "same":
                base = 2 * begin + n - (out - 1) * s
                candidates += [c for c in (base, base + 1) if c > k]
            found = next(
                (c for c in candidates if out >= 1 and tf_window(n, c, s, padding) == (begin, out)),
                None,
            )
            if found is None:
                break
            sizes.append(found)
            outs.append(out)
        else:
            return Window(padding, (sizes[0], sizes[1]), (outs[0], outs[1]))
    return None


def touches_padding(
    shape: tuple[int, int],
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    out: tuple[int, int],
) -> bool:
    """Whether any window covers an explicit pad cell (what count_include_pad would count)."""
    for axis in range(2):
        begin, end = pads[2 * axis], pads[2 * axis + 1]
        last_end = (out[axis] - 1) * strides[axis] - begin + window[axis] - 1
        if begin > 0 or (end > 0 and last_end >= shape[axis]):
            return True
    return False


# -- input preprocessing ------------------------------------------------------------------------
@dataclass
class Preprocessing:
    """`(p * scale - mean[c]) / std[c]`, built up from the source's input steps in order.

    Each step keeps that form exactly (so `Mul(s)`, `Sub(m)`, `Div(d)` give back s, m, d)."""

    channels: int
    scale: float = 1.0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    std: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.channels)
        self.std = np.ones(self.channels)

    @property
    def plain(self) -> bool:
        return not self.mean.any() and bool((self.std == 1).all())

    def multiply(self, c: np.ndarray) -> None:
        if c.size == 1 and self.plain:
            self.scale *= float(c.reshape(-1)[0])
        else:
            self.std = self.std / c
        self._check()

    def divide(self, c: np.ndarray) -> None:
        if c.size == 1 and self.plain:
            self.scale /= float(c.reshape(-1)[0])
        else:
            self.std = self.std * c
        self._check()

    def add(self, c: np.ndarray) -> None:
        self.mean = self.mean - c * self.std

    def _check(self) -> None:
        if self.scale == 0 or not math.isfinite(self.scale) or not np.isfinite(self.std).all():
            raise ValueError("multiplies the input by zero or infinity")

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": self.mean.tolist(), "std": self.std.tolist()}


# -- the builder ---------------------------------------------------------------------------------
class ModelBuilder:
    """Collects layers with their tensors and tracks the per-image shape (H, W, C) or (F,)."""

    def __init__(self, input_shape: tuple[int, int, int]):
        if len(input_shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in input_shape):
            raise UnsupportedModel(
                f"input: needs a static image shape (H, W, C), got {list(input_shape)}"
            )
        self.input_shape = tuple(input_shape)
        self.shape: tuple[int, ...] = self.input_shape
        self.layers: list[dict[str, Any]] = []
        self.kernels: list[np.ndarray | None] = []
        self.biases: list[np.ndarray | None] = []
        self.pre = Preprocessing(input_shape[2])
        self.notes: list[str] = []
        # True while the current tensor is the last conv/dense's output before its activation
        self.fresh = False
        # (C, H, W) while a flatten in C,H,W order waits for the dense whose rows it permutes
        self.chw_pending: tuple[int, int, int] | None = None

    # -- layers ----------------------------------------------------------------------------------
    def conv(
        self,
        where: str,
        kernel: np.ndarray,
        bias: np.ndarray | None,
        strides: tuple[int, int],
        padding: str | tuple[int, int, int, int],
    ) -> None:
        """A convolution; `kernel` is HWIO; `padding` is ours or explicit (top, bottom, left, right)."""
        self._need_image(where)
        kh, kw, cin, filters = kernel.shape
        if cin != self.shape[2]:
            raise UnsupportedModel(
                f"{where}: kernel expects {cin} input channels, the input has {self.shape[2]}"
            )
        window = self._window(where, (kh, kw), strides, padding, grow=True)
        if window.size != (kh, kw):
            kernel = np.pad(
                kernel, ((0, window.size[0] - kh), (0, window.size[1] - kw), (0, 0), (0, 0))
            )
            self.notes.append(
                f"{where}: pads {list(padding)} imported exactly as a {window.size[0]}x{window.size[1]} "
                f"kernel (zero-extended at the end) with 'same' padding"
            )
        self._append(
            {
                "type": "conv2d",
                "filters": int(filters),
                "kernel_size": list(window.size),
                "strides": list(strides),
                "padding": window.padding,
                "activation": "linear",
                "use_bias": bias is not None,
            },
            kernel,
            bias,
            (*window.out, int(filters)),
        )
        self.fresh = True

    def pool(
        self,
        where: str,
        kind: str,
        size: tuple[int, int],
        strides: tuple[int, int],
        padding: str | tuple[int, int, int, int],
        ceil_mode: bool = False,
        count_include_pad: bool = False,
    ) -> None:
        """max_pooling2d / average_pooling2d; explicit pads must match our windows exactly."""
        self._need_image(where)
        window = self._window(where, size, strides, padding, ceil_mode=ceil_mode)
        if (
            kind == "average_pooling2d"
            and count_include_pad
            and not isinstance(padding, str)
            and touches_padding(self.shape[:2], size, strides, padding, window.out)
        ):
            raise UnsupportedModel(
                f"{where}: count_include_pad=1 with pads {list(padding)} counts padding in the "
                "average; convserve averages over real cells only"
            )
        layer = {"type": kind, "pool_size": list(size), "strides": list(strides)}
        self._append({**layer, "padding": window.padding}, None, None, (*window.out, self.shape[2]))

    def flatten(self, where: str, channels_first: bool = False) -> None:
        """Flatten an image; `channels_first` when the source flattens in C,H,W order."""
        self._need_image(where)
        h, w, c = self.shape
        self._append({"type": "flatten"}, None, None, (h * w * c,))
        if channels_first and h * w > 1 and c > 1:
            self.chw_pending = (c, h, w)

    def dense(self, where: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        """A dense layer; `kernel` is (in, out) in the source's feature order."""
        if len(self.shape) != 1:
            raise UnsupportedModel(
                f"{where}: needs a flat input, got shape {list(self.shape)} (flatten first)"
            )
        if kernel.shape[0] != self.shape[0]:
            raise UnsupportedModel(
                f"{where}: weight has {kernel.shape[0]} input features, the input has {self.shape[0]}"
            )
        if self.chw_pending:
            c, h, w = self.chw_pending
            kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
            self.chw_pending = None
        units = int(kernel.shape[1])
        layer = {"type": "dense", "units": units, "activation": "linear"}
        self._append({**layer, "use_bias": bias is not None}, kernel, bias, (units,))
        self.fresh = True

    def activation(self, where: str, name: str) -> None:
        """An activation: fused into the conv/dense right before it when possible."""
        if name not in ACTIVATIONS:
            raise UnsupportedModel(
                f"{where}: activation '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if name == "linear":
            return
        if name == "softmax" and len(self.shape) != 1:
            raise UnsupportedModel(
                f"{where}: softmax on a {'x'.join(map(str, self.shape))} tensor; "
                "convserve applies softmax to a flat (features) vector only"
            )
        if self.fresh and self.layers[-1]["activation"] == "linear":
            self.layers[-1]["activation"] = name
        else:
            self._append({"type": "activation", "activation": name}, None, None, self.shape)
        self.fresh = False

    def affine(self, where: str, scale: np.ndarray, shift: np.ndarray) -> None:
        """`y = x * scale[c] + shift[c]` per channel (batch norm, Mul/Add by constants).

        Folded into the conv/dense right before it, or into the preprocessing at the input."""
        channels = self.shape[-1]
        scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
        shift = np.broadcast_to(np.asarray(shift, np.float64), (channels,))
        if not self.layers:
            self.input_step(where, "multiply", scale)
            self.input_step(where, "add", shift)
            return
        if not self.fresh:
            raise UnsupportedModel(
                f"{where}: a per-channel scale/shift must directly follow a conv or dense layer "
                "(or come first, at the input) to be folded"
            )
        kernel = self.kernels[-1].astype(np.float64) * scale
        bias = self.biases[-1]
        bias = (np.zeros(channels) if bias is None else bias.astype(np.float64)) * scale + shift
        if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
            raise UnsupportedModel(f"{where}: folding gives non-finite weights")
        self.kernels[-1] = kernel.astype(np.float32)
        self.biases[-1] = bias.astype(np.float32)
        self.layers[-1]["use_bias"] = True

    def batch_norm(
        self,
        where: str,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        mean: np.ndarray,
        var: np.ndarray,
        eps: float,
    ) -> None:
        """Inference-mode batch normalization, folded (see `affine`)."""
        inv = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
        scale = inv if gamma is None else inv * np.asarray(gamma, np.float64)
        shift = -np.asarray(mean, np.float64) * scale
        if beta is not None:
            shift = shift + np.asarray(beta, np.float64)
        if not self.layers:  # at the input: subtract, divide, scale, shift, as the source does
            self.input_step(where, "add", -np.asarray(mean, np.float64))
            self.input_step(where, "divide", np.sqrt(np.asarray(var, np.float64) + eps))
            if gamma is not None:
                self.input_step(where, "multiply", np.asarray(gamma, np.float64))
            if beta is not None:
                self.input_step(where, "add", np.asarray(beta, np.float64))
            return
        self.affine(where, scale, shift)

    def input_step(self, where: str, op: str, value: np.ndarray) -> None:
        """One preprocessing step at the input: `multiply`, `divide` or `add` per channel."""
        if self.layers:
            raise UnsupportedModel(
                f"{where}: input scaling is only supported before the first layer"
            )
        value = np.asarray(value, np.float64).reshape(-1)
        if value.size not in (1, self.pre.channels):
            raise UnsupportedModel(
                f"{where}: the input step must be one number or one per channel "
                f"({self.pre.channels}), got {value.size} values"
            )
        if op in ("multiply", "divide") and not value.all():
            raise UnsupportedModel(f"{where}: {op} by zero")
        try:
            getattr(self.pre, op)(value)
        except ValueError as exc:
            raise UnsupportedModel(f"{where}: {exc}") from None

    # -- result ----------------------------------------------------------------------------------
    def document(
        self, name: str, labels: list[str] | None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The `convserve/1` architecture document and tensors."""
        if not self.layers:
            raise UnsupportedModel("model: has no layers")
        if len(self.shape) != 1:
            raise UnsupportedModel(
                f"model: the output has shape {list(self.shape)}; convserve models end with a "
                "flat (classes) vector"
            )
        if self.chw_pending:
            raise UnsupportedModel(
                "model: the output is a C,H,W-ordered flatten with no dense layer after it; "
                "convserve flattens in H,W,C order"
            )
        doc: dict[str, Any] = {
            "name": name,
            "input": {"shape": list(self.input_shape), **self.pre.to_dict()},
        }
        if labels is not None:
            doc["labels"] = list(labels)
        doc["layers"] = self.layers
        tensors: dict[str, np.ndarray] = {}
        for index, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            if kernel is not None:
                tensors[f"layers.{index}.kernel"] = np.ascontiguousarray(kernel, np.float32)
            if bias is not None:
                tensors[f"layers.{index}.bias"] = np.ascontiguousarray(bias, np.float32)
        return doc, tensors

    # -- helpers ---------------------------------------------------------------------------------
    def _append(
        self,
        layer: dict[str, Any],
        kernel: np.ndarray | None,
        bias: np.ndarray | None,
        shape: tuple[int, ...],
    ) -> None:
        for value, what in ((kernel, "weights"), (bias, "bias")):
            if value is not None and not np.isfinite(value).all():
                raise UnsupportedModel(f"layer {len(self.layers)}: {what} contain NaN or Inf")
        self.layers.append(layer)
        self.kernels.append(None if kernel is None else np.asarray(kernel, np.float32))
        self.biases.append(None if bias is None else np.asarray(bias, np.float32))
        self.shape = shape
        self.fresh = False

    def _need_image(self, where: str) -> None:
        if len(self.shape) != 3:
            raise UnsupportedModel(
                f"{where}: needs an image (H, W, C) input, got shape {list(self.shape)}"
            )

    def _window(
        self,
        where: str,
        window: tuple[int, int],
        strides: tuple[int, int],
        padding: str | tuple[int, int, int, int],
        ceil_mode: bool = False,
        grow: bool = False,
    ) -> Window:
        h, w = self.shape[0], self.shape[1]
        if isinstance(padding, str):
            out = (tf_window(h, window[0], strides[0], padding)[1],
                   tf_window(w, window[1], strides[1], padding)[1])  # fmt: skip
            if min(out) < 1:
                raise UnsupportedModel(
                    f"{where}: window {list(window)} does not fit the {h}x{w} input"
                )
            return Window(padding, window, out)
        resolved = resolve_window((h, w), window, strides, padding, ceil_mode, grow)
        if resolved is None:
            top, bottom, left, right = padding
            same = [tf_window(n, k, s, "same")[0] for n, k, s in zip((h, w), window, strides)]
            raise UnsupportedModel(
                f"{where}: pads [top {top}, bottom {bottom}, left {left}, right {right}]"
                f"{' with ceil_mode=1' if ceil_mode else ''}, window {list(window)}, strides "
                f"{list(strides)} on a {h}x{w} input give windows neither 'valid' nor 'same' "
                f"reproduces ('same' pads top {same[0]}, left {same[1]})"
            )
        return resolved
