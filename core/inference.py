"""Forward execution of a validated architecture.

Interim NumPy implementation with the final interface; the Numba kernels replace its insides.
"""

from __future__ import annotations

import threading

import numpy as np

from convserve.core.architecture import Architecture, LayerSpec


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "tanh":
        return np.tanh(x)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x


def _windows(x: np.ndarray, layer: LayerSpec, window: tuple[int, int], fill: float) -> tuple[np.ndarray, np.ndarray]:
    top, bottom, left, right = layer.pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    mask = np.pad(np.ones(x.shape[1:3], np.float32), ((top, bottom), (left, right)))
    sh, sw = layer.strides
    out_h, out_w = layer.output_shape[:2]
    view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=(1, 2))
    mview = np.lib.stride_tricks.sliding_window_view(mask, window)
    return view[:, : out_h * sh : sh, : out_w * sw : sw], mview[: out_h * sh : sh, : out_w * sw : sw]


class InferencePlan:
    """Runs a model's layers on float32 NHWC batches. Safe to call from several threads."""

    def __init__(self, architecture: Architecture, weights: dict[str, np.ndarray]):
        self.architecture = architecture
        self.weights = weights
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        """`x`: float32 (N, H, W, C), preprocessed. Returns a new float32 (N, outputs) array."""
        with self._lock:
            for layer in self.architecture.layers:
                x = self._layer(layer, x)
            return np.ascontiguousarray(x, dtype=np.float32)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Compile and run every kernel once per batch size."""
        for n in batch_sizes:
            self.run(np.zeros((n, *self.architecture.input_shape), np.float32))

    def _layer(self, layer: LayerSpec, x: np.ndarray) -> np.ndarray:
        w = self.weights
        prefix = f"layers.{layer.index}"
        if layer.type == "conv2d":
            view, _ = _windows(x, layer, layer.kernel_size, 0.0)  # N, oh, ow, C, kh, kw
            out = np.einsum("nhwcij,ijcf->nhwf", view, w[f"{prefix}.kernel"], optimize=True)
            if layer.use_bias:
                out = out + w[f"{prefix}.bias"]
            return _activate(out.astype(np.float32), layer.activation)
        if layer.type == "max_pooling2d":
            view, _ = _windows(x, layer, layer.pool_size, -np.inf)
            return view.max(axis=(4, 5))
        if layer.type == "average_pooling2d":
            view, mask = _windows(x, layer, layer.pool_size, 0.0)
            return (view.sum(axis=(4, 5)) / mask.sum(axis=(2, 3))[None, :, :, None]).astype(np.float32)
        if layer.type == "flatten":
            return x.reshape(x.shape[0], -1)
        if layer.type == "dense":
            out = x @ w[f"{prefix}.kernel"]
            if layer.use_bias:
                out = out + w[f"{prefix}.bias"]
            return _activate(out, layer.activation)
        if layer.type == "activation":
            return _activate(x, layer.activation)
        return x  # dropout: identity at inference
