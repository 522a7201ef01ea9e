"""Shared fixtures: small models with seeded random weights, and a stub on a module's server."""

from __future__ import annotations

import numpy as np
import pytest
from convserve.core.architecture import parse_architecture
from convserve.core.presets import preset


def random_weights(document: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """He-scaled random float32 weights for every tensor the architecture expects."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in parse_architecture(document).weight_shapes().items():
        fan_in = int(np.prod(shape[:-1])) if name.endswith("kernel") else 1
        scale = np.sqrt(2.0 / fan_in) if name.endswith("kernel") else 0.1
        weights[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return weights


@pytest.fixture(scope="session")
def reference_document() -> dict:
    return preset("fashion_mnist")


@pytest.fixture(scope="session")
def reference_model(reference_document):
    from convserve.core import Model

    return Model(reference_document, random_weights(reference_document))


@pytest.fixture(scope="module")
def api(server):
    """An inference stub on the test module's `server` fixture (its channel closed afterwards)."""
    from tests import server_harness as h

    stub, channel = h.stub(server.target)
    yield stub
    channel.close()
