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

_PRESETS: dict[str, dict[str, Any]] = {
    # The Keras Fashion-MNIST tutorial model: 243,786 parameters, about 10.1 MFLOP per image.
    "fashion_mnist": {
        "name": "fashion_mnist",
        "input": {"shape": [28, 28, 1], "scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        "labels": FASHION_MNIST_LABELS,
        "layers": [
            {
                "type": "conv2d",
                "filters": 64,
                "kernel_size": [3, 3],
                "strides": [1, 1],
                "padding": "valid",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2], "strides": [2, 2], "padding": "valid"},
            {
                "type": "conv2d",
                "filters": 64,
                "kernel_size": [3, 3],
                "strides": [1, 1],
                "padding": "valid",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2], "strides": [2, 2], "padding": "valid"},
            {"type": "flatten"},
            {"type": "dense", "units": 128, "activation": "relu"},
            {"type": "dense", "units": 10, "activation": "softmax"},
        ],
    },
    # LeCun et al. 1998, with ReLU and max pooling as usually trained today; 28x28 input, `same` first conv.
    "lenet5": {
        "name": "lenet5",
        "input": {"shape": [28, 28, 1], "scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        "labels": FASHION_MNIST_LABELS,
        "layers": [
            {
                "type": "conv2d",
                "filters": 6,
                "kernel_size": [5, 5],
                "padding": "same",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2]},
            {
                "type": "conv2d",
                "filters": 16,
                "kernel_size": [5, 5],
                "padding": "valid",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2]},
            {"type": "flatten"},
            {"type": "dense", "units": 120, "activation": "relu"},
            {"type": "dense", "units": 84, "activation": "relu"},
            {"type": "dense", "units": 10, "activation": "softmax"},
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
            {
                "type": "conv2d",
                "filters": 32,
                "kernel_size": [3, 3],
                "padding": "same",
                "activation": "relu",
            },
            {
                "type": "conv2d",
                "filters": 32,
                "kernel_size": [3, 3],
                "padding": "valid",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2]},
            {
                "type": "conv2d",
                "filters": 64,
                "kernel_size": [3, 3],
                "padding": "same",
                "activation": "relu",
            },
            {
                "type": "conv2d",
                "filters": 64,
                "kernel_size": [3, 3],
                "padding": "valid",
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": [2, 2]},
            {"type": "flatten"},
            {"type": "dense", "units": 256, "activation": "relu"},
            {"type": "dense", "units": 10, "activation": "softmax"},
        ],
    },
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> dict[str, Any]:
    """A fresh copy of a named architecture document."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return copy.deepcopy(_PRESETS[name])
