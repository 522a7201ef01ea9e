"""Train-mode layers: `forward(x, rng) -> (out, cache)` and `backward(dout, cache) -> (dx, grads)`.

Each layer owns its configuration (a `LayerSpec`) and views into the network's flat parameter
and gradient buffers (bound by `Network`); the arithmetic lives in `kernels.py`. Parameters are
kept in the kernels' layouts: conv `(CO, KH*KW*CI)`, dense `(units, in_features)`; `Network`
converts to the model file's Keras layouts on export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from convserve.core.architecture import LayerSpec
from convserve.core.training import kernels as K

ACTIVATION_CODES = {
    "linear": K.LINEAR,
    "relu": K.RELU,
    "tanh": K.TANH,
    "sigmoid": K.SIGMOID,
    "softmax": K.SOFTMAX,
}

Cache = Any
Grads = dict[str, np.ndarray]


class Layer:
    """Base: no parameters, identity."""

    def __init__(self, spec: LayerSpec):
        self.spec = spec
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes in training layout, by short name (`kernel`, `bias`)."""
        return {}

    def forward(
        self, x: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, Cache]:
        return x, None

    def backward(
        self, dout: np.ndarray, cache: Cache, need_dx: bool = True
    ) -> tuple[np.ndarray | None, Grads]:
        return dout, {}


def _activate(z: np.ndarray, code: int, relu_done: bool = False) -> np.ndarray:
    """Apply the activation in place; `relu_done` when a conv/dense kernel already applied ReLU."""
    if code != K.LINEAR and not (relu_done and code == K.RELU):
        K.activation_forward(z.reshape(z.shape[0], -1), code)
    return z


def _activation_grad(dout: np.ndarray, y: np.ndarray, code: int) -> np.ndarray:
    if code == K.LINEAR:
        return dout
    dz = np.empty_like(y)
    rows = y.shape[0]
    K.activation_backward(
        np.ascontiguousarray(dout).reshape(rows, -1),
        y.reshape(rows, -1),
        code,
        dz.reshape(rows, -1),
    )
    return dz


class _WithActivation(Layer):
    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.act = ACTIVATION_CODES[spec.activation]
        # Set by Network on the last layer when its softmax is fused into the loss.
        self.fused_softmax = False

    @property
    def effective_act(self) -> int:
        return K.LINEAR if self.fused_softmax else self.act

    def _bias(self, dtype: np.dtype, size: int) -> np.ndarray:
        return self.params["bias"] if self.spec.use_bias else np.zeros(size, dtype)


class Conv2D(_WithActivation):
    # Reductions up to this length (KH*KW*CI) use the outer-product kernels.
    SMALL_K = 32

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        kh, kw = self.spec.kernel_size
        shapes = {"kernel": (self.spec.filters, kh * kw * self.spec.input_shape[2])}
        if self.spec.use_bias:
            shapes["bias"] = (self.spec.filters,)
        return shapes

    def _geometry(self) -> tuple[int, ...]:
        s = self.spec
        return (*s.kernel_size, *s.strides, s.pads[0], s.pads[2])

    def forward(self, x, rng=None):
        s = self.spec
        out = np.empty((x.shape[0], *s.output_shape), x.dtype)
        wd = self.params["kernel"]
        bias = self._bias(x.dtype, s.filters)
        relu = self.effective_act == K.RELU
        if wd.shape[1] <= self.SMALL_K:
            K.conv2d_forward_small(
                x, np.ascontiguousarray(wd.T), bias, out, *self._geometry(), relu
            )
        else:
            K.conv2d_forward(x, wd, bias, out, *self._geometry(), relu)
        return _activate(out, self.effective_act, relu_done=True), (x, out)

    def backward(self, dout, cache, need_dx=True):
        x, y = cache
        dz = _activation_grad(dout, y, self.effective_act)
        wd = self.params["kernel"]
        db_part = np.empty((K.NCHUNKS, wd.shape[0]), wd.dtype)
        dx = np.empty_like(x) if need_dx else np.empty((1, 1, 1, 1), x.dtype)
        dz = np.ascontiguousarray(dz)
        if wd.shape[1] <= self.SMALL_K:
            dwt_part = np.empty((K.NCHUNKS, wd.shape[1], wd.shape[0]), wd.dtype)
            K.conv2d_backward_small(
                x, np.ascontiguousarray(wd.T), dz, dx, dwt_part, db_part, *self._geometry(), need_dx
            )
            self.grads["kernel"][:] = dwt_part.sum(axis=0).T  # fixed order: numpy's pairwise sum
        else:
            dw_part = np.empty((K.NCHUNKS, *wd.shape), wd.dtype)
            K.conv2d_backward(x, wd, dz, dx, dw_part, db_part, *self._geometry(), need_dx)
            K.sum_partials(dw_part.reshape(K.NCHUNKS, -1), self.grads["kernel"].reshape(-1))
        if self.spec.use_bias:
            K.sum_partials(db_part, self.grads["bias"])
        return (dx if need_dx else None), self.grads

    def can_fuse_pool(self, pool: Layer) -> bool:
        """Whether `backward_pooled` may stand in for this layer's and the next max pool's backward."""
        return isinstance(pool, MaxPool2D) and self.effective_act in (K.LINEAR, K.RELU)

    def can_fuse_pool_forward(self, pool: Layer) -> bool:
        """Whether `forward_pooled` may run this conv and the next max pool (windows tiling the output)."""
        ps = pool.spec
        return self.can_fuse_pool(pool) and ps.padding == "valid" and ps.strides == ps.pool_size

    def _first_layer_special(self, pool: Layer) -> bool:
        """1 input channel, 3x3 stride-1 conv, 2x2/2 valid max pool: the scalar-patch kernels apply."""
        s, ps = self.spec, pool.spec
        return (
            s.input_shape[2] == 1
            and s.kernel_size == (3, 3)
            and s.strides == (1, 1)
            and ps.pool_size == (2, 2)
            and ps.strides == (2, 2)
            and ps.padding == "valid"
        )

    def forward_pooled(self, x, pool: MaxPool2D):
        """Forward of this conv (+ReLU) and the max pool after it; returns (pooled, conv cache, pool cache)."""
        s, ps = self.spec, pool.spec
        pooled = np.empty((x.shape[0], *ps.output_shape), x.dtype)
        arg = np.empty(pooled.shape, np.int32)
        wd = self.params["kernel"]
        small = wd.shape[1] <= self.SMALL_K
        wt = np.ascontiguousarray(wd.T) if small else wd
        if small and self._first_layer_special(pool):
            K.conv3x3c1_pool2_forward(
                x,
                wt,
                self._bias(x.dtype, s.filters),
                pooled,
                arg,
                s.output_shape[1],
                s.pads[0],
                s.pads[2],
                self.effective_act == K.RELU,
            )
            return pooled, (x, None), (x.shape[:1] + s.output_shape, arg, pooled)
        K.conv2d_pool_forward(
            x,
            wd,
            wt,
            self._bias(x.dtype, s.filters),
            pooled,
            arg,
            *s.output_shape[:2],
            *self._geometry(),
            *ps.pool_size,
            self.effective_act == K.RELU,
            small,
        )
        return pooled, (x, None), (x.shape[:1] + s.output_shape, arg, pooled)

    def backward_pooled(self, dpool, cache, pool: MaxPool2D, pool_cache, need_dx=True):
        """Backward through this conv (+ReLU) and the max pool after it, in one sparse pass."""
        x, _ = cache
        _, arg, pooled = pool_cache
        oh, ow = self.spec.output_shape[:2]
        ps = pool.spec
        wd = self.params["kernel"]
        db_part = np.empty((K.NCHUNKS, wd.shape[0]), wd.dtype)
        dx = np.empty_like(x) if need_dx else np.empty((1, 1, 1, 1), x.dtype)
        dpool = np.ascontiguousarray(dpool)
        geometry = (
            *self._geometry(),
            *ps.pool_size,
            *ps.strides,
            ps.pads[0],
            ps.pads[2],
            self.effective_act == K.RELU,
            need_dx,
        )
        if wd.shape[1] <= self.SMALL_K and not need_dx and self._first_layer_special(pool):
            dwt_part = np.empty((K.NCHUNKS, wd.shape[1], wd.shape[0]), wd.dtype)
            K.conv3x3c1_pool2_backward(
                x,
                pooled,
                dpool,
                arg,
                dwt_part,
                db_part,
                ow,
                self.spec.pads[0],
                self.spec.pads[2],
                self.effective_act == K.RELU,
            )
            self.grads["kernel"][:] = dwt_part.sum(axis=0).T
        elif wd.shape[1] <= self.SMALL_K:
            dwt_part = np.empty((K.NCHUNKS, wd.shape[1], wd.shape[0]), wd.dtype)
            K.conv2d_pool_backward_small(
                x,
                np.ascontiguousarray(wd.T),
                pooled,
                oh,
                ow,
                dpool,
                arg,
                dx,
                dwt_part,
                db_part,
                *geometry,
            )
            self.grads["kernel"][:] = dwt_part.sum(axis=0).T
        else:
            dw_part = np.empty((K.NCHUNKS, *wd.shape), wd.dtype)
            K.conv2d_pool_backward(
                x, wd, pooled, oh, ow, dpool, arg, dx, dw_part, db_part, *geometry
            )
            K.sum_partials(dw_part.reshape(K.NCHUNKS, -1), self.grads["kernel"].reshape(-1))
        if self.spec.use_bias:
            K.sum_partials(db_part, self.grads["bias"])
        return (dx if need_dx else None), self.grads


class Dense(_WithActivation):
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"kernel": (self.spec.units, self.spec.input_shape[0])}
        if self.spec.use_bias:
            shapes["bias"] = (self.spec.units,)
        return shapes

    def forward(self, x, rng=None):
        out = np.empty((x.shape[0], self.spec.units), x.dtype)
        K.dense_forward(
            x,
            self.params["kernel"],
            self._bias(x.dtype, self.spec.units),
            out,
            self.effective_act == K.RELU,
        )
        return _activate(out, self.effective_act, relu_done=True), (x, out)

    def backward(self, dout, cache, need_dx=True):
        x, y = cache
        act = self.effective_act
        relu = act == K.RELU
        dz = np.ascontiguousarray(dout if relu else _activation_grad(dout, y, act))
        w = self.params["kernel"]
        db = self.grads["bias"] if self.spec.use_bias else np.empty(self.spec.units, w.dtype)
        dx = np.empty_like(x) if need_dx else np.empty((1, x.shape[1]), x.dtype)
        K.dense_backward(x, w, y, dz, self.grads["kernel"], db, dx, relu, need_dx)
        return (dx if need_dx else None), self.grads


class Activation(_WithActivation):
    def forward(self, x, rng=None):
        y = _activate(x.copy(), self.effective_act)
        return y, y

    def backward(self, dout, cache, need_dx=True):
        return _activation_grad(dout, cache, self.effective_act), {}


class MaxPool2D(Layer):
    def forward(self, x, rng=None):
        s = self.spec
        out = np.empty((x.shape[0], *s.output_shape), x.dtype)
        arg = np.empty(out.shape, np.int32)
        K.maxpool_forward(x, out, arg, *s.pool_size, *s.strides, s.pads[0], s.pads[2])
        return out, (x.shape, arg, out)

    def backward(self, dout, cache, need_dx=True):
        shape, arg, _ = cache
        dx = np.empty(shape, dout.dtype)
        K.maxpool_backward(np.ascontiguousarray(dout), arg, dx)
        return dx, {}


class AvgPool2D(Layer):
    def forward(self, x, rng=None):
        s = self.spec
        out = np.empty((x.shape[0], *s.output_shape), x.dtype)
        K.avgpool_forward(x, out, *s.pool_size, *s.strides, s.pads[0], s.pads[2])
        return out, x.shape

    def backward(self, dout, cache, need_dx=True):
        s = self.spec
        dx = np.empty(cache, dout.dtype)
        K.avgpool_backward(
            np.ascontiguousarray(dout), dx, *s.pool_size, *s.strides, s.pads[0], s.pads[2]
        )
        return dx, {}


class Flatten(Layer):
    def forward(self, x, rng=None):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, dout, cache, need_dx=True):
        return np.ascontiguousarray(dout).reshape(cache), {}


class Dropout(Layer):
    """Inverted dropout: keeps each value with probability 1 - rate and scales it by 1/(1 - rate)."""

    def forward(self, x, rng=None):
        rate = self.spec.rate
        if rng is None or rate == 0.0:
            return x, None
        keep = rng.random(x.shape, dtype=np.float32) >= np.float32(rate)
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - rate))
        return x * mask, mask

    def backward(self, dout, cache, need_dx=True):
        return (dout if cache is None else dout * cache), {}


LAYER_CLASSES: dict[str, type[Layer]] = {
    "conv2d": Conv2D,
    "dense": Dense,
    "activation": Activation,
    "max_pooling2d": MaxPool2D,
    "average_pooling2d": AvgPool2D,
    "flatten": Flatten,
    "dropout": Dropout,
}


def build_layer(spec: LayerSpec) -> Layer:
    return LAYER_CLASSES[spec.type](spec)
