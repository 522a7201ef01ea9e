"""Numerics of the Numba forward pass against an independent NumPy reference, ONNX Runtime and
torch (when installed), on seeded random architectures covering every layer type and option,
plus batch invariance, buffer reuse and concurrent calls."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.architecture import parse_architecture
from convserve.core.inference import InferencePlan, default_plan
from convserve.core.kernels import pool as kpool
from convserve.core.kernels.dense import K_CHUNK
from convserve.core.kernels.elementwise import SIGNS
from convserve.core.presets import PRESET_NAMES, preset

from tests import reference_numpy as ref

ACTIVATIONS = ["linear", "relu", "tanh", "sigmoid", "softmax"]
TOLERANCE = 1e-4


def assert_forward_matches_reference(model, doc, weights, x, rtol=0.0, where=""):
    """`model.forward(x)` equals the NumPy reference within TOLERANCE (and `rtol`)."""
    expected = ref.forward(doc, weights, x)
    np.testing.assert_allclose(model.forward(x), expected, atol=TOLERANCE, rtol=rtol, err_msg=where)


def _weights(doc: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in parse_architecture(doc).weight_shapes().items():
        if name.endswith(".kernel"):
            out[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(
                np.float32
            )
        else:
            out[name] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    return out


def _kind(step) -> str:
    """Which kernel a plan step runs: its class, `+pool` when a 2x2 max or average pool is fused
    in."""
    return type(step).__name__ + ("+pool" if getattr(step, "pool", False) else "")


def _kernels(model, n: int) -> list[str]:
    """The names of the kernels a batch of n runs, in order."""
    plan = model._plan
    return [call[0].__name__ for call in plan._program(n, True, plan.threads)[0]]


def _valid(doc: dict) -> bool:
    try:
        parse_architecture(doc)
    except ModelError:
        return False
    return True


def random_document(rng: np.random.Generator, index: int) -> dict:
    """A random valid architecture: 1-3 conv blocks (kernels 1-5, strides 1-3, both paddings,
    1-16 filters, every activation, optional bias), optional pooling of both kinds (windows
    2-3, strides 1-3, both paddings), standalone activations, dropout, flatten, 1-2 dense."""
    h, w = int(rng.integers(5, 24)), int(rng.integers(5, 24))
    doc = {
        "name": f"random{index}",
        "input": {"shape": [h, w, int(rng.integers(1, 5))]},
        "layers": [],
    }
    layers = doc["layers"]
    if (
        index % 4 == 0
    ):  # the fused paths: conv + 2x2/2 max pool, and the 1-channel 3x3 / 5x5 kernels
        doc["input"]["shape"][2] = 1
        k, filters = (
            (3, 16 * int(rng.integers(1, 3))) if index % 8 == 0 else (5, int(rng.integers(1, 21)))
        )
        layers += [
            {
                "type": "conv2d",
                "filters": filters,
                "kernel_size": k,
                "padding": str(rng.choice(["valid", "same"])),
                "activation": "relu",
            },
            {"type": "max_pooling2d", "pool_size": 2},
        ]
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            k = int(rng.integers(1, 6))
            conv = {
                "type": "conv2d",
                "filters": int(rng.integers(1, 17)),
                "kernel_size": [k, int(rng.integers(1, 6))] if rng.random() < 0.3 else k,
                "strides": int(rng.integers(1, 4)) if rng.random() < 0.5 else 1,
                "padding": str(rng.choice(["valid", "same"])),
                "activation": str(rng.choice(ACTIVATIONS, p=[0.2, 0.4, 0.15, 0.15, 0.1])),
                "use_bias": bool(rng.random() < 0.75),
            }
            block = [conv]
            r = rng.random()
            if r < 0.35:
                block.append({"type": "max_pooling2d", "pool_size": 2})
            elif r < 0.7:
                p = int(rng.integers(2, 4))
                block.append(
                    {
                        "type": str(rng.choice(["max_pooling2d", "average_pooling2d"])),
                        "pool_size": [p, p],
                        "strides": int(rng.integers(1, 4)),
                        "padding": str(rng.choice(["valid", "same"])),
                    }
                )
            if rng.random() < 0.2:
                block.append(
                    {
                        "type": "activation",
                        "activation": str(rng.choice(["relu", "tanh", "sigmoid"])),
                    }
                )
            if rng.random() < 0.15:
                block.append({"type": "dropout", "rate": 0.25})
            candidate = {**doc, "layers": layers + block + [{"type": "flatten"}]}
            if _valid(candidate):
                layers += block
                break
    layers.append({"type": "flatten"})
    if rng.random() < 0.6:
        layers.append(
            {
                "type": "dense",
                "units": int(rng.integers(1, 40)),
                "activation": str(rng.choice(ACTIVATIONS[:4])),
                "use_bias": bool(rng.random() < 0.8),
            }
        )
        if rng.random() < 0.3:
            layers.append({"type": "dropout", "rate": 0.5})
    units = int(rng.integers(1, 13))
    if rng.random() < 0.2:
        layers += [
            {"type": "dense", "units": units},
            {"type": "activation", "activation": str(rng.choice(ACTIVATIONS))},
        ]
    else:
        layers.append({"type": "dense", "units": units, "activation": str(rng.choice(ACTIVATIONS))})
    assert _valid(doc), doc
    return doc


N_RANDOM = 28


@pytest.fixture(scope="module")
def cases():
    """(document, weights, model, input batch of 5) for each seeded random architecture."""
    rng = np.random.default_rng(2024)
    out = []
    for i in range(N_RANDOM):
        doc = random_document(rng, i)
        weights = _weights(doc, i)
        shape = parse_architecture(doc).input_shape
        x = rng.standard_normal((5, *shape)).astype(np.float32)
        out.append((doc, weights, Model(doc, weights), x))
    return out


def test_random_architectures_cover_every_option(cases):
    layers = [layer for _, _, m, _ in cases for layer in m.architecture.layers]
    convs = [l for l in layers if l.type == "conv2d"]
    pools = [l for l in layers if l.type.endswith("pooling2d")]
    assert {l.kernel_size[0] for l in convs} == {1, 2, 3, 4, 5}
    assert {l.strides[0] for l in convs} == {1, 2, 3}
    assert {l.padding for l in convs} == {"valid", "same"} == {l.padding for l in pools}
    assert {l.activation for l in convs} == set(ACTIVATIONS)
    assert {l.type for l in pools} == {"max_pooling2d", "average_pooling2d"}
    assert {l.pool_size[0] for l in pools} == {2, 3}
    assert any(not l.use_bias for l in convs)
    assert any(l.filters % 4 for l in convs) and any(l.filters == 16 for l in convs)
    assert {"activation", "dropout", "dense"} <= {l.type for l in layers}
    kinds = {_kind(s) for _, _, m, _ in cases for s in m._plan.steps}
    assert {
        "DirectConv",
        "DirectConv+pool",
        "K3PoolConv",
        "PixelsPoolConv",
        "PoolStep",
        "DenseStep",
        "DenseChainStep",
        "Activate",
    } <= kinds
    assert "WinogradConv+pool" in {
        _kind(s)
        for name in PRESET_NAMES
        for s in Model(preset(name), _weights(preset(name), 0))._plan.steps
    }


def test_tanh_and_sigmoid_kernels_match_float64():
    """The kernels' vectorizing tanh (a rational function) and sigmoid (from tanh) against
    float64 libm over every magnitude, from subnormal-small to saturated, both signs."""
    from convserve.core.kernels import elementwise

    rng = np.random.default_rng(7)
    mags = np.concatenate([np.logspace(-30, 2, 20001), rng.uniform(0, 12, 20000)])
    x = np.concatenate([mags, -mags, [0.0]]).astype(np.float32).reshape(1, -1)
    exact = x.astype(np.float64)
    for code, reference in ((2, np.tanh(exact)), (3, 1 / (1 + np.exp(-exact)))):
        got = x.copy()
        elementwise.activate(got, code)
        assert np.abs(got - reference).max() < 1e-6
    small = np.abs(exact) < 1e-3  # tanh(x) ~ x: small values keep their relative precision
    got = x.copy()
    elementwise.activate(got, 2)
    assert np.abs(got[small] - exact[small]).max() < 1e-9


def test_softmax_exp_matches_float64():
    """The softmax's vectorizing exp (range reduction and a polynomial) against float64 libm:
    within 1.3 ulp over exp's normal range, about 1e-38 below it (the clamp); and softmax rows
    of 1-40, 300 and 1,000 values (the vector loop and its scalar tail) against float64, the
    same bits in a block of rows as alone."""
    from convserve.core.kernels import elementwise

    rng = np.random.default_rng(11)
    x = np.concatenate([np.linspace(-87.3, 0, 400001), -np.logspace(-30, 1.94, 20001), [0.0]])
    x = np.concatenate([x, rng.uniform(-120, -87.3, 1000)]).astype(np.float32)
    got = x.copy()
    elementwise._exp_shifted(got, np.float32(0.0))
    exact = np.exp(x.astype(np.float64))
    normal = exact > 1.2e-38
    assert (np.abs(got - exact) / exact)[normal].max() < 1.3 * 2.0**-23
    assert np.abs(got - exact)[~normal].max() < 1.3e-38
    for width in (*range(1, 41), 300, 1000):
        logits = (rng.standard_normal((7, width)) * rng.uniform(0.1, 30)).astype(np.float32)
        out = logits.copy()
        elementwise.activate(out, 4)
        ref = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(out, ref / ref.sum(axis=1, keepdims=True), atol=2e-7, rtol=0)
        # the rows go through one exp loop together: each row alone gives the same bits
        for i in range(len(logits)):
            alone = logits[i : i + 1].copy()
            elementwise.activate(alone, 4)
            np.testing.assert_array_equal(alone[0], out[i])


def test_finiteness_scan_agrees_with_numpy_on_every_kind_of_value():
    """The bit-pattern scan behind the NaN/Inf input check against `np.isfinite` on arrays of
    random bit patterns (every exponent), with and without a NaN (quiet, signalling, negative),
    an infinity of either sign, or the largest finite values, at any position, and empty."""
    from convserve.core.kernels.elementwise import all_finite_f32, all_finite_f32_parallel

    rng = np.random.default_rng(5)
    specials = np.array(
        [0x7FC00000, 0x7F800001, 0xFFC00000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 1],
        np.uint32,
    ).view(np.float32)
    for scan in (all_finite_f32, all_finite_f32_parallel):
        assert scan(np.empty(0, np.float32))
        for size in (1, 7, 64, 1000, 4099):
            finite = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
            finite &= np.uint32(0xBFFFFFFF)  # exponent below all ones
            x = finite.view(np.float32)
            assert scan(x)
            for value in specials:
                # the first and last values too: they are read as the low or high half of a
                # pair of floats, or alone (an odd size)
                for where in (0, size - 1, rng.integers(0, size)):
                    y = x.copy()
                    y[where] = value
                    assert scan(y) == bool(np.isfinite(y).all()), (scan, size, value, where)


def test_a_large_input_is_scanned_on_all_threads_to_its_last_value():
    """`Model.forward`'s NaN/Inf check on an input past PARALLEL_SCAN_FLOATS (the parallel
    scan): a NaN or infinity in any of its pieces, the last value included, is found."""
    from convserve.core.kernels.elementwise import PARALLEL_SCAN_FLOATS, SCAN_PARTS
    from convserve.core.model import all_finite

    size = PARALLEL_SCAN_FLOATS + 13  # pieces of unequal length
    x = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    assert all_finite(x)
    per = (-(-size // SCAN_PARTS) + 1) // 2 * 2  # the pieces hold whole pairs of floats
    for where in [*range(0, size, per), *range(per - 1, size, per), size - 1]:
        for value in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[where] = value
            assert not all_finite(y), (where, value)


@pytest.mark.parametrize("filters", [20, 32, 48, 64, 80, 130])
def test_wide_convolutions_match_numpy_reference(filters):
    """Every micro-kernel shape (8 pixels x 16/32 channels, 4 x 64, 4 x 32 and 4 x 16 remainders,
    rows shorter than a block in one call of their 1-4 pixels) and the shifted tail block of a
    row, on images from 1 to 13 pixels wide, fused with max or average pooling or not, strided and
    padded, every activation."""
    rng = np.random.default_rng(filters)
    for width in (1, 2, 3, 4, 5, 9, 13):
        for (pool, stride, padding), act in zip(
            (
                ("max", 1, "valid"),
                (None, 1, "same"),
                (None, 2, "same"),
                ("max", 1, "same"),
                ("average", 1, "same"),
                ("average", 2, "valid"),
            ),
            ("relu", "tanh", "relu", "sigmoid", "tanh", "linear"),
        ):
            kernel = int(rng.integers(1, 4))
            span = width - kernel + 1 if padding == "valid" else width
            if pool and (span + stride - 1) // stride < 2:  # too narrow for a 2x2 pool
                continue
            layers = [
                {
                    "type": "conv2d",
                    "filters": filters,
                    "kernel_size": [kernel, kernel],
                    "strides": [stride, stride],
                    "padding": padding,
                    "activation": act,
                }
            ]
            if pool:
                layers.append({"type": f"{pool}_pooling2d", "pool_size": [2, 2]})
            layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
            doc = {
                "name": "wide",
                "input": {
                    "shape": [width + 2, width, 5],
                    "scale": 1.0,
                    "mean": [0.0] * 5,
                    "std": [1.0] * 5,
                },
                "labels": ["a", "b", "c"],
                "layers": layers,
            }
            weights = _weights(doc, filters + width)
            model = Model(doc, weights)
            assert _kind(model._plan.steps[0]) == ("DirectConv+pool" if pool else "DirectConv")
            x = rng.standard_normal((3, width + 2, width, 5)).astype(np.float32)
            where = f"width {width}, pool {pool}, stride {stride}, {padding}"
            assert_forward_matches_reference(model, doc, weights, x, where=where)


@pytest.mark.parametrize(
    "channels,kernel,stride,pool",
    [(100, 3, 2, None), (300, 1, 1, "max"), (40, 5, 1, "average"), (70, 2, 1, None)],
)
def test_direct_convolutions_with_weights_in_chunks(channels, kernel, stride, pool):
    """Direct convolutions whose weights exceed one chunk run chunk by chunk (whole kernel rows,
    several taps of a row, single taps), each adding to the sums so far: the NumPy reference,
    and each image bit-identical alone and in a batch."""
    layers = [
        {
            "type": "conv2d",
            "filters": 40,
            "kernel_size": kernel,
            "strides": stride,
            "padding": "same",
            "activation": "relu",
        }
    ]
    if pool:
        layers.append({"type": f"{pool}_pooling2d", "pool_size": 2})
    layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
    doc = {
        "name": "chunks",
        "input": {"shape": [7, 9, channels], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "labels": ["a", "b", "c"],
        "layers": layers,
    }
    doc["input"]["mean"], doc["input"]["std"] = [0.0] * channels, [1.0] * channels
    weights = _weights(doc, channels + kernel)
    model = Model(doc, weights, winograd=False)
    assert _kind(model._plan.steps[0]) == ("DirectConv+pool" if pool else "DirectConv")
    x = np.random.default_rng(channels).standard_normal((3, 7, 9, channels)).astype(np.float32)
    assert_forward_matches_reference(model, doc, weights, x, rtol=1e-5)
    whole = model.forward(x)
    for i in range(3):
        np.testing.assert_array_equal(model.forward(x[i : i + 1])[0], whole[i])


@pytest.mark.parametrize(
    "size,channels,kernel,stride,padding,act,filters",
    [
        ((96, 90), 3, 3, 2, "same", "relu", 32),
        ((75, 80), 4, 5, 1, "same", "linear", 32),
        ((80, 84), 3, 3, 3, "valid", "tanh", 32),
        ((72, 72), 16, 1, 1, "valid", "relu", 32),
        ((300, 14), 2, 15, 1, "same", "relu", 32),  # every window crosses an edge
        ((64, 250), 3, 4, 2, "same", "linear", 32),  # an even kernel: one column on each side
        ((65, 130), 3, 5, 2, "same", "relu", 32),  # edge columns on both sides, 2 rows on top
        # 16 filters over 3 channels: the sliding-window micro-kernels (`direct._slid_pixels`)
        ((96, 90), 3, 3, 2, "same", "relu", 16),
        ((70, 101), 3, 3, 1, "valid", "linear", 16),
        ((72, 72), 3, 5, 1, "same", "relu", 16),
        ((65, 130), 3, 5, 2, "same", "linear", 16),
        ((131, 77), 3, 7, 2, "same", "relu", 16),
        ((80, 84), 3, 3, 2, "valid", "tanh", 16),  # not fused: the generic micro-kernels
    ],
)
def test_convs_over_large_inputs_pad_their_own_rows(
    size, channels, kernel, stride, padding, act, filters, monkeypatch
):
    """A first conv over a large input (RAW_ROWS_MIN_BYTES an image or more) pads and
    preprocesses the rows each task reads (`direct.conv_raw`), or on preprocessed input reads
    the windows inside the image straight from it: the NumPy reference with the model's scale,
    mean and std, the same bits as the padding copy of the whole batch from raw pixels and
    from preprocessed input, and each image the same alone and in a batch."""
    from convserve.core.layers import conv2d

    h, w = size
    doc = {
        "name": "large",
        "input": {
            "shape": [h, w, channels],
            "scale": 1 / 255,
            "mean": [0.1 * (c + 1) for c in range(channels)],
            "std": [0.2 + 0.05 * c for c in range(channels)],
        },
        "labels": ["a", "b", "c"],
        "layers": [
            {
                "type": "conv2d",
                "filters": filters,
                "kernel_size": kernel,
                "strides": stride,
                "padding": padding,
                "activation": act,
            },
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "strides": 2, "activation": "relu"},
            {"type": "flatten"},
            {"type": "dense", "units": 3, "activation": "linear"},
        ],
    }
    weights = _weights(doc, h + kernel)
    x = np.random.default_rng(h).uniform(0, 255, (5, h, w, channels)).astype(np.float32)
    model = Model(doc, weights, winograd=False, plan=False)
    assert _kernels(model, 5)[0] == "conv_raw", _kernels(model, 5)
    assert_forward_matches_reference(model, doc, weights, x, rtol=1e-5)
    rows = model.forward(x)
    probabilities = model.predict(x)
    for i in range(5):
        np.testing.assert_array_equal(model.forward(x[i : i + 1])[0], rows[i])
    monkeypatch.setattr(conv2d, "RAW_ROWS_MIN_BYTES", 1 << 40)
    copied = Model(doc, weights, winograd=False, plan=False)
    assert _kernels(copied, 5)[:2] == ["pad_input", "conv"], _kernels(copied, 5)
    np.testing.assert_array_equal(copied.forward(x), rows)
    np.testing.assert_array_equal(copied.predict(x), probabilities)


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [
        ((97, 130), 3, 2, "same"),
        ((97, 130), 2, 3, "same"),  # every third row and column is read by no window
    ],
)
def test_a_first_conv_over_a_large_input_finds_nan_and_inf_anywhere_in_it(
    size, kernel, stride, padding
):
    """`forward` and `predict` leave the finiteness scan of a large batch to the first conv's
    tasks (`direct.conv_raw`, each output row scanning the input rows it owns): a NaN or an
    infinity anywhere raises ModelError, in the first or a later chunk of a batch, also in rows
    and columns no window reads; the model then runs finite batches as before."""
    h, w = size
    doc = {
        "name": "large",
        "input": {"shape": [h, w, 3], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "layers": [
            {
                "type": "conv2d",
                "filters": 16,
                "kernel_size": kernel,
                "strides": stride,
                "padding": padding,
                "activation": "relu",
            },
            {"type": "flatten"},
            {"type": "dense", "units": 3, "activation": "linear"},
        ],
    }
    weights = _weights(doc, h)
    model = Model(doc, weights, winograd=False, plan=False)
    n = model._plan.chunk + 3  # two chunks
    x = np.random.default_rng(w).standard_normal((n, h, w, 3)).astype(np.float32)
    plan = model._plan
    assert plan._program(n, False, plan.threads)[4]  # the first kernel scans
    assert _kernels(model, n)[0] == "conv_raw"
    expected = model.forward(x)
    rng = np.random.default_rng(h)
    corners = [(0, 0, 0, 0), (n - 1, h - 1, w - 1, 2), (1, h - 1, 0, 1), (n - 2, 0, w - 1, 0)]
    randoms = [tuple(int(rng.integers(d)) for d in x.shape) for _ in range(12)]
    for where in corners + randoms:
        for value in (np.nan, np.inf, -np.inf):
            bad = x.copy()
            bad[where] = value
            with pytest.raises(ModelError, match="forward input contains NaN or Inf"):
                model.forward(bad)
            with pytest.raises(ModelError, match="forward input contains NaN or Inf"):
                model.forward(bad[where[0] : where[0] + 1])
            with pytest.raises(ModelError, match="predict input contains NaN or Inf"):
                model.predict(bad)  # raw pixels: preprocessed in the first kernel
    # a run that asks for no check scans nothing: the last NaN's flag stays as it was
    assert plan._scan_flags[0] & SIGNS
    plan.run(x)
    assert plan._scan_flags[0] & SIGNS
    np.testing.assert_array_equal(model.forward(x), expected)
    assert not plan._scan_flags[0] & SIGNS
    pixels = np.random.default_rng(1).integers(0, 256, x.shape).astype(np.uint8)
    np.testing.assert_array_equal(model.predict(pixels), model.predict(pixels.astype(np.float32)))


def test_a_conv_after_a_pool_step_pads_its_own_rows_of_a_large_input():
    """A conv whose large input comes from a separate pooling step (not written padded by the
    step before) pads its own rows too (`direct.conv_raw`, no padding buffer): the NumPy
    reference, and each image the same alone and in a batch."""
    doc = {
        "name": "inner",
        "input": {"shape": [96, 96, 8], "scale": 1.0, "mean": [0.0] * 8, "std": [1.0] * 8},
        "labels": ["a", "b", "c"],
        "layers": [
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same",
             "activation": "relu"},
            {"type": "max_pooling2d", "pool_size": 3, "strides": 2},
            {"type": "conv2d", "filters": 32, "kernel_size": 3, "strides": 2, "padding": "same",
             "activation": "linear"},
            {"type": "flatten"},
            {"type": "dense", "units": 3, "activation": "linear"},
        ],
    }  # fmt: skip
    weights = _weights(doc, 96)
    model = Model(doc, weights, plan=False)
    kernels = _kernels(model, 3)
    assert kernels[:4] == ["pad_input", "conv_wino", "pool2d", "conv_raw"], kernels
    x = np.random.default_rng(96).standard_normal((3, 96, 96, 8)).astype(np.float32)
    assert_forward_matches_reference(model, doc, weights, x, rtol=1e-5)
    rows = model.forward(x)
    for i in range(3):
        np.testing.assert_array_equal(model.forward(x[i : i + 1])[0], rows[i])


@pytest.mark.parametrize("channels,filters", [(8, 16), (16, 64), (20, 70), (37, 32), (64, 20)])
def test_winograd_convolutions_match_numpy_reference(channels, filters):
    """3x3 stride-1 layers with 8 or more input channels run as Winograd F(2x2, 3x3): whole and
    partial vectors of 16 channels in both transforms, odd and even output sizes (edge tiles
    that are half outside), max or average pooled or not, every activation, raw input
    preprocessed in the padding copy, batches of 1 and 4 (the channel-split tasks of small
    batches)."""
    rng = np.random.default_rng(channels * 100 + filters)
    shapes = ((3, 3), (4, 5), (7, 6), (10, 13))
    for (h, w), act in zip(shapes, ACTIVATIONS + ["relu"]):
        for pool, padding in (
            ("max", "valid"),
            (None, "same"),
            (None, "valid"),
            ("max", "same"),
            ("average", "valid"),
            ("average", "same"),
        ):
            if pool and padding == "valid" and min(h, w) < 4:
                continue
            layers = [
                {
                    "type": "conv2d",
                    "filters": filters,
                    "kernel_size": 3,
                    "padding": padding,
                    "activation": act if not pool or act != "softmax" else "relu",
                }
            ]
            if pool:
                layers.append({"type": f"{pool}_pooling2d", "pool_size": 2})
            layers += [{"type": "flatten"}, {"type": "dense", "units": 4, "activation": "linear"}]
            doc = {
                "name": "wino",
                "input": {
                    "shape": [h, w, channels],
                    "scale": 0.5,
                    "mean": [0.1] * channels,
                    "std": [0.8] * channels,
                },
                "labels": ["a", "b", "c", "d"],
                "layers": layers,
            }
            weights = _weights(doc, channels + filters + h)
            model = Model(doc, weights)
            assert _kind(model._plan.steps[0]) == ("WinogradConv+pool" if pool else "WinogradConv")
            direct = Model(doc, weights, winograd=False)  # the plan's explicit opt-out
            assert _kind(direct._plan.steps[0]) == ("DirectConv+pool" if pool else "DirectConv")
            for n in (1, 4):
                x = rng.standard_normal((n, h, w, channels)).astype(np.float32)
                where = f"{h}x{w}, {act}, pool {pool}, {padding}, batch {n}"
                expected = ref.forward(doc, weights, x)
                for plan in (model, direct):
                    np.testing.assert_allclose(
                        plan.forward(x), expected, atol=TOLERANCE, rtol=1e-5, err_msg=where
                    )
                pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
                np.testing.assert_allclose(
                    model.predict(pixels),
                    ref.forward(doc, weights, pixels, preprocess=True),
                    atol=TOLERANCE,
                    rtol=1e-5,
                    err_msg=where + ", raw pixels",
                )


def test_a_model_may_end_with_flatten():
    """The last step is then a view of the one before: the result must still be computed."""
    doc = {
        "input": {"shape": [6, 5, 2]},
        "layers": [
            {"type": "conv2d", "filters": 3, "kernel_size": 3, "activation": "tanh"},
            {"type": "flatten"},
        ],
    }
    weights = _weights(doc, 11)
    model = Model(doc, weights)
    for n in (1, 40):  # one chunk and several
        x = np.random.default_rng(n).standard_normal((n, 6, 5, 2)).astype(np.float32)
        assert_forward_matches_reference(model, doc, weights, x, rtol=1e-5)


def test_random_architectures_match_numpy_reference(cases):
    for doc, weights, model, x in cases:
        expected = ref.forward(doc, weights, x)
        got = model.forward(x)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE, doc


def test_conv_weights_in_rows_and_in_strips_give_the_same_bits(cases, monkeypatch):
    """Conv weights packed as rows of all channels (AVX-512) or in strips of 16 channels (AVX2,
    `gemm.STRIPS`), whichever this machine uses: the random architectures, and the presets on
    every Winograd variant, match the NumPy reference both ways, bit for bit alike."""
    from convserve.core.kernels import gemm

    models = [(doc, weights, x, None) for doc, weights, _, x in cases]
    rng = np.random.default_rng(5)
    for name in PRESET_NAMES:
        doc = preset(name)
        arch = parse_architecture(doc)
        x = rng.standard_normal((3, *arch.input_shape)).astype(np.float32)
        for variant in ("winograd", "winograd4", "winograd5"):
            plan = {
                layer.index: variant
                for layer in arch.layers
                if layer.type == "conv2d" and variant in _variants(arch, layer.index)
            }
            if plan:
                models.append((doc, _weights(doc, 3), x, plan))
    assert len(models) > N_RANDOM + 2  # Winograd plans of the presets were added
    for doc, weights, x, plan in models:
        results = []
        for strips in (False, True):
            monkeypatch.setattr(gemm, "STRIPS", strips)
            model = InferencePlan(parse_architecture(doc), weights, plan)
            results.append(model.run(x))
        expected = ref.forward(doc, weights, x)
        assert np.abs(results[0] - expected).max() <= TOLERANCE, (doc["name"], plan)
        np.testing.assert_array_equal(results[1], results[0], err_msg=f"{doc['name']} {plan}")


def _variants(arch, index: int) -> tuple[str, ...]:
    from convserve.core.layers.fusion import blocks

    for block in blocks(arch.layers, inference=True):
        if block.layer.index == index:
            return block.layer.inference_variants(block)
    return ()


def test_predict_applies_preprocessing_in_the_kernels(cases):
    rng = np.random.default_rng(7)
    for doc, weights, _, x in cases[:8]:
        c = x.shape[-1]
        doc = {
            **doc,
            "input": {
                **doc["input"],
                "scale": 1 / 255,
                "mean": list(rng.random(c).round(3)),
                "std": list((rng.random(c) * 0.5 + 0.2).round(3)),
            },
        }
        model = Model(doc, weights)
        pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
        expected = ref.forward(doc, weights, pixels, preprocess=True)
        assert np.abs(model.predict(pixels) - expected).max() <= TOLERANCE
        assert np.abs(model.predict(pixels.astype(np.float64)) - expected).max() <= TOLERANCE


def test_softmax_hidden_dense_layer_at_every_batch_size():
    """The last two dense layers run as one region for small batches: a softmax in the first
    of them must still be applied there (and in the serial and parallel paths of larger ones)."""
    doc = {
        "name": "hidden-softmax",
        "input": {"shape": [6, 6, 2], "scale": 1.0, "mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "labels": ["a", "b", "c"],
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": 200, "activation": "softmax"},
            {"type": "dense", "units": 3, "activation": "linear"},
        ],
    }
    weights = _weights(doc, 11)
    model = Model(doc, weights)
    rng = np.random.default_rng(12)
    for n in (1, 3, 5, 7, 8, 40):
        x = rng.standard_normal((n, 6, 6, 2)).astype(np.float32)
        assert_forward_matches_reference(model, doc, weights, x, where=f"batch {n}")


def _dense_plans(doc: dict, weights: dict) -> dict[str, InferencePlan]:
    """The model run with every dense layer on each of its variants (`passes`, `one_pass`,
    `strips`)."""
    arch = parse_architecture(doc)
    wide = [layer.index for layer in arch.layers if layer.type == "dense"]
    wide = [i for i in wide if arch.layers[i].input_shape[0] > K_CHUNK]
    assert wide, "the test needs a dense layer with a choice of variants"
    variants = ("passes", "one_pass", "strips")
    return {v: InferencePlan(arch, weights, {i: v for i in wide}) for v in variants}


def _check_dense_variants(doc: dict, weights: dict, x: np.ndarray, batches, singles) -> None:
    """Each dense variant matches the NumPy reference at `batches`, every row of x is
    bit-identical to its single-image call (rows `singles`), and the variants agree bit for bit
    (each output is the same in-order chain of fused multiply-adds)."""
    results = {}
    for variant, plan in _dense_plans(doc, weights).items():
        for n in batches:
            expected = ref.forward(doc, weights, x[:n])
            where = f"{variant}, batch {n}"
            np.testing.assert_allclose(plan.run(x[:n]), expected, atol=TOLERANCE, err_msg=where)
        whole = results[variant] = plan.run(x)
        for i in singles:
            np.testing.assert_array_equal(plan.run(x[i : i + 1])[0], whole[i], err_msg=variant)
    np.testing.assert_array_equal(results["passes"], results["one_pass"])
    np.testing.assert_array_equal(results["strips"], results["one_pass"])


def _two_dense_layers(inputs: int, hidden: tuple[int, str], last: tuple[int, str]) -> dict:
    """A model of `inputs` features: flatten, then dense layers of (units, activation)."""
    return {
        "name": "two-dense",
        "input": {"shape": [inputs, 1, 1], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "labels": [str(i) for i in range(last[0])],
        "layers": [
            {"type": "flatten"},
            *({"type": "dense", "units": u, "activation": a} for u, a in (hidden, last)),
        ],
    }


@pytest.mark.parametrize("inputs", [4100, 9000, 20000])
def test_wide_dense_layers(inputs):
    """Dense layers with thousands of inputs, in passes of K_CHUNK inputs (a single row: one
    pass) or all at once (`one_pass`): the NumPy reference at batch sizes across the tasks, and
    each row bit-identical to its single-image call."""
    doc = _two_dense_layers(inputs, (90, "tanh"), (5, "linear"))
    weights = _weights(doc, inputs)
    rng = np.random.default_rng(inputs)
    x = rng.standard_normal((45, inputs, 1, 1)).astype(np.float32)
    _check_dense_variants(doc, weights, x, (1, 8, 33, 45), (0, 31, 32, 44))


@pytest.mark.parametrize("units", [64, 80, 96, 112, 176, 300])
def test_dense_strips_in_groups_pairs_and_single_strips(units):
    """Weights in strips of 16 units: with AVX-512, 3-8 rows go over pairs of strips in one
    call and more rows over groups of four strips 4-6 rows a call, the strips left over as a
    pair and a single strip (`kdense._strip_groups`; the units here leave 0-3 strips over).
    At 1-20 rows and at 70 (tasks split between threads), on both turns (groups from either
    end): the reference, the same bits as blocks of 64 units, and every row as alone."""
    doc = _two_dense_layers(150, (units, "relu"), (9, "softmax"))
    weights = _weights(doc, units)
    x = np.random.default_rng(units).standard_normal((70, 150, 1, 1)).astype(np.float32)
    plans = _dense_plans(doc, weights)
    for n in (*range(1, 21), 70):
        expected = ref.forward(doc, weights, x[:n])
        runs = {v: _runs_on_both_turns(plan, x[:n]) for v, plan in plans.items()}
        for variant, (odd, even) in runs.items():
            where = f"{variant}, {units} units, batch {n}"
            np.testing.assert_allclose(odd, expected, atol=TOLERANCE, err_msg=where)
            np.testing.assert_array_equal(odd, even, err_msg=where)
            np.testing.assert_array_equal(odd, runs["one_pass"][0], err_msg=where)
    whole = plans["strips"].run(x)
    for i in (0, 3, 7, 8, 69):
        np.testing.assert_array_equal(plans["strips"].run(x[i : i + 1])[0], whole[i])


@pytest.mark.parametrize("units", [48, 80, 96, 112, 183, 300])
def test_few_rows_split_their_units_at_any_16_with_the_same_bits(units):
    """One row, and 3, 7 and 8 rows (up to FEW_ROWS), in blocks of 64 units go to 1-5
    threads' parts of whole 16s, a part starting or ending inside a block (with AVX-512;
    `kdense._one_row` for one row): every activation, on both turns, matches float64 and is
    bit-identical to the rows in a batch of nine, where whole blocks go through other
    micro-kernels (tanh and sigmoid stored the same way there: `elementwise._store_curved`)."""
    from convserve.core import aligned
    from convserve.core.kernels import dense as kdense
    from convserve.core.layers.dense import pack_dense

    rng = np.random.default_rng(units)
    inputs = 566
    kernel = (rng.standard_normal((inputs, units)) / np.sqrt(inputs)).astype(np.float32)
    bias = rng.standard_normal(units).astype(np.float32)
    wk, b = pack_dense(kernel, bias)
    wk = aligned.on_cache_line(wk)
    x = rng.standard_normal((9, inputs)).astype(np.float32)
    tiles = aligned.zeros((5, kdense.tile_floats()))
    sums = x.astype(np.float64) @ kernel + bias
    expected = {0: sums, 1: np.maximum(sums, 0), 2: np.tanh(sums), 3: 1 / (1 + np.exp(-sums))}
    for act, want in expected.items():
        for turn in (0, 1):
            odd = np.full(1, turn, np.int64)
            batch = np.empty((9, units), np.float32)
            rows, splits = kdense.dense_tasks(9, -(-b.size // 64), 2, False)
            kdense.dense(x, wk, b, tiles, batch, act, rows, splits, K_CHUNK, 64, odd)
            np.testing.assert_allclose(batch, want, atol=TOLERANCE)
            for splits in range(1, 6):
                one = np.empty((1, units), np.float32)
                kdense.dense(x[4:5].copy(), wk, b, tiles, one, act, 1, splits, 0, 64, odd)
                where = f"activation {act}, turn {turn}, {splits} parts"
                np.testing.assert_array_equal(one[0], batch[4], err_msg=where)
                for n in (3, 7, 8):  # up to FEW_ROWS rows in parts of 16s too
                    few = np.empty((n, units), np.float32)
                    kdense.dense(x[:n].copy(), wk, b, tiles, few, act, n, splits, K_CHUNK, 64, odd)
                    np.testing.assert_array_equal(few, batch[:n], err_msg=f"{where}, {n} rows")


def test_dense_tasks_split_rows_where_a_layer_has_few_units_a_row():
    """Tasks take ranges of units while a layer has more than UNITS_PER_ROW units (in 64s) per
    batch row, else groups of rows (each thread's input then stays in its own cache); softmax
    always by rows; one thread: the fewest tasks of at most MAX_TASK_ROWS rows."""
    from convserve.core.kernels import dense as kdense

    per = kdense.UNITS_PER_ROW
    # (n, blocks, softmax): ways; 320 units <= 2 x 256 rows, > 2 x 128 rows; 128 <= 2 x 64
    cases = {(256, 5, False): 1, (128, 5, False): 2, (64, 2, False): 1, (63, 2, False): 2}
    cases.update({(8, 16, False): 2, (8, 16, True): 1, (1, 4, False): 2, (1, 1, False): 1})
    for (n, blocks, softmax), ways in cases.items():
        assert kdense.dense_tasks(n, blocks, 2, softmax)[1] == ways, (n, blocks, softmax)
    for n in range(1, 300, 7):
        for blocks in (1, 2, 5, 16):
            rows, ways = kdense.dense_tasks(n, blocks, 2, False)
            assert ways == 1 or 64 * blocks > per * n
            if ways == 1 and n > kdense.SIX:  # groups of rows: one for each thread
                assert -(-n // rows) == 2, (n, blocks, rows)
            rows, ways = kdense.dense_tasks(n, blocks, 1, False)  # one thread: as few as fit
            assert ways == 1 and -(-n // rows) == -(-n // kdense.MAX_TASK_ROWS)


@pytest.mark.parametrize("inputs", [1024, 3072])
def test_dense_rows_4_kb_apart_go_in_one_pass_over_many_rows(inputs):
    """Inputs a multiple of 1,024 (rows 4 KB apart): `passes` takes tasks of more than
    ALIASED_PASS_ROWS rows through each block in one pass, fewer in passes; the reference, the
    same bits as `one_pass` and `strips`, and every row as alone, at 1-200 rows."""
    doc = _two_dense_layers(inputs, (150, "relu"), (6, "softmax"))
    weights = _weights(doc, inputs + 1)
    x = np.random.default_rng(inputs).standard_normal((200, inputs, 1, 1)).astype(np.float32)
    _check_dense_variants(doc, weights, x, (1, 8, 64, 65, 130, 200), (0, 63, 64, 65, 129, 199))


@pytest.mark.parametrize("seed", range(6))
def test_dense_layers_on_random_shapes(seed):
    """A dense-only model (it runs up to MAX_TASK_ROWS rows at once) on random widths (last
    blocks of 16, 32 and 48 units), input counts (passes of K_CHUNK inputs and a remainder, or
    one pass), activations (softmax too) and batch sizes (six rows a call, the last 1-9 rows in one call or
    two, groups of rows, ranges of units, a batch in two chunks): the NumPy
    reference, and every row bit-identical to its single-image call."""
    rng = np.random.default_rng(300 + seed)
    inputs = int(rng.integers(K_CHUNK + 1, 700))  # every first layer has the choice
    acts = ["relu", "linear", "tanh", "softmax", "sigmoid", "relu"]
    doc = {
        "name": "packed",
        "input": {"shape": [inputs, 1, 1], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "labels": [str(i) for i in range(7)],
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": int(rng.integers(33, 300)), "activation": acts[seed]},
            {"type": "dense", "units": int(rng.choice([48, 40, 100, 64])), "activation": "relu"},
            {"type": "dense", "units": 7, "activation": "softmax"},
        ],
    }
    weights = _weights(doc, seed)
    x = rng.standard_normal((300, inputs, 1, 1)).astype(np.float32)
    batches = (2, 5, 7, 8, 9, 14, 16, 37, 131, 300)
    _check_dense_variants(doc, weights, x, batches, range(0, 300, 7))


def _runs_on_both_turns(plan: InferencePlan, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`plan` on x with its run count made odd, then even (`InferencePlan._turn`: the dense and
    Winograd kernels read their weight blocks from the last on odd runs); each run (each
    chunk of a large batch) counts."""
    results = []
    for before in (0, 1):
        plan._turn[0] = before
        results.append(plan.run(x))
        assert plan._turn[0] == before + -(-x.shape[0] // plan.chunk)
    return results[0], results[1]


@pytest.mark.parametrize(
    "layers",
    [
        [("flatten",), ("dense", 1024, "relu"), ("dense", 300, "tanh"), ("dense", 7, "softmax")],
        [
            ("conv2d", 16, 3, 1),
            ("conv2d", 32, 5, 2),
            ("conv2d", 24, 5, 1),
            ("flatten",),
            ("dense", 5, "linear"),
        ],
    ],
    ids=["dense", "conv"],
)
def test_weight_blocks_read_from_either_end_give_the_same_bits(layers):
    """Odd and even runs (weight blocks from the last and from the first: whole and half
    64-unit blocks, pairs of them for one row, strips of 16 units; Winograd products) give
    bit-identical results, with every variant of every layer and at batch sizes that take
    each path (one row, a row pair, 6-row calls and their remainders, several tasks), and
    match the reference."""
    built = []
    for layer in layers:
        if layer[0] == "dense":
            built.append({"type": "dense", "units": layer[1], "activation": layer[2]})
        elif layer[0] == "conv2d":
            conv = {"type": "conv2d", "filters": layer[1], "kernel_size": layer[2]}
            built.append({**conv, "strides": layer[3], "padding": "same", "activation": "relu"})
        else:
            built.append({"type": layer[0]})
    shape = [300, 1, 1] if layers[0][0] == "flatten" else [12, 12, 3]
    doc = {
        "name": "turns",
        "input": {"shape": shape, "scale": 1.0, "mean": [0.0] * shape[2], "std": [1.0] * shape[2]},
        "labels": [str(i) for i in range(layers[-1][1])],
        "layers": built,
    }
    weights = _weights(doc, len(layers))
    arch = parse_architecture(doc)
    x = np.random.default_rng(41).standard_normal((40, *arch.input_shape)).astype(np.float32)
    indices = [i for i in default_plan(arch) if len(_variants(arch, i)) > 1]
    assert indices
    most = max(len(_variants(arch, i)) for i in indices)
    for k in range(most):
        chosen = {i: _variants(arch, i)[min(k, len(_variants(arch, i)) - 1)] for i in indices}
        plan = InferencePlan(arch, weights, chosen)
        for n in (1, 2, 7, 13, 40):
            odd, even = _runs_on_both_turns(plan, x[:n])
            np.testing.assert_array_equal(odd, even, err_msg=f"{chosen}, batch {n}")
            expected = ref.forward(doc, weights, x[:n])
            np.testing.assert_allclose(odd, expected, atol=TOLERANCE, err_msg=f"{chosen}")


@pytest.mark.parametrize("seed", range(8))
def test_pooling_kernel_on_random_windows(seed):
    """The separate pooling kernel (windows the conv kernels do not fuse), max and average, on
    random shapes, windows of 1-4 x 1-4 cells, strides 1-4 and `same` padding, so that windows
    hold 1, 2, 3 and more real cells (a max goes through 0, 1, 2 and more steps by turns in
    its scratch rows): the NumPy reference, exactly for max."""
    rng = np.random.default_rng(900 + seed)
    for _ in range(12):
        n, h, w, c = (int(v) for v in rng.integers(1, [4, 12, 12, 70]))
        ph, pw = (int(v) for v in rng.integers(1, 5, 2))
        sh, sw = (int(v) for v in rng.integers(1, 5, 2))
        padding = str(rng.choice(["valid", "same"]))
        if padding == "valid" and (ph > h or pw > w):
            continue
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        for kind in ("max", "average"):
            want = ref.pool2d(x, (ph, pw), (sh, sw), padding, "max" if kind == "max" else "avg")
            doc = {
                "name": "pool",
                "input": {"shape": [h, w, c], "scale": 1.0, "mean": [0.0], "std": [1.0]},
                "labels": [str(i) for i in range(want[0].size)],
                "layers": [
                    {
                        "type": f"{kind}_pooling2d",
                        "pool_size": [ph, pw],
                        "strides": [sh, sw],
                        "padding": padding,
                    },
                    {"type": "flatten"},
                ],
            }
            layer = parse_architecture(doc).layers[0]
            out = np.full((n, *layer.output_shape), np.nan, np.float32)
            pt, pl = layer.pads[0], layer.pads[2]
            kpool.pool2d(x, out, ph, pw, sh, sw, pt, pl, kind == "average")
            if kind == "max":
                np.testing.assert_array_equal(out, want.astype(np.float32))
            else:
                np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inputs", [1, 3, 6, 130, 4096, 8195])
def test_dense_layers_of_at_most_16_units(inputs):
    """Layers of 1-16 units have a kernel of their own (each sum as four chains over consecutive
    parts of the inputs, the last part with the rest, inputs fewer than four included; 4,096
    inputs: 4-6 rows compute the parts one after another): the NumPy reference at batch sizes
    1-13 and 40 (six rows a call and the rest, on the calling thread or in parallel tasks), and
    every row bit-identical to its single-image call."""
    rng = np.random.default_rng(inputs)
    acts = ["relu", "linear", "tanh", "sigmoid", "softmax"]
    doc = {
        "name": "narrow-dense",
        "input": {"shape": [inputs, 1, 1], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "labels": [str(i) for i in range(3)],
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": int(rng.integers(1, 17)), "activation": acts[inputs % 5]},
            {"type": "dense", "units": 16, "activation": "tanh"},
            {"type": "dense", "units": 3, "activation": "softmax"},
        ],
    }
    weights = _weights(doc, inputs)
    plan = InferencePlan(parse_architecture(doc), weights)
    x = rng.standard_normal((40, inputs, 1, 1)).astype(np.float32)
    for n in (*range(1, 14), 40):
        expected = ref.forward(doc, weights, x[:n])
        np.testing.assert_allclose(plan.run(x[:n]), expected, atol=TOLERANCE, err_msg=f"batch {n}")
    whole = plan.run(x)
    for i in (0, 5, 6, 7, 39):
        np.testing.assert_array_equal(plan.run(x[i : i + 1])[0], whole[i], err_msg=f"row {i}")


def test_dense_first_models_read_preprocessed_input_as_given_and_never_write_it():
    """On preprocessed input a model whose first computing layer is dense skips the
    preprocessing copy and reads the caller's array: the array stays as it was and the results
    match the reference; a standalone activation first (it works in place) keeps the copy; raw
    pixels still get the model's preprocessing."""
    rng = np.random.default_rng(41)
    for first, skips in (
        ({"type": "dense", "units": 12, "activation": "relu"}, True),
        ({"type": "activation", "activation": "tanh"}, False),
    ):
        doc = {
            "name": "dense_first",
            "input": {"shape": [5, 4, 2], "scale": 1 / 255, "mean": [0.1, 0.2], "std": [0.5, 0.25]},
            "labels": ["a", "b", "c"],
            "layers": [
                {"type": "flatten"},
                first,
                {"type": "dense", "units": 3, "activation": "softmax"},
            ],
        }
        weights = _weights(doc, 7)
        model = Model(doc, weights)
        assert model._plan._flat_input is skips
        for n in (1, 9):
            x = rng.standard_normal((n, 5, 4, 2)).astype(np.float32)
            before = x.copy()
            assert_forward_matches_reference(model, doc, weights, x, where=f"{first}, batch {n}")
            np.testing.assert_array_equal(x, before)
            pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
            expected = ref.forward(doc, weights, pixels, preprocess=True)
            np.testing.assert_allclose(model.predict(pixels), expected, atol=TOLERANCE)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_match_numpy_reference(name):
    doc = preset(name)
    weights = _weights(doc, 3)
    model = Model(doc, weights)
    rng = np.random.default_rng(5)
    for n in (1, 3, 8, 9):
        pixels = rng.integers(0, 256, (n, *model.input_shape)).astype(np.uint8)
        got = model.predict(pixels)
        assert np.abs(got - ref.forward(doc, weights, pixels, preprocess=True)).max() <= TOLERANCE
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_batch_rows_equal_single_image_calls(cases):
    models = [c[2] for c in cases[:6]] + [
        Model(preset(n), _weights(preset(n), 1)) for n in PRESET_NAMES
    ]
    rng = np.random.default_rng(11)
    for model in models:  # 37 > BATCH_CHUNK: also checks the chunked path of large batches
        x = rng.standard_normal((37, *model.input_shape)).astype(np.float32)
        batched = model.forward(x)
        singles = np.concatenate([model.forward(x[i : i + 1]) for i in range(len(x))])
        np.testing.assert_array_equal(batched, singles)  # bit-identical: the server relies on it
        np.testing.assert_array_equal(model.forward(x[:4]), batched[:4])
        np.testing.assert_array_equal(model.forward(x[:9]), batched[:9])


@pytest.mark.parametrize("kind", ["max", "average"])
def test_same_pools_that_pad_nothing_fuse_into_the_conv(kind):
    """A 2x2/2 `same` pool on an even conv output pads nothing, so the 2x2/2 kernels take it;
    on an odd output it pads a row and a column, and the direct kernel's general pooling takes
    it. No separate pooling step either way; both match the NumPy reference."""
    rng = np.random.default_rng(17)
    for side, tiles in ((12, True), (11, False)):
        pool = {"type": f"{kind}_pooling2d", "pool_size": 2, "padding": "same"}
        conv = {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same"}
        dense = {"type": "dense", "units": 5, "activation": "softmax"}
        doc = _conv_doc([side, side, 3], [conv, pool, {"type": "flatten"}, dense])
        weights = _weights(doc, side)
        model = Model(doc, weights)
        kinds = [_kind(step) for step in model._plan.steps]
        assert kinds[0] == "DirectConv+pool" and "PoolStep" not in kinds, kinds
        assert model._plan.steps[0].tiles_2x2 == tiles
        x = rng.standard_normal((3, side, side, 3)).astype(np.float32)
        np.testing.assert_allclose(model.forward(x), ref.forward(doc, weights, x), atol=TOLERANCE)


def test_the_direct_conv_fuses_pools_of_every_shape():
    """Max and average pools of windows 1-4, strides 1-4, `valid` and `same`, after direct convs
    of kernels 1-3, strides 1-2 and 3-40 filters, every activation: fused into the conv (no
    pooling step), against the NumPy reference, and bit-identical alone and in batches (whose
    tasks are bands of pooled rows, fewer as the batch grows). The `same` conv after it reads
    the pooled rows where the pool wrote them."""
    rng = np.random.default_rng(31)
    checked = 0
    while checked < 24:
        window, stride = (int(v) for v in rng.integers(1, 5, 2))
        conv = {
            "type": "conv2d",
            "filters": int(rng.integers(3, 41)),
            "kernel_size": int(rng.integers(1, 4)),
            "strides": int(rng.integers(1, 3)),
            "padding": str(rng.choice(["valid", "same"])),
            "activation": str(rng.choice(ACTIVATIONS[:4])),
        }
        pool = {
            "type": str(rng.choice(["max_pooling2d", "average_pooling2d"])),
            "pool_size": window,
            "strides": stride,
            "padding": str(rng.choice(["valid", "same"])),
        }
        after = {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same"}
        h, w = (int(v) for v in rng.integers(4, 20, 2))
        doc = _conv_doc([h, w, 3], [conv, pool, after, {"type": "flatten"}, _DENSE5])
        if not _valid(doc):
            continue
        weights = _weights(doc, checked)
        plan = InferencePlan(parse_architecture(doc), weights, {0: "direct", 2: "direct"})
        kinds = [_kind(step) for step in plan.steps]
        assert kinds[0] == "DirectConv+pool" and "PoolStep" not in kinds, (doc, kinds)
        x = rng.standard_normal((9, h, w, 3)).astype(np.float32)
        expected = ref.forward(doc, weights, x)
        # the small batches first: no buffer holds a bigger batch's results yet
        alone = [plan.run(x[:n]) for n in (1, 2, 4)]
        batched = plan.run(x)
        np.testing.assert_allclose(batched, expected, atol=TOLERANCE, err_msg=str(doc))
        for few in alone:
            np.testing.assert_array_equal(few, batched[: len(few)])
        checked += 1


_DENSE5 = {"type": "dense", "units": 5, "activation": "softmax"}


def _conv_doc(shape, layers):
    return {"input": {"shape": shape}, "labels": [str(i) for i in range(5)], "layers": layers}


@pytest.mark.parametrize(
    "first,second,pool",
    [
        ("direct", "direct", False),
        ("direct", "winograd", True),
        ("winograd", "direct", False),
        ("winograd", "winograd4", True),
        ("winograd4", "winograd", False),
        ("winograd5", "winograd5", True),
        ("direct", "direct", True),
    ],
)
def test_convs_write_into_the_next_convs_padded_input(first, second, pool):
    """A conv followed by a `same` conv writes straight into that conv's zero-bordered input
    (no padding copy): every kernel pairing, with and without a fused pool, matches the
    reference, and batches stay bit-identical to single images."""
    size = 5 if first == "winograd5" else 3
    rng = np.random.default_rng(hash((first, second, pool)) % 2**32)
    channels = int(rng.integers(8, 40))
    convs = [
        {"type": "conv2d", "filters": channels, "kernel_size": size, "padding": "same"},
        {"type": "conv2d", "filters": 24, "kernel_size": size, "padding": "same"},
    ]
    layers = [{**convs[0], "activation": "relu"}]
    if pool:
        layers.append({"type": "max_pooling2d", "pool_size": 2})
    layers += [{**convs[1], "activation": "tanh"}, {"type": "flatten"}]
    layers.append({"type": "dense", "units": 5, "activation": "softmax"})
    h, w = 2 * int(rng.integers(6, 10)), 2 * int(rng.integers(6, 10))  # even: the pool fuses
    # a first layer to take the preprocessing, so that the pair under test are inner layers
    doc = _conv_doc(
        [h, w, 3], [{"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same"}, *layers]
    )
    weights = _weights(doc, 7)
    second_index = 3 if pool else 2
    plan = InferencePlan(parse_architecture(doc), weights, {1: first, second_index: second})
    assert plan.plan[1] == first and plan.plan[second_index] == second
    # the first conv writes into the pair's first, and that one into the pair's second
    assert plan._into_next[:2] == [True, True] and not any(plan._into_next[2:])
    x = rng.standard_normal((37, h, w, 3)).astype(np.float32)
    batched = plan.run(x)
    expected = ref.forward(doc, weights, x)
    np.testing.assert_allclose(batched, expected, atol=TOLERANCE, err_msg=f"{first}->{second}")
    for n in (1, 5):
        np.testing.assert_array_equal(plan.run(x[:n]), batched[:n])


def test_a_conv_is_not_placed_where_the_next_conv_reads_fewer_rows():
    """The 1-channel pooled kernel after a `same` conv pads its input's width to whole 32-pixel
    blocks, but on 13 rows its floor-pooled `valid` conv reads only 12: the conv before it
    writes a buffer of its own (its output would not fit), and the result is still the
    reference's."""
    doc = _conv_doc(
        [13, 13, 3],
        [
            {"type": "conv2d", "filters": 1, "kernel_size": 3, "padding": "same"},
            {"type": "conv2d", "filters": 4, "kernel_size": 3},
            {"type": "max_pooling2d", "pool_size": 2},
            {"type": "flatten"},
            {"type": "dense", "units": 5},
        ],
    )
    weights = _weights(doc, 8)
    model = Model(doc, weights, plan=False)
    plan = model._plan
    assert plan.plan[1] == "pixels_pool"
    padding = plan.steps[1].padding
    assert padding.needs_pad and padding.pt + 13 > padding.shape[0]  # a buffer, but too short
    assert plan._into_next[:2] == [False, False]
    x = np.random.default_rng(9).standard_normal((6, 13, 13, 3)).astype(np.float32)
    assert_forward_matches_reference(model, doc, weights, x)


def test_lenet5_with_sigmoid_and_average_pools_takes_the_pixel_kernel():
    """LeNet-5 as published (sigmoid, 2x2 average pools, 6 filters over one channel): its first
    layer runs on the pixels-in-the-lanes kernel with the average pool fused, and the model
    matches the NumPy reference at 1, 5 and 33 images (33: two chunks)."""
    doc = _conv_doc(
        [28, 28, 1],
        [
            {"type": "conv2d", "filters": 6, "kernel_size": 5, "padding": "same"},
            {"type": "activation", "activation": "sigmoid"},
            {"type": "average_pooling2d", "pool_size": 2},
            {"type": "conv2d", "filters": 16, "kernel_size": 5, "activation": "sigmoid"},
            {"type": "average_pooling2d", "pool_size": 2},
            {"type": "flatten"},
            {"type": "dense", "units": 5, "activation": "softmax"},
        ],
    )
    weights = _weights(doc, 12)
    model = Model(doc, weights, plan=False)
    assert model._plan.plan[0] == "pixels_pool"
    assert _kind(model._plan.steps[0]) == "PixelsPoolConv"
    x = np.random.default_rng(13).standard_normal((33, 28, 28, 1)).astype(np.float32)
    for n in (1, 5, 33):
        assert_forward_matches_reference(model, doc, weights, x[:n])


def test_results_are_fresh_arrays_and_buffers_are_reused(reference_model):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
    b = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
    first = reference_model.forward(a)
    kept = first.copy()
    plan = reference_model._plan
    buffers = [
        buf.__array_interface__["data"][0] for buf in plan._buffers_for(4) if buf is not None
    ]
    second = reference_model.forward(b)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    assert [
        buf.__array_interface__["data"][0] for buf in plan._buffers_for(4) if buf is not None
    ] == buffers
    assert first.flags.c_contiguous and first.flags.writeable


@pytest.mark.parametrize("name", ["cifar10", "wide_dense", "strided5", "overlap_pool"])
def test_every_array_the_kernels_read_or_write_starts_on_a_cache_line(name):
    """Packed weights, biases, per-thread scratch (each thread's row), activation and padding
    buffers all start on a 64-byte line, with every layer's first, second, ... variant; the
    aligned copies give the reference's results."""
    from convserve.core.bench_models import bench_model

    doc = bench_model(name)
    weights = _weights(doc, 3)
    arch = parse_architecture(doc)
    x = np.random.default_rng(5).standard_normal((3, *arch.input_shape)).astype(np.float32)
    expected = ref.forward(doc, weights, x)
    layers = list(default_plan(arch))
    most = max(len(_variants(arch, i)) for i in layers)
    for k in range(most):
        chosen = {i: _variants(arch, i)[min(k, len(_variants(arch, i)) - 1)] for i in layers}
        plan = InferencePlan(arch, weights, chosen)
        np.testing.assert_allclose(plan.run(x), expected, atol=TOLERANCE, err_msg=str(chosen))
        arrays = [plan._tiles[t] for t in range(plan._tiles.shape[0])]
        arrays += [b for b in plan._buffers_for(3) if b is not None] + list(plan._padded.values())
        for step in plan.steps:
            arrays += [v for v in vars(step).values() if isinstance(v, np.ndarray)]
        assert len(arrays) >= 2 + len(plan.steps) // 2
        misplaced = [a.shape for a in arrays if a.ctypes.data % 64 or not a.flags.c_contiguous]
        assert not misplaced, f"{chosen}: {misplaced}"


def test_aligned_arrays_keep_shape_dtype_and_contents():
    from convserve.core import aligned

    for shape, dtype in (((3, 5, 7), np.float32), (13, np.int64), ((0, 4), np.float32)):
        z = aligned.zeros(shape, dtype)
        assert z.shape == (shape if isinstance(shape, tuple) else (shape,)) and z.dtype == dtype
        assert (z.size == 0 or z.ctypes.data % aligned.CACHE_LINE == 0) and not z.any()
    src = np.arange(100, dtype=np.float32)[1:].reshape(9, 11)  # 4 bytes past numpy's start
    moved = aligned.on_cache_line(src)
    assert moved.ctypes.data % aligned.CACHE_LINE == 0
    np.testing.assert_array_equal(moved, src)
    assert aligned.on_cache_line(moved) is moved


def test_concurrent_calls_from_threads(reference_model):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 28, 28, 1)).astype(np.float32) for n in (1, 3, 8, 1, 16, 3)]
    expected = [reference_model.forward(x) for x in batches]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(15):
            i = (k + _) % len(batches)
            if np.abs(reference_model.forward(batches[i]) - expected[i]).max() > 0:
                errors.append(f"thread {k} batch {i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_runtime_configuration():
    from convserve.core import runtime

    runtime.configure()
    assert runtime.threading_layer() in ("omp", "tbb", "not started")
    assert "threading layer" in runtime.describe()


def test_the_register_file_follows_the_cpu_features(monkeypatch):
    """The kernels' blocks are sized for the register file of the features numba compiles for:
    AVX-512's 32 registers of 16 floats, AVX2's 16 of 8, else SSE's 16 of 4."""
    from convserve.core import runtime

    for features, expected in (
        ("+sse2,+avx,+avx2,+fma,+avx512f,+avx512bw,-prefer-256-bit", (32, 16)),
        ("+sse2,+avx,+avx2,+fma,-avx512f", (16, 8)),
        ("+sse2,+sse4.2,-avx,-avx2", (16, 4)),
    ):
        monkeypatch.setenv("NUMBA_CPU_FEATURES", features)
        assert runtime.vector_registers() == expected, features
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")  # a CPU named without features: baseline
    assert runtime.vector_registers() == (16, 4)
    monkeypatch.delenv("NUMBA_CPU_NAME")
    host = runtime.vector_registers()  # the host's own
    assert host[0] * host[1] // 16 in (4, 8, 32)
    assert f"{host[0]} vector registers of {host[1]} floats" in runtime.describe()


# -- ONNX Runtime and torch -----------------------------------------------------------------------
HAVE_ORT = (
    importlib.util.find_spec("onnxruntime") is not None
    and importlib.util.find_spec("onnx") is not None
)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime/onnx not installed")
def test_random_architectures_match_onnxruntime(cases):
    from convserve.core.bench import ort_session
    from convserve.core.interop.onnx_export import onnx_model

    for doc, weights, model, x in cases:
        session = ort_session(onnx_model(doc, weights), threads=1)
        expected = session.run(["output"], {"input": x})[0]
        assert np.abs(model.forward(x) - expected).max() <= TOLERANCE, doc


def _torch_forward(doc: dict, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same architecture with torch.nn.functional (NCHW), pads made explicit."""
    import torch
    import torch.nn.functional as F

    arch = parse_architecture(doc)
    acts = {
        "linear": lambda t, d: t,
        "relu": lambda t, d: F.relu(t),
        "tanh": lambda t, d: torch.tanh(t),
        "sigmoid": lambda t, d: torch.sigmoid(t),
        "softmax": lambda t, d: F.softmax(t, dim=d),
    }
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        for layer in arch.layers:
            top, bottom, left, right = layer.pads
            kernel = weights.get(f"layers.{layer.index}.kernel")
            bias = weights.get(f"layers.{layer.index}.bias")
            bias_t = None if bias is None else torch.from_numpy(bias)
            if layer.type == "conv2d":
                t = F.conv2d(
                    F.pad(t, (left, right, top, bottom)),
                    torch.from_numpy(kernel).permute(3, 2, 0, 1),
                    bias_t,
                    stride=layer.strides,
                )
                t = acts[layer.activation](t, 1)
            elif layer.type == "max_pooling2d":
                t = F.max_pool2d(
                    F.pad(t, (left, right, top, bottom), value=-float("inf")),
                    layer.pool_size,
                    layer.strides,
                )
            elif layer.type == "average_pooling2d":
                total = F.avg_pool2d(
                    F.pad(t, (left, right, top, bottom)),
                    layer.pool_size,
                    layer.strides,
                    divisor_override=1,
                )
                ones = torch.ones_like(t[:1, :1])
                count = F.avg_pool2d(
                    F.pad(ones, (left, right, top, bottom)),
                    layer.pool_size,
                    layer.strides,
                    divisor_override=1,
                )
                t = total / count
            elif layer.type == "flatten":
                t = t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
            elif layer.type == "dense":
                t = F.linear(t, torch.from_numpy(kernel).T, bias_t)
                t = acts[layer.activation](t, 1)
            elif layer.type == "activation":
                t = acts[layer.activation](t, 1)
    return t.numpy()


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_random_architectures_match_torch(cases):
    for doc, weights, model, x in cases:
        expected = _torch_forward(doc, weights, x)
        assert np.abs(model.forward(x) - expected).max() <= TOLERANCE, doc


def test_core_does_not_import_torch_or_onnxruntime():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from convserve.core import Model; from convserve.core.presets import preset; "
        "from tests.conftest import random_weights; d = preset('lenet5'); "
        "Model(d, random_weights(d)).predict(np.zeros((1, 28, 28, 1), np.uint8)); "
        "import convserve.core.bench; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- the benchmark's ceiling ----------------------------------------------------------------------
def test_the_peak_loop_computes_the_product_it_times():
    from convserve.core.kernels import peak

    a, b, c = peak.peak_operands(2, seed=3)
    peak._repeat_on_every_thread(a, b, c, 3)
    rows, cols, k = peak.PEAK_ROWS, peak.PEAK_COLS, peak.PEAK_K
    for t in range(2):
        expected = a[t].reshape(rows, k).astype(np.float64) @ b[t].reshape(k, cols)
        np.testing.assert_allclose(c[t].reshape(rows, cols), expected, rtol=1e-4, atol=1e-3)
    assert 0 < peak.peak_gflops(rounds=1, seconds=0.01) < 1e6


def test_the_fma_peak_loop_runs_every_multiply_add_it_counts():
    """Each accumulator after `steps` links of x -> 0.999 x + 0.001, as float32 fused
    multiply-adds (computed exactly in float64, then rounded) give; a rate is measured."""
    from convserve.core.kernels import peak

    data = peak.fma_operands(2)
    data[1, 32:] = np.linspace(-2, 2, data.shape[1] - 32, dtype=np.float32)
    start = data.copy()
    steps = 37
    peak._fma_on_every_thread(data, steps)
    expected = start[:, 32:]
    for _ in range(steps):
        exact = expected.astype(np.float64) * np.float32(0.999) + np.float32(0.001)
        expected = exact.astype(np.float32)
    np.testing.assert_array_equal(data[:, 32:], expected)
    np.testing.assert_array_equal(data[:, :32], start[:, :32])
    assert 0 < peak.fma_peak_gflops(rounds=1, seconds=0.01) < 1e6


def test_the_read_loop_reads_every_float_it_times():
    from convserve.core.kernels import peak

    parts = np.random.default_rng(5).random((2, 1003), dtype=np.float32)
    sums = np.zeros(2, np.float32)
    peak._read_on_every_thread(parts, sums, 3)
    np.testing.assert_allclose(sums, 3 * parts.astype(np.float64).sum(axis=1), rtol=1e-5)
    assert 0 < peak.read_gbps(1 << 20, rounds=1, seconds=0.01) < 1e5


def test_the_bench_report_gives_each_cell_its_share_of_the_roofline():
    from convserve.core.bench import report

    ms = {"m": {"ours": {1: 2.0, 8: 4.0}, "ort": {1: 3.0, 8: 4.0}}}
    flops = {"m": (4e6, 2e6)}  # per image: direct-equivalent, actual
    # 10 MB of weights read at 10, 20 or 30 GB/s: at least 0.5 ms a batch (median rate)
    reads = {"m": (10_000_000, [10.0, 30.0, 20.0])}
    lines, summary = report(ms, flops, {"m": {}}, [100.0], [1, 8], [40.0, 10.0, 20.0], reads)
    one, eight = summary["cells"]
    # batch 1: 2 MFLOP at 20 GFLOP/s is 0.1 ms, shorter than the 0.5 ms read: read-bound
    assert one["floor_ms"] == pytest.approx(0.5) and one["roofline_share"] == pytest.approx(0.25)
    # batch 8: 16 MFLOP at 20 GFLOP/s is 0.8 ms, longer than the read: compute-bound
    assert eight["floor_ms"] == pytest.approx(0.8)
    assert eight["roofline_share"] == pytest.approx(0.2)
    assert "| m | 8 | 4.000 | 4.000 | 1.00x | 8 | 4 | 20 | 20 |" in lines
    assert "m: weights 10.00 MB, read by every thread at 10-30 GB/s (median 20)" in lines
    assert summary["weights_read"]["m"]["gbps_median"] == 20.0


def test_the_bench_counts_the_multiplies_each_kernel_does():
    """Direct-equivalent and actual FLOPs per image: a 5x5/2 conv over 16 channels (12x12 ->
    6x6, 8 filters) run direct, then over its input's phases (F(4x4, 3x3), 36 products per
    4x4 tile over 64 phase channels), then a 3x3 `same` F(2x2, 3x3) conv (16 per 2x2 tile);
    then the first as a 7x7 stride-1 conv in 3x3 blocks."""
    from convserve.core.bench import flops_per_image

    conv = {"type": "conv2d", "filters": 8, "kernel_size": 5, "strides": 2, "padding": "same"}
    doc = {
        "input": {"shape": [12, 12, 16]},
        "layers": [conv, {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same"}]
        + [{"type": "flatten"}],
    }
    first = 2.0 * 36 * 8 * 25 * 16  # 36 outputs of 8 filters, 25 taps over 16 channels
    second = 2.0 * 36 * 4 * 9 * 8
    assert flops_per_image(doc, {}) == (first + second, first + second)
    phases = 2.0 * 36 * (2 * 2) * (4 * 16) * 8  # 2 x 2 tiles of 4 x 4 outputs
    winograd = 2.0 * 16 * (3 * 3) * 8 * 4  # 3 x 3 tiles of 2 x 2 outputs
    plan = {0: "winograd4_phases", 1: "winograd"}
    assert flops_per_image(doc, plan) == (first + second, phases + winograd)
    # a 7x7 `same` stride-1 conv in 3 x 3 blocks of 3x3: F(4x4, 3x3) over 9 * 16 channels
    doc["layers"][0] = {**conv, "kernel_size": 7, "strides": 1}
    first = 2.0 * 144 * 8 * 49 * 16  # 12 x 12 outputs
    split = 2.0 * 36 * (3 * 3) * (9 * 16) * 8  # 3 x 3 tiles of 4 x 4 outputs
    second = 2.0 * 144 * 4 * 9 * 8
    winograd = 2.0 * 16 * (6 * 6) * 8 * 4
    plan = {0: "winograd4_split", 1: "winograd"}
    assert flops_per_image(doc, plan) == (first + second, split + winograd)


def test_the_bench_report_gives_each_cell_its_share_of_the_peak():
    from convserve.core.bench import report

    ms = {"m": {"ours": {1: 2.0, 8: 4.0}, "ort": {1: 3.0, 8: 4.0}}}
    flops = {"m": (4e6, 2e6)}  # per image: direct-equivalent, actual
    lines, summary = report(ms, flops, {"m": {}}, [100.0], [1, 8], [40.0, 10.0, 20.0])
    one, eight = summary["cells"]
    assert one["gflops_actual"] == pytest.approx(1.0)  # 2 MFLOP in 2 ms
    assert one["peak_share"] == pytest.approx(1.0 / 20.0)  # the median ceiling
    assert eight["peak_share"] == pytest.approx(4.0 / 20.0)
    assert summary["peak_gflops"]["median"] == 20.0
    assert "| m | 8 | 4.000 | 4.000 | 1.00x | 8 | 4 | 20 |" in lines
    from convserve.core.kernels import peak

    block = f"{peak.PEAK_ROWS}x{peak.PEAK_COLS}"
    assert any(line.startswith(f"ceiling, our {block} micro-kernel") for line in lines)
    assert not any(line.startswith("machine FP32 peak") for line in lines)
    fma = [25.0, 40.0, 30.0]
    lines, summary = report(ms, flops, {"m": {}}, [100.0], [1, 8], [20.0], None, fma)
    assert summary["fma_peak_gflops"] == {"min": 25.0, "max": 40.0, "median": 30.0}
    assert (
        "machine FP32 peak, multiply-adds on registers alone on every thread: 25-40 GFLOP/s "
        "(median 30); the ceiling is 67 % of it"
    ) in lines
