"""Intermediate activations: each layer's output for a batch, for `Model.activations`.

A layer's output is computed by an `InferencePlan` over the architecture cut after that layer,
with the production kernels, so the maps are exactly what `predict` computes on the way; the
plans are built on first use and `predict` itself is untouched (no extra copies or checks).
Flatten and dropout reuse the previous output: they move no numbers at inference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from convserve.core.architecture import Architecture
from convserve.core.inference import InferencePlan, Plan, fitting_plan

_PASS_THROUGH = ("flatten", "dropout")


class LayerOutputs:
    """Computes chosen layers' outputs for raw-pixel batches (preprocessing applied)."""

    def __init__(self, architecture: Architecture, weights: dict[str, np.ndarray], plan: Plan):
        """`plan`: the kernel variant per layer, as the model's own plan has them (where the
        cut model's layers can run it)."""
        self.architecture, self.weights, self.plan = architecture, weights, plan
        self._plans: dict[int, InferencePlan] = {}

    def _plan(self, index: int) -> InferencePlan:
        if index not in self._plans:
            arch = self.architecture
            cut = dataclasses.replace(arch, layers=arch.layers[: index + 1])
            names = cut.weight_shapes()
            weights = {n: self.weights[n] for n in names}
            self._plans[index] = InferencePlan(cut, weights, fitting_plan(cut, self.plan))
        return self._plans[index]

    def __call__(self, images: np.ndarray, indices: list[int]) -> dict[int, np.ndarray]:
        layers = self.architecture.layers
        outputs: dict[int, np.ndarray] = {}
        for index in sorted(set(indices)):
            source = index
            while source >= 0 and layers[source].type in _PASS_THROUGH:
                source -= 1  # the nearest layer that computes something
            if source < 0:  # only pass-through layers so far: the preprocessed input
                arch = self.architecture
                x = images.astype(np.float32) * np.float32(arch.scale)
                x = (x - np.asarray(arch.mean, np.float32)) / np.asarray(arch.std, np.float32)
            else:
                x = self._plan(source).run(images, preprocess=True)
            outputs[index] = x.reshape(len(images), *layers[index].output_shape)
        return outputs
