"""Structure-aware fuzzing (hypothesis), in process, of the model-file parser and of architectures.

Every input either loads or raises `ModelError` with one line: never another exception. An
architecture that loads must compute what a float64 NumPy reference computes.
"""

from __future__ import annotations

import struct

import numpy as np
from convserve.core import Model, ModelError
from convserve.core.limits import Limits
from convserve.core.modelfile import parse_model_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import reference_numpy
from tests.hostile_models import lenet, model_bytes

FUZZ = settings(
    max_examples=600,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = Limits(max_parameters=200_000, max_dimension=64, max_batch_bytes=64 << 20)
ACTIVATIONS = ["relu", "linear", "tanh", "sigmoid", "softmax"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**12)
    | st.floats()
    | st.text(max_size=4)
    | st.just("[" * 3000)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def sometimes_hostile(strategy):
    """`strategy`, or in about one case of eight any JSON value at all."""
    return st.integers(0, 7).flatmap(lambda v: json_values if v == 7 else strategy)


def layer(kind: str, **fields) -> st.SearchStrategy:
    return st.fixed_dictionaries({"type": st.just(kind)}, optional=fields)


pairs = st.integers(1, 4) | st.lists(st.integers(1, 4), min_size=2, max_size=2)
image_layers = st.one_of(
    layer(
        "conv2d",
        filters=sometimes_hostile(st.integers(1, 6)),
        kernel_size=sometimes_hostile(pairs),
        strides=sometimes_hostile(st.integers(1, 2)),
        padding=sometimes_hostile(st.sampled_from(["same", "valid"])),
        activation=sometimes_hostile(st.sampled_from(ACTIVATIONS[:4])),
        use_bias=sometimes_hostile(st.booleans()),
    ),
    layer(
        "max_pooling2d",
        pool_size=sometimes_hostile(pairs),
        strides=sometimes_hostile(st.integers(1, 3)),
        padding=sometimes_hostile(st.sampled_from(["same", "valid"])),
    ),
    layer("average_pooling2d", pool_size=sometimes_hostile(pairs)),
    layer("activation", activation=st.sampled_from(ACTIVATIONS[:4])),
    layer("dropout", rate=sometimes_hostile(st.floats(0, 0.9))),
)
flat_layers = st.one_of(
    layer(
        "dense",
        units=sometimes_hostile(st.integers(1, 12)),
        activation=sometimes_hostile(st.sampled_from(ACTIVATIONS)),
        use_bias=st.booleans(),
    ),
    layer("activation", activation=st.sampled_from(ACTIVATIONS)),
    layer("dropout", rate=st.floats(0, 0.5)),
)


@st.composite
def architectures(draw) -> dict:
    """Mostly well-formed CNNs (image layers, flatten, dense layers), some with hostile parts."""
    layers = draw(st.lists(image_layers, max_size=3)) + [{"type": "flatten"}]
    layers += draw(st.lists(flat_layers, max_size=2))
    layers.append({"type": "dense", "units": draw(st.integers(1, 6))})
    if draw(st.integers(0, 3)) == 3:  # one layer replaced or inserted, anything goes
        at = draw(st.integers(0, len(layers)))
        layers[at : at + draw(st.integers(0, 1))] = [draw(json_values | image_layers | flat_layers)]
    channels = draw(st.integers(1, 3))
    document = {
        "name": "fuzz",
        "input": {
            "shape": draw(
                sometimes_hostile(
                    st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(channels)).map(list)
                )
            ),
            "scale": draw(sometimes_hostile(st.floats(0.001, 2))),
            "mean": draw(sometimes_hostile(st.lists(st.floats(-1, 1), min_size=1, max_size=1))),
            "std": draw(sometimes_hostile(st.lists(st.floats(0.1, 2), min_size=1, max_size=1))),
        },
        "layers": draw(sometimes_hostile(st.just(layers))),
    }
    if draw(st.integers(0, 7)) == 7:
        document[draw(st.sampled_from(["labels", "name", "extra", "input"]))] = draw(json_values)
    return document


def random_weights_for(model_shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[:-1])))).astype(np.float32)
        for name, shape in model_shapes.items()
    }


@FUZZ
@given(document=architectures(), seed=st.integers(0, 2**16))
def test_fuzz_architectures_load_or_refuse_and_compute_right(document, seed):
    from convserve.core.architecture import parse_architecture

    try:
        shapes = parse_architecture(document).weight_shapes()
        weights = random_weights_for(shapes, seed)
        model = Model(document, weights, SMALL, batch_size=2)
    except ModelError as exc:
        event("refused")
        assert "\n" not in str(exc)
        return
    event("loaded")
    x = np.random.default_rng(seed).integers(0, 256, (2, *model.input_shape)).astype(np.uint8)
    got = model.predict(x)
    want = reference_numpy.forward(document, weights, x, preprocess=True)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-4)


VALID_FILE = model_bytes(*lenet())


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_model_files_raise_only_model_error(data):
    blob = bytearray(VALID_FILE)
    header_end = 8 + struct.unpack("<Q", VALID_FILE[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        # most mutations hit the length field and the JSON header, where the parsing is
        at = data.draw(st.integers(0, header_end + 16) | st.integers(0, len(blob) - 1))
        at = min(at, len(blob) - 1)
        op = data.draw(st.integers(0, 4))
        if op == 0:
            blob[at] = data.draw(st.integers(0, 255))
        elif op == 1:
            del blob[at:]
        elif op == 2:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=12) | st.just(b"[" * 5000))
        elif op == 3:
            del blob[at : at + data.draw(st.integers(1, 40))]
        else:
            blob[at : at + 1] = data.draw(st.sampled_from([b'"', b"{", b"}", b",", b"\\", b"\xff"]))
        if not blob:
            break
    try:
        document, tensors = parse_model_bytes(bytes(blob), "fuzzed")
    except ModelError as exc:
        event("refused by the parser")
        message = str(exc)
        assert message.startswith("fuzzed: ") and "\n" not in message and len(message) <= 400
        return
    try:
        Model(document, tensors, SMALL)
        event("loaded")
    except ModelError as exc:
        event("refused by the model")
        assert "\n" not in str(exc)
