"""The safe pixel bound (core.limits.max_safe_pixel): at the bound every value in the network
stays finite float32 and the kernels agree with a float64 reference; it fits every real pixel."""

from __future__ import annotations

import numpy as np
import pytest
from convserve.core import Model
from convserve.core.limits import max_safe_pixel
from convserve.core.presets import PRESET_NAMES, preset

from tests import reference_numpy
from tests.conftest import random_weights


def linear_output(name: str, seed: int, gain: float) -> tuple[dict, dict]:
    """A preset with raw-pixel input (scale 1), a linear last layer and weights scaled by gain:
    the logits show any overflow a softmax would flatten."""
    document = preset(name)
    document["input"] = {**document["input"], "scale": 1.0}
    document["layers"][-1] = {**document["layers"][-1], "activation": "linear"}
    weights = {k: v * np.float32(gain) for k, v in random_weights(document, seed).items()}
    return document, weights


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_inputs_at_the_bound_stay_finite_and_exact(name, seed):
    document, weights = linear_output(name, seed, gain=1.0 + 3 * seed)
    model = Model(document, weights)
    bound = max_safe_pixel(model.architecture, model.weights)
    assert 255 < bound < np.finfo(np.float32).max
    rng = np.random.default_rng(seed)
    shape = (3, *model.input_shape)
    x = (rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.0, shape) * bound).astype(np.float32)
    x[0] = np.float32(bound) * np.sign(x[0])  # one image entirely at the bound
    got = model.predict(x)
    assert np.isfinite(got).all()
    want = reference_numpy.forward(document, weights, x, preprocess=True)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-3)


def test_bound_is_far_above_real_pixels_for_every_preset():
    for name in PRESET_NAMES:
        document = preset(name)
        model = Model(document, random_weights(document, seed=3))
        assert max_safe_pixel(model.architecture, model.weights) > 1e20, name


def test_bound_shrinks_with_gain_and_scale():
    small = Model(*linear_output("lenet5", 0, gain=1.0))
    big = Model(*linear_output("lenet5", 0, gain=10.0))
    b_small = max_safe_pixel(small.architecture, small.weights)
    b_big = max_safe_pixel(big.architecture, big.weights)
    layers = sum(1 for name in small.weights if name.endswith("kernel"))
    # every kernel is 10x larger, so the bound falls by about 10 per weight layer
    assert b_small / b_big == pytest.approx(10.0**layers, rel=0.05)
