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

from convserve.core.architecture import Architecture
from convserve.core.errors import ModelError

FLOAT_BYTES = 4  # activations and weights are float32
GIB = 1 << 30


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
