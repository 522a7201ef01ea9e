"""A trainable network: layers bound to one flat parameter buffer and one flat gradient buffer.

The flat buffers make the optimizer a single kernel call and checkpoints a few tensors.
`to_weights()` / `load_weights()` convert to and from the model file's Keras layouts.
"""

from __future__ import annotations

import numpy as np
from convserve.core.architecture import Architecture
from convserve.core.training import kernels as K
from convserve.core.training.init import init_kernel
from convserve.core.training.layers import Conv2D, Layer, _WithActivation, build_layer


class Network:
    """The layers of `architecture` with parameters in one flat `params` array of `dtype`."""

    def __init__(self, architecture: Architecture, dtype: type = np.float32):
        self.architecture = architecture
        self.dtype = np.dtype(dtype)
        self.layers: list[Layer] = [build_layer(spec) for spec in architecture.layers]
        last = self.layers[-1]
        # softmax on the last layer is fused into the loss: the forward yields logits
        self.fused_softmax = isinstance(last, _WithActivation) and last.act == K.SOFTMAX
        if self.fused_softmax:
            last.fused_softmax = True
        self._slots: list[tuple[Layer, str, slice, tuple[int, ...]]] = []
        offset = 0
        for layer in self.layers:
            for name, shape in layer.param_shapes().items():
                size = int(np.prod(shape))
                self._slots.append((layer, name, slice(offset, offset + size), shape))
                offset += size
        self.params = np.zeros(offset, self.dtype)
        self.grads = np.zeros(offset, self.dtype)
        for layer, name, where, shape in self._slots:
            layer.params[name] = self.params[where].reshape(shape)
            layer.grads[name] = self.grads[where].reshape(shape)
        arch = architecture
        self._scale = (np.float32(arch.scale) / np.asarray(arch.std, np.float32)).astype(np.float32)
        self._shift = (
            -np.asarray(arch.mean, np.float32) / np.asarray(arch.std, np.float32)
        ).astype(np.float32)

    @property
    def size(self) -> int:
        return self.params.size

    # -- parameters -------------------------------------------------------------------------
    def initialize(self, rng: np.random.Generator, method: str = "auto") -> None:
        """He/Glorot kernels, zero biases."""
        for layer, name, where, shape in self._slots:
            if name == "kernel":
                self.params[where] = init_kernel(layer.spec, shape, rng, method).reshape(-1)
            else:
                self.params[where] = 0

    def to_weights(self) -> dict[str, np.ndarray]:
        """Model-file tensors (`layers.{i}.kernel` in Keras layout, float32)."""
        weights: dict[str, np.ndarray] = {}
        for layer, name, where, shape in self._slots:
            value = self.params[where].reshape(shape).astype(np.float32)
            if name == "kernel":
                if layer.spec.type == "conv2d":
                    kh, kw = layer.spec.kernel_size
                    value = value.T.reshape(kh, kw, layer.spec.input_shape[2], layer.spec.filters)
                else:
                    value = value.T
            weights[f"layers.{layer.spec.index}.{name}"] = np.ascontiguousarray(value)
        return weights

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Inverse of `to_weights` (shapes as in the model file)."""
        for layer, name, where, shape in self._slots:
            value = np.asarray(weights[f"layers.{layer.spec.index}.{name}"])
            if name == "kernel":
                value = value.reshape(-1, shape[0]).T
            self.params[where] = value.reshape(-1).astype(self.dtype)

    # -- compute ----------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw pixels (N, H, W, C) -> model input, exactly as `Model.predict` does it."""
        x = np.empty(images.shape, np.float32)
        np.multiply(images, self._scale, out=x, casting="unsafe")
        x += self._shift
        return x if self.dtype == np.float32 else x.astype(self.dtype)

    def forward(
        self, x: np.ndarray, rng: np.random.Generator | None = None, fuse: bool = True
    ) -> tuple[np.ndarray, list]:
        """Train-mode forward (dropout active when rng is given); returns (logits, caches).

        With a fused final softmax the output is the logits, otherwise the last layer's output.
        A conv2d (ReLU or linear) followed by a tiling max pool runs as one kernel unless `fuse`
        is False; the caches then only suit `backward(..., fuse=True)`.
        """
        caches: list = []
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if (
                fuse
                and isinstance(layer, Conv2D)
                and nxt is not None
                and layer.can_fuse_pool_forward(nxt)
            ):
                x, conv_cache, pool_cache = layer.forward_pooled(x, nxt)
                caches += [conv_cache, pool_cache]
                i += 2
            else:
                x, cache = layer.forward(x, rng)
                caches.append(cache)
                i += 1
        return x, caches

    def backward(self, dout: np.ndarray, caches: list, fuse: bool = True) -> None:
        """Fill `grads` from dL/d(output); the first layer's input gradient is not computed.

        A conv2d (ReLU or linear) followed by max pooling goes backward in one fused sparse pass
        unless `fuse` is False (the tests compare both ways).
        """
        i = len(self.layers) - 1
        while i >= 0:
            layer = self.layers[i]
            prev = self.layers[i - 1] if i > 0 else None
            if fuse and isinstance(prev, Conv2D) and prev.can_fuse_pool(layer):
                dout, _ = prev.backward_pooled(dout, caches[i - 1], layer, caches[i], need_dx=i > 1)
                i -= 2
            else:
                dout, _ = layer.backward(dout, caches[i], need_dx=i > 0)
                i -= 1

    def loss_and_grad(
        self, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[float, int]:
        """Mean softmax cross-entropy over the batch; fills `grads`. Returns (summed loss, correct)."""
        out, caches = self.forward(x, rng)
        dlogits = np.empty_like(out)
        total, correct = self.loss(out, labels, dlogits)
        self.backward(dlogits, caches)
        return total, correct

    def loss(self, out: np.ndarray, labels: np.ndarray, dout: np.ndarray) -> tuple[float, int]:
        """Cross-entropy of the network output; `dout` receives dL/d(out) for the batch mean."""
        # Without a fused softmax the output itself is taken as logits (argmax is unchanged).
        return K.softmax_cross_entropy(out, np.ascontiguousarray(labels, np.int64), dout)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inference forward (no dropout)."""
        return self.forward(x)[0]

    def output(self, x: np.ndarray) -> np.ndarray:
        """What `Model.forward` returns: logits with the final softmax applied when fused."""
        out = self.logits(x)
        if self.fused_softmax:
            K.activation_forward(out, K.SOFTMAX)
        return out
