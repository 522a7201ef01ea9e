"""The benchmark's models, in one place: the three presets, the VGG-style CIFAR net of issue 14
and everyday architectures nobody tuned the kernels for. `bench.py` runs them all by default.

Each entry is an architecture document (weights are drawn by `bench.random_weights`). Users
bench their own models by path (`load_bench_model`): a model file with its weights, or an
architecture JSON document.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.errors import ModelError
from convserve.core.presets import PRESET_NAMES, preset

_LABELS = [str(i) for i in range(10)]


def _conv(filters: int, size: int, padding: str = "same", **options: Any) -> dict[str, Any]:
    layer = {"type": "conv2d", "filters": filters, "kernel_size": size, "padding": padding}
    return {**layer, "activation": "relu", **options}


def _pool(kind: str = "max") -> dict[str, Any]:
    return {"type": f"{kind}_pooling2d", "pool_size": 2}


def _pool3() -> dict[str, Any]:
    return {"type": "max_pooling2d", "pool_size": 3, "strides": 2}


def _dense(units: int, activation: str = "relu") -> dict[str, Any]:
    return {"type": "dense", "units": units, "activation": activation}


def _model(name: str, shape: list[int], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """A 10-class document on raw pixels in 0-255 (scaled to 0-1), ending in a softmax."""
    channels = shape[-1]
    return {
        "name": name,
        "input": {
            "shape": shape,
            "scale": 1 / 255,
            "mean": [0.0] * channels,
            "std": [1.0] * channels,
        },
        "labels": _LABELS,
        "layers": [*layers, {"type": "flatten"}, *_HEADS.get(name, []), _dense(10, "softmax")],
    }


_HEADS: dict[str, list[dict[str, Any]]] = {
    "vgg_cifar": [_dense(256)],
    "mnist_classic": [_dense(128)],
    "tanh_avgpool": [_dense(128, "tanh")],
    "rgb64": [_dense(128)],
    "wide_dense": [_dense(1024), _dense(512)],
    "mlp_tanh": [_dense(300, "tanh"), _dense(100, "tanh")],
}

_TANH = {"activation": "tanh"}

EVERYDAY: dict[str, dict[str, Any]] = {
    # issue 14's VGG-style CIFAR net: 3x3 `same` convs 32, 32, pool, 64, 64, pool, dense 256, 10
    "vgg_cifar": _model(
        "vgg_cifar",
        [32, 32, 3],
        [_conv(32, 3), _conv(32, 3), _pool(), _conv(64, 3), _conv(64, 3), _pool()],
    ),
    # downsampling by stride-2 `same` convs instead of pools
    "strided": _model(
        "strided",
        [32, 32, 3],
        [_conv(32, 3), _conv(64, 3, strides=2), _conv(64, 3), _conv(128, 3, strides=2)],
    ),
    # the classic MNIST net: 5x5 `valid` convs with max pools
    "mnist_classic": _model(
        "mnist_classic",
        [28, 28, 1],
        [_conv(32, 5, "valid"), _pool(), _conv(64, 5, "valid"), _pool()],
    ),
    # tanh, average pooling and `same` 5x5 convs
    "tanh_avgpool": _model(
        "tanh_avgpool",
        [32, 32, 3],
        [_conv(32, 5, **_TANH), _pool("average"), _conv(64, 5, **_TANH), _pool("average")],
    ),
    # a 64x64 RGB input with three conv + pool stages
    "rgb64": _model(
        "rgb64",
        [64, 64, 3],
        [_conv(32, 3), _pool(), _conv(64, 3), _pool(), _conv(128, 3), _pool()],
    ),
    # 1x1 convs between 3x3 ones (channel mixing, as in Network-in-Network and bottlenecks)
    "pointwise": _model(
        "pointwise",
        [32, 32, 3],
        [_conv(32, 3), _conv(16, 1), _conv(64, 3), _pool(), _conv(32, 1), _conv(64, 3), _pool()],
    ),
    # a wide fully connected classifier on 28x28 images: dense layers only
    "wide_dense": _model("wide_dense", [28, 28, 1], []),
    # overlapping 3x3/2 max pools, as in AlexNet (a pooling step of its own after each conv)
    "overlap_pool": _model(
        "overlap_pool",
        [32, 32, 3],
        [_conv(32, 3), _pool3(), _conv(64, 3), _pool3()],
    ),
    # the classic multilayer perceptron on MNIST: 300 and 100 tanh units (LeCun et al. 1998)
    "mlp_tanh": _model("mlp_tanh", [28, 28, 1], []),
    # a 128x128 RGB input downsampled by four stride-2 3x3 convs of 16 to 64 channels, as in
    # the stems of small mobile classifiers
    "strided_rgb128": _model(
        "strided_rgb128",
        [128, 128, 3],
        [
            _conv(16, 3, strides=2),
            _conv(32, 3, strides=2),
            _conv(64, 3, strides=2),
            _conv(64, 3, strides=2),
        ],
    ),
    # wide 1x1 convs (128 and 256 channels) after a stride-2 stem, as MobileNet's pointwise
    # layers
    "pointwise_wide": _model(
        "pointwise_wide",
        [32, 32, 3],
        [_conv(64, 3, strides=2), _conv(128, 1), _conv(128, 1), _pool(), _conv(256, 1)],
    ),
    # downsampling by 5x5 stride-2 `same` convs only, as in DCGAN's discriminator
    "strided5": _model(
        "strided5",
        [32, 32, 3],
        [_conv(32, 5, strides=2), _conv(64, 5, strides=2), _conv(128, 5, strides=2)],
    ),
}

BENCH_MODEL_NAMES = (*PRESET_NAMES, *EVERYDAY)


def bench_model(name: str) -> dict[str, Any]:
    """A fresh copy of a benchmark model's architecture document."""
    if name in EVERYDAY:
        return copy.deepcopy(EVERYDAY[name])
    return preset(name)


def load_bench_model(spec: str) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """(architecture document, weights) of what `--models` names: one of BENCH_MODEL_NAMES
    (weights None: seeded random ones), a model file (`.safetensors`, with its own weights) or
    an architecture JSON document (random weights). Raises ModelError naming what is wrong."""
    if spec in BENCH_MODEL_NAMES:
        return bench_model(spec), None
    path = Path(spec)
    if not path.is_file():
        raise ModelError(
            f"model {spec!r}: not a benchmark model ({', '.join(BENCH_MODEL_NAMES)}) "
            "and no such file (a model file .safetensors or an architecture .json)"
        )
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")), None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"architecture file {path}: not valid JSON: {exc}") from None
    from convserve.core.modelfile import read_model_file

    return read_model_file(path)
