"""Bring your own model: import ONNX and Keras files into `convserve/1`, export to ONNX.

Importers read a source file into a `ModelBuilder` (layers in the documented `convserve/1`
JSON plus float32 tensors); anything the core cannot compute exactly raises
`UnsupportedModel` naming the source node or layer, its op and the attribute. Nothing here
imports onnx, h5py, keras or onnxruntime at module level: they are optional (`convserve[import]`).
"""

from __future__ import annotations

from convserve.core.errors import ModelError


class UnsupportedModel(ModelError):
    """The source model (or file) cannot be represented exactly; the message is one line."""


def require(module: str, purpose: str):
    """Import an optional dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnsupportedModel(
            f"{purpose} needs the '{module}' package: pip install 'convserve[import]'"
        ) from None
