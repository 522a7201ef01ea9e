"""Size limits that refuse absurd architectures at load, before any buffer is allocated.

A model file of a few bytes can describe a network that needs terabytes (an input of
100000x100000 pixels, or a modest model run at a batch size of a billion). `check_limits`
computes the sizes from the parsed architecture's shapes alone and raises `ModelError` naming
the limit, the value and how to change it. The defaults fit every sensible classifier with a
wide margin (see docs/hardening.md); the server exposes each as an option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from convserve.core.architecture import Architecture
from convserve.core.errors import ModelError

FLOAT_BYTES = 4  # activations and weights are float32
GIB = 1 << 30
# Headroom below float32's largest value for what the max-norm bound below does not cover:
# rounding, and the Winograd transforms' intermediate sums (their matrices grow values < 100x).
FLOAT32_HEADROOM = 1e3


@dataclass(frozen=True)
class Limits:
    """What one model may need. Every value is a plain number; 0 disables that limit."""

    max_parameters: int = 1_000_000_000  # 4 GB of float32 weights
    max_dimension: int = 65_536  # any height, width, channel, filter or unit count
    max_image_activation_bytes: int = 1 * GIB  # largest layer input + output of one image
    max_batch_bytes: int = 16 * GIB  # one batch: its inputs plus every image's activations


def image_activation_bytes(arch: Architecture) -> int:
    """Bytes of float32 activations one image needs at its widest layer (input + output)."""
    widest = max(
        (math.prod(layer.input_shape) + math.prod(layer.output_shape) for layer in arch.layers),
        default=math.prod(arch.input_shape),
    )
    return FLOAT_BYTES * widest


def batch_bytes(arch: Architecture, batch_size: int) -> int:
    """An upper estimate of one batch's working memory: the input as received and as float32,
    the outputs, and the activations of every image."""
    per_image = (
        2 * FLOAT_BYTES * math.prod(arch.input_shape)
        + FLOAT_BYTES * arch.num_outputs
        + image_activation_bytes(arch)
    )
    return batch_size * per_image


def _refuse(what: str, value: int, limit: int, option: str) -> ModelError:
    return ModelError(f"{what} is {value:,}, above the limit of {limit:,} (raise it with {option})")


def check_limits(arch: Architecture, limits: Limits | None = None, batch_size: int = 1) -> None:
    """Raise `ModelError` if `arch` run at `batch_size` images would exceed a limit."""
    limits = limits or Limits()
    if limits.max_dimension:
        # image shapes (height, width, channels) and the class count; a flattened length is
        # legitimately large and bounded by the activation and parameter limits instead
        images = [(layer.label, layer.output_shape) for layer in arch.layers]
        for where, shape in [("input", arch.input_shape), ("output", (arch.num_outputs,))] + [
            (label, shape) for label, shape in images if len(shape) == 3
        ]:
            big = max(shape)
            if big > limits.max_dimension:
                raise _refuse(
                    f"architecture: {where}: dimension {list(shape)}, largest",
                    big,
                    limits.max_dimension,
                    "--max-dimension",
                )
    if limits.max_parameters:
        count = arch.param_count()
        if count > limits.max_parameters:
            raise _refuse(
                "architecture: parameter count", count, limits.max_parameters, "--max-parameters"
            )
    per_image = image_activation_bytes(arch)
    if limits.max_image_activation_bytes and per_image > limits.max_image_activation_bytes:
        raise _refuse(
            "architecture: activation bytes per image",
            per_image,
            limits.max_image_activation_bytes,
            "--max-image-activation-bytes",
        )
    if limits.max_batch_bytes:
        total = batch_bytes(arch, batch_size)
        if total > limits.max_batch_bytes:
            raise _refuse(
                f"working memory of a batch of {batch_size:,} images in bytes",
                total,
                limits.max_batch_bytes,
                "--max-batch-bytes, or lower --max-batch-size",
            )


def max_safe_pixel(arch: Architecture, weights: dict[str, np.ndarray]) -> float:
    """The largest raw pixel magnitude for which no value anywhere in the network can overflow
    float32 (so no infinity or NaN can arise, not even one a later ReLU or max-pool would hide).

    Bounded in the max-norm, layer by layer: when every input of a conv or dense layer is at most
    m in magnitude, output j is at most `sum_i |W_ij| * m + |b_j|`; pooling, flatten, dropout and
    the activations never increase the bound. With m = a * B + c after each layer, B (the largest
    preprocessed input) may be as large as keeps every `a * B + c` below float32's maximum over
    FLOAT32_HEADROOM; the model's preprocessing `(p * scale - mean) / std` turns B into pixels.
    """
    limit = float(np.finfo(np.float32).max) / FLOAT32_HEADROOM
    a, c, bound = 1.0, 0.0, limit
    for index in range(len(arch.layers)):
        kernel = weights.get(f"layers.{index}.kernel")  # the model file's tensor names
        if kernel is None:
            continue
        columns = np.abs(kernel.astype(np.float64)).reshape(-1, kernel.shape[-1])
        gain = float(columns.sum(axis=0).max())
        bias = weights.get(f"layers.{index}.bias")
        a, c = a * gain, c * gain + (0.0 if bias is None else float(np.abs(bias).max()))
        if a > 0:
            bound = min(bound, (limit - c) / a)
    if arch.scale == 0:
        return math.inf  # every pixel preprocesses to -mean / std
    pixel = min(
        (bound * abs(std) - abs(mean)) / abs(arch.scale) for mean, std in zip(arch.mean, arch.std)
    )
    return max(pixel, 0.0)
