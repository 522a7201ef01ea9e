"""Offline training for convserve models: `fit(...)` and the pieces it is built from.

Layers with forward/backward passes (`layers`, kernels in `kernels`), the network with one flat
parameter buffer (`network`), loss, optimizers, learning-rate schedules, initialisation,
checkpoints and reports. Import `fit` from `convserve.core.training.trainer`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("fit", "TrainConfig", "TrainResult"):
        from convserve.core.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'convserve.core.training' has no attribute {name!r}")
