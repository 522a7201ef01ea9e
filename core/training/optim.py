"""Optimizers over one flat parameter buffer: each update is a single kernel call."""

from __future__ import annotations

import numpy as np
from convserve.core.training import kernels as K

OPTIMIZERS = ("adam", "sgd")


class Optimizer:
    name = ""

    def __init__(self, size: int, dtype: np.dtype):
        self.t = 0  # updates applied so far

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Tensors to checkpoint (the step count goes in metadata)."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, np.ndarray], t: int) -> None:
        for name, value in self.state().items():
            if name not in tensors or tensors[name].shape != value.shape:
                raise ValueError(f"optimizer state '{name}' missing or of the wrong shape")
            value[:] = tensors[name]
        self.t = t


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight decay is decoupled (AdamW)."""

    name = "adam"

    def __init__(
        self,
        size: int,
        dtype: np.dtype = np.float32,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ):
        super().__init__(size, dtype)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = np.zeros(size, dtype)
        self.v = np.zeros(size, dtype)

    def step(self, params, grads, lr):
        self.t += 1
        K.adam_step(
            params,
            grads,
            self.m,
            self.v,
            lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.t,
        )

    def state(self):
        return {"adam.m": self.m, "adam.v": self.v}


class SGD(Optimizer):
    """SGD with momentum (optionally Nesterov) and L2 weight decay."""

    name = "sgd"

    def __init__(
        self,
        size: int,
        dtype: np.dtype = np.float32,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(size, dtype)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.velocity = np.zeros(size, dtype)

    def step(self, params, grads, lr):
        self.t += 1
        K.sgd_step(
            params, grads, self.velocity, lr, self.momentum, self.nesterov, self.weight_decay
        )

    def state(self):
        return {"sgd.velocity": self.velocity}


def make_optimizer(
    name: str,
    size: int,
    dtype: np.dtype = np.float32,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Optimizer:
    if name == "adam":
        return Adam(size, dtype, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(size, dtype, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
