"""An independent, plain-NumPy forward pass used as the tests' reference (float64 inside).

Written from the architecture document's semantics (Keras, channels_last), not from the core's
kernels: explicit zero padding and `im2col` by slicing for convolution, explicit window loops
for pooling (padding cells ignored), flatten in H, W, C order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _out_size(size: int, window: int, stride: int, padding: str) -> int:
    return math.ceil(size / stride) if padding == "same" else (size - window) // stride + 1


def activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    assert name == "linear", name
    return x


def conv2d(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray | None,
    strides: tuple[int, int],
    padding: str,
) -> np.ndarray:
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    sh, sw = strides
    oh, ow = _out_size(h, kh, sh, padding), _out_size(w, kw, sw, padding)
    (pt, pb), (pl, pr) = (
        (_same_pads(h, kh, sh), _same_pads(w, kw, sw)) if padding == "same" else ((0, 0), (0, 0))
    )
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out = np.zeros((n, oh, ow, co))
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky : ky + sh * (oh - 1) + 1 : sh, kx : kx + sw * (ow - 1) + 1 : sw, :]
            out += np.tensordot(patch, kernel[ky, kx], axes=([3], [0]))
    if bias is not None:
        out += bias
    return out


def pool2d(
    x: np.ndarray, pool: tuple[int, int], strides: tuple[int, int], padding: str, kind: str
) -> np.ndarray:
    n, h, w, c = x.shape
    ph, pw = pool
    sh, sw = strides
    oh, ow = _out_size(h, ph, sh, padding), _out_size(w, pw, sw, padding)
    pt = _same_pads(h, ph, sh)[0] if padding == "same" else 0
    pl = _same_pads(w, pw, sw)[0] if padding == "same" else 0
    out = np.empty((n, oh, ow, c))
    for oy in range(oh):
        y0, y1 = max(oy * sh - pt, 0), min(oy * sh - pt + ph, h)
        for ox in range(ow):
            x0, x1 = max(ox * sw - pl, 0), min(ox * sw - pl + pw, w)
            window = x[:, y0:y1, x0:x1, :]
            out[:, oy, ox, :] = (
                window.max(axis=(1, 2)) if kind == "max" else window.mean(axis=(1, 2))
            )
    return out


def forward(
    doc: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray, *, preprocess: bool = False
) -> np.ndarray:
    """Run the architecture document `doc` with `weights` on an NHWC batch; float64 result."""
    x = np.asarray(x, np.float64)
    if preprocess:
        spec = doc["input"]
        c = x.shape[-1]
        mean = np.resize(np.asarray(spec.get("mean", [0.0]), np.float64), c)
        std = np.resize(np.asarray(spec.get("std", [1.0]), np.float64), c)
        x = (x * spec.get("scale", 1.0) - mean) / std
    for i, layer in enumerate(doc["layers"]):
        kind = layer["type"]
        kernel = weights.get(f"layers.{i}.kernel")
        bias = weights.get(f"layers.{i}.bias")
        kernel = None if kernel is None else kernel.astype(np.float64)
        bias = None if bias is None else bias.astype(np.float64)
        if kind == "conv2d":
            ks = layer["kernel_size"]
            strides = layer.get("strides", [1, 1])
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            assert kernel.shape[:2] == tuple(ks if isinstance(ks, list) else (ks, ks))
            x = activation(
                conv2d(x, kernel, bias, strides, layer.get("padding", "valid")),
                layer.get("activation", "linear"),
            )
        elif kind in ("max_pooling2d", "average_pooling2d"):
            pool = layer.get("pool_size", [2, 2])
            pool = (pool, pool) if isinstance(pool, int) else tuple(pool)
            strides = layer.get("strides", list(pool))
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            x = pool2d(
                x,
                pool,
                strides,
                layer.get("padding", "valid"),
                "max" if kind.startswith("max") else "avg",
            )
        elif kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif kind == "dense":
            x = x @ kernel
            if bias is not None:
                x = x + bias
            x = activation(x, layer.get("activation", "linear"))
        elif kind == "activation":
            x = activation(x, layer["activation"])
        else:
            assert kind == "dropout", kind
    return x
