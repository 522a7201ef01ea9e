"""convserve.core: the Numba CNN core (layers, model, model files, training).

Usable alone as a library; knows nothing of gRPC, the server or the client. Names are
imported lazily so that `import convserve.core.cli` (the command line) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Architecture": "convserve.core.architecture",
    "Layer": "convserve.core.layers",
    "parse_architecture": "convserve.core.architecture",
    "ModelError": "convserve.core.errors",
    "Model": "convserve.core.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'convserve.core' has no attribute {name!r}")
