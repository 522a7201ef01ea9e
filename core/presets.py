"""Named architectures: the reference Fashion-MNIST model, LeNet-5 and a small CIFAR-10 net."""

from __future__ import annotations

import copy
from typing import Any

FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_LABELS = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _conv(filters: int, size: int, padding: str, strides: int | None = None) -> dict[str, Any]:
    """A square ReLU conv2d layer document (strides written out only when given)."""
    layer: dict[str, Any] = {"type": "conv2d", "filters": filters, "kernel_size": [size, size]}
    if strides is not None:
        layer["strides"] = [strides, strides]
    layer.update(padding=padding, activation="relu")
    return layer


def _pool(**options: Any) -> dict[str, Any]:
    """A 2x2 max pooling layer document, with any further options (strides, padding)."""
    return {"type": "max_pooling2d", "pool_size": [2, 2], **options}


def _dense(units: int, activation: str = "relu") -> dict[str, Any]:
    return {"type": "dense", "units": units, "activation": activation}


_FLATTEN = {"type": "flatten"}
_MNIST_INPUT = {"shape": [28, 28, 1], "scale": 1 / 255, "mean": [0.0], "std": [1.0]}

_PRESETS: dict[str, dict[str, Any]] = {
    # The Keras Fashion-MNIST tutorial model: 243,786 parameters, about 10.1 MFLOP per image.
    "fashion_mnist": {
        "name": "fashion_mnist",
        "input": _MNIST_INPUT,
        "labels": FASHION_MNIST_LABELS,
        "layers": [
            _conv(64, 3, "valid", strides=1),
            _pool(strides=[2, 2], padding="valid"),
            _conv(64, 3, "valid", strides=1),
            _pool(strides=[2, 2], padding="valid"),
            _FLATTEN,
            _dense(128),
            _dense(10, "softmax"),
        ],
    },
    # LeCun et al. 1998, with ReLU and max pooling as usually trained today; 28x28 input, `same` first conv.
    "lenet5": {
        "name": "lenet5",
        "input": _MNIST_INPUT,
        "labels": FASHION_MNIST_LABELS,
        "layers": [
            _conv(6, 5, "same"),
            _pool(),
            _conv(16, 5, "valid"),
            _pool(),
            _FLATTEN,
            _dense(120),
            _dense(84),
            _dense(10, "softmax"),
        ],
    },
    # A small VGG-style net for 32x32x3 (CIFAR-10).
    "cifar10": {
        "name": "cifar10",
        "input": {
            "shape": [32, 32, 3],
            "scale": 1 / 255,
            "mean": [0.4914, 0.4822, 0.4465],
            "std": [0.2470, 0.2435, 0.2616],
        },
        "labels": CIFAR10_LABELS,
        "layers": [
            _conv(32, 3, "same"),
            _conv(32, 3, "valid"),
            _pool(),
            _conv(64, 3, "same"),
            _conv(64, 3, "valid"),
            _pool(),
            _FLATTEN,
            _dense(256),
            _dense(10, "softmax"),
        ],
    },
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> dict[str, Any]:
    """A fresh copy of a named architecture document."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return copy.deepcopy(_PRESETS[name])
