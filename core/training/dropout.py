"""Dropout placed by trainer flags: inserted into the architecture for training only.

`--dropout-before-dense RATE` drops the input of the first dense layer (the flattened features);
`--dropout-after-dense RATE` drops the output of every hidden dense layer (all but the last
layer). The saved model is the user's architecture without these layers (dropout is the
identity at inference), so its layer indices and file are what they would be without the flags.
"""

from __future__ import annotations

import copy
from typing import Any


def _dropout(rate: float) -> dict[str, Any]:
    return {"type": "dropout", "rate": rate}


def with_dropout(
    doc: dict[str, Any], before_dense: float, after_dense: float
) -> tuple[dict[str, Any], list[int | None]]:
    """(training document, origin): the document with the flagged dropout layers inserted, and
    for each of its layers the index of the same layer in `doc` (None for an inserted one)."""
    layers = doc.get("layers", [])
    dense_at = [i for i, layer in enumerate(layers) if layer.get("type") == "dense"]
    if (before_dense or after_dense) and not dense_at:
        raise ValueError("--dropout-before-dense/--dropout-after-dense need a dense layer")
    trained: list[dict[str, Any]] = []
    origin: list[int | None] = []
    for i, layer in enumerate(layers):
        if before_dense and dense_at and i == dense_at[0]:
            trained.append(_dropout(before_dense))
            origin.append(None)
        trained.append(layer)
        origin.append(i)
        if after_dense and layer.get("type") == "dense" and i != len(layers) - 1:
            trained.append(_dropout(after_dense))
            origin.append(None)
    if len(trained) == len(layers):
        return doc, origin
    out = copy.deepcopy(doc)
    out["layers"] = copy.deepcopy(trained)
    return out, origin


def original_weights(weights: dict[str, Any], origin: list[int | None]) -> dict[str, Any]:
    """Model-file tensors of the training document renamed to the user's layer indices."""
    renamed = {}
    for name, value in weights.items():
        _, index, rest = name.split(".", 2)  # "layers.{index}.{tensor}"
        original = origin[int(index)]
        assert original is not None, f"an inserted dropout layer has a tensor {name}"
        renamed[f"layers.{original}.{rest}"] = value
    return renamed
