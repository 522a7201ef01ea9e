"""Learning-rate schedules, as a function of the global step."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """`constant`; `step` (times `gamma` every `step_epochs` epochs); `cosine` (to 0 over all steps).

    `warmup_steps` ramps linearly from lr/warmup_steps up to lr first.
    """

    kind: str
    lr: float
    steps_per_epoch: int
    epochs: int
    step_epochs: int = 5
    gamma: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"unknown learning-rate schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.step_epochs < 1:
            raise ValueError(f"step_epochs must be >= 1, got {self.step_epochs}")

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.lr * self.gamma ** ((step // self.steps_per_epoch) // self.step_epochs)
        if self.kind == "cosine":
            total = max(self.steps_per_epoch * self.epochs - self.warmup_steps, 1)
            t = min(max(step - self.warmup_steps, 0), total) / total
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.lr
