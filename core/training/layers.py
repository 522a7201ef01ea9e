"""A layer bound for training, and the activation helpers the layers' backward passes share.

The arithmetic of each layer type lives with the type (`convserve.core.layers.*`: `forward`,
`backward`), its kernels in `kernels.py`. A `Bound` layer holds what training adds: views into
the network's flat parameter and gradient buffers (in the kernels' layouts: conv
`(CO, KH*KW*CI)`, dense `(units, in_features)`) and the activation it applies after fusion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from convserve.core.activations import LINEAR, RELU
from convserve.core.training import kernels as K

Grads = dict[str, np.ndarray]


class Bound:
    """`spec` (a `convserve.core.layers.Layer`) with its parameter and gradient views."""

    SMALL_K = 32  # conv reductions (KH*KW*CI) up to this length use the outer-product kernels

    def __init__(self, spec: Any, act: int = LINEAR):
        self.spec = spec
        self.act = act  # the activation this layer applies (LINEAR when the loss takes softmax)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(
        self, x: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, Any]:
        return self.spec.forward(self, x, rng)

    def backward(
        self, dout: np.ndarray, cache: Any, need_dx: bool = True
    ) -> tuple[np.ndarray | None, Grads]:
        return self.spec.backward(self, dout, cache, need_dx), self.grads

    def bias(self, dtype: np.dtype, size: int) -> np.ndarray:
        """The bias, or zeros for a layer without one."""
        return self.params["bias"] if "bias" in self.params else np.zeros(size, dtype)


def activate(z: np.ndarray, code: int, relu_done: bool = False) -> np.ndarray:
    """Apply the activation in place; `relu_done` when a conv/dense kernel already applied ReLU."""
    if code != LINEAR and not (relu_done and code == RELU):
        K.activation_forward(z.reshape(z.shape[0], -1), code)
    return z


def activation_grad(dout: np.ndarray, y: np.ndarray, code: int) -> np.ndarray:
    """dL/dz from dL/dy and the activation's output y."""
    if code == LINEAR:
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
