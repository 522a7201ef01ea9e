"""Training checkpoints: one safetensors file (no pickle), written atomically.

Tensors: `params` (the flat parameter buffer) and the optimizer's state (`adam.m`, `adam.v` or
`sgd.velocity`). Metadata: `format` = `convserve-checkpoint/1`, `architecture` (JSON) and
`state` (JSON: epoch, step, optimizer step count, config, history). The random state needs no
tensor: every random draw is derived from (seed, epoch, step), so position is enough.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.errors import ModelError
from convserve.core.modelfile import atomic_write, canonical_header
from safetensors import SafetensorError
from safetensors.numpy import load_file, safe_open, save

FORMAT = "convserve-checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike,
    architecture: dict[str, Any],
    params: np.ndarray,
    optimizer_state: dict[str, np.ndarray],
    state: dict[str, Any],
) -> None:
    tensors = {"params": np.ascontiguousarray(params)}
    tensors.update({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()})
    metadata = {
        "format": FORMAT,
        "architecture": json.dumps(architecture),
        "state": json.dumps(state),
    }
    atomic_write(path, canonical_header(save(tensors, metadata=metadata)))


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Returns (architecture document, tensors, state); raises ModelError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {path}: not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise ModelError(
            f"checkpoint {path}: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        architecture = json.loads(metadata["architecture"])
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"checkpoint {path}: bad metadata: {exc}") from None
    if "params" not in tensors:
        raise ModelError(f"checkpoint {path}: no 'params' tensor")
    return architecture, tensors, state
