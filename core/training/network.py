"""A trainable network: layers bound to one flat parameter buffer and one flat gradient buffer.

The flat buffers make the optimizer a single kernel call and checkpoints a few tensors.
`to_weights()` / `load_weights()` convert to and from the model file's Keras layouts.
"""

from __future__ import annotations

import numpy as np
from convserve.core.activations import CODES, LINEAR, SOFTMAX
from convserve.core.architecture import Architecture
from convserve.core.layers.fusion import blocks
from convserve.core.training import kernels as K
from convserve.core.training.init import init_kernel
from convserve.core.training.layers import Bound


class Network:
    """The layers of `architecture` with parameters in one flat `params` array of `dtype`.

    `layers` holds one `Bound` layer per architecture layer; forward and backward run the fusion
    blocks of `layers/fusion.py` (the same grouping inference uses)."""

    def __init__(self, architecture: Architecture, dtype: type = np.float32):
        self.architecture = architecture
        self.dtype = np.dtype(dtype)
        self.blocks = blocks(architecture.layers, inference=False)
        self.layers: list[Bound] = [Bound(spec) for spec in architecture.layers]
        last = self.blocks[-1]
        # softmax on the last block is fused into the loss: the forward yields logits
        self.fused_softmax = last.activation == "softmax"
        for block in self.blocks:
            if block.activation is not None:
                act = CODES[block.activation]
                fused = block is last and self.fused_softmax
                self.layers[block.layer.index].act = LINEAR if fused else act
        self._slots: list[tuple[Bound, str, slice, tuple[int, ...]]] = []
        offset = 0
        for layer in self.layers:
            for name, shape in layer.spec.train_param_shapes().items():
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
            value = layer.spec.to_file_layout(
                name, self.params[where].reshape(shape).astype(np.float32)
            )
            weights[f"layers.{layer.spec.index}.{name}"] = np.ascontiguousarray(value)
        return weights

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Inverse of `to_weights` (shapes as in the model file)."""
        for layer, name, where, _ in self._slots:
            value = layer.spec.from_file_layout(
                name, np.asarray(weights[f"layers.{layer.spec.index}.{name}"])
            )
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
        """Train-mode forward (dropout active when rng is given); returns (logits, caches), one
        cache per fusion block.

        With a fused final softmax the output is the logits, otherwise the last layer's output.
        A conv block with a max pool runs as one kernel when the training kernels have one for
        it, unless `fuse` is False; the caches then only suit `backward(..., fuse=True)`.
        """
        caches: list = []
        for block in self.blocks:
            conv = self.layers[block.layer.index]
            if (
                block.pool is not None
                and fuse
                and conv.spec.trains_fused_with(conv, block.pool, True)
            ):
                x, cache = conv.spec.forward_pooled(conv, x, block.pool)
            else:
                x, cache = conv.forward(x, rng)
                if block.pool is not None:
                    x, pool_cache = self.layers[block.pool.index].forward(x, rng)
                    cache = (cache, pool_cache)
            caches.append(cache)
        return x, caches

    def backward(self, dout: np.ndarray, caches: list, fuse: bool = True) -> None:
        """Fill `grads` from dL/d(output); the first layer's input gradient is not computed.

        A conv block with a max pool goes backward in one fused sparse pass when its activation
        allows it, unless `fuse` is False (the tests compare both ways).
        """
        for k in range(len(self.blocks) - 1, -1, -1):
            block, cache, need_dx = self.blocks[k], caches[k], k > 0
            layer = self.layers[block.layer.index]
            if block.pool is None:
                dout, _ = layer.backward(dout, cache, need_dx)
            elif fuse and layer.spec.trains_fused_with(layer, block.pool, False):
                dout = layer.spec.backward_pooled(layer, dout, cache, block.pool, need_dx)
            else:
                dout, _ = self.layers[block.pool.index].backward(dout, cache[1], True)
                dout, _ = layer.backward(dout, cache[0], need_dx)

    def loss_and_grad(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[float, int]:
        """Mean softmax cross-entropy over the batch (against targets smoothed by
        `label_smoothing`); fills `grads`. Returns (summed loss, correct)."""
        out, caches = self.forward(x, rng)
        dlogits = np.empty_like(out)
        total, correct = self.loss(out, labels, dlogits, label_smoothing)
        self.backward(dlogits, caches)
        return total, correct

    def loss(
        self, out: np.ndarray, labels: np.ndarray, dout: np.ndarray, label_smoothing: float = 0.0
    ) -> tuple[float, int]:
        """Cross-entropy of the network output; `dout` receives dL/d(out) for the batch mean."""
        # Without a fused softmax the output itself is taken as logits (argmax is unchanged).
        return K.softmax_cross_entropy(
            out, np.ascontiguousarray(labels, np.int64), dout, label_smoothing
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inference forward (no dropout)."""
        return self.forward(x)[0]

    def output(self, x: np.ndarray) -> np.ndarray:
        """What `Model.forward` returns: logits with the final softmax applied when fused."""
        out = self.logits(x)
        if self.fused_softmax:
            K.activation_forward(out, SOFTMAX)
        return out
