"""The kernel planner: every variant it can choose against the NumPy reference on randomized
shapes, batch invariance for a fixed plan, the choice itself and its on-disk cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.architecture import parse_architecture
from convserve.core.inference import BATCH_CHUNK, InferencePlan, default_plan
from convserve.core.kernels.gemm import WIDE
from convserve.core.layers.fusion import blocks
from convserve.core.presets import preset

from tests import reference_numpy as ref
from tests.conftest import random_weights

TOLERANCE = 1e-4
STEP_OF = {
    "winograd": "WinogradConv",
    "winograd4": "WinogradConv",
    "winograd5": "WinogradConv",
    "winograd4_phases": "WinogradConv",
    "winograd_phases": "WinogradConv",
    "winograd4_split": "WinogradConv",
    "direct": "DirectConv",
    "direct_narrow": "DirectConv",
    "patches": "DirectConv",
    "k3_pool": "K3PoolConv",
    "pixels_pool": "PixelsPoolConv",
}


def _random_conv_model(rng: np.random.Generator, case: int) -> dict:
    """One conv layer (maybe a pool after it) and a dense head, with shapes drawn at random;
    every third case has one input channel and a 2x2 max pool (the first-layer kernels)."""
    one_channel = case % 3 == 0
    size = int(rng.choice([1, 3, 3, 5, 7, 4])) if not one_channel else int(rng.choice([3, 3, 5]))
    stride = 1 if one_channel or rng.random() < 0.6 else 2
    channels = 1 if one_channel else int(rng.choice([2, 3, 8, 13, 32]))
    filters = int(rng.choice([4, 8, 16, 20, 32, 48, 64, 80]))
    h, w = (int(v) for v in rng.integers(size + 2, 19, size=2))
    padding = str(rng.choice(["valid", "same"]))
    act = str(rng.choice(["relu", "linear", "tanh", "sigmoid"]))
    layers = [
        {
            "type": "conv2d",
            "filters": filters,
            "kernel_size": size,
            "strides": stride,
            "padding": padding,
            "activation": act,
        }
    ]
    if one_channel or rng.random() < 0.5:
        layers.append({"type": "max_pooling2d", "pool_size": 2})
    layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
    return {
        "name": f"case{case}",
        "input": {
            "shape": [h, w, channels],
            "scale": 1 / 255,
            "mean": [0.2] * channels,
            "std": [0.7] * channels,
        },
        "labels": ["a", "b", "c"],
        "layers": layers,
    }


def _cases(count: int = 24):
    rng = np.random.default_rng(2026)
    for case in range(count):
        doc = _random_conv_model(rng, case)
        arch = parse_architecture(doc)
        block = blocks(arch.layers, inference=True)[0]
        yield doc, arch, block.layer.inference_variants(block)


def test_random_shapes_reach_every_variant():
    """The randomized cases below cover every variant the planner may choose."""
    seen = {v for _, _, variants in _cases() for v in variants}
    assert seen == set(STEP_OF)


@pytest.mark.parametrize("case", range(24))
def test_every_variant_matches_the_reference_and_is_batch_invariant(case):
    doc, arch, variants = list(_cases())[case]
    weights = random_weights(doc, seed=case)
    rng = np.random.default_rng(case)
    n = BATCH_CHUNK + 5  # two chunks
    x = rng.standard_normal((n, *arch.input_shape)).astype(np.float32)
    pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
    expected = ref.forward(doc, weights, x)
    expected_raw = ref.forward(doc, weights, pixels, preprocess=True)
    for variant in variants:
        plan = InferencePlan(arch, weights, {0: variant})
        assert type(plan.steps[0]).__name__ == STEP_OF[variant]
        where = f"{doc['layers'][:2]} {arch.input_shape}, variant {variant}"
        whole = plan.run(x)
        np.testing.assert_allclose(whole, expected, atol=TOLERANCE, rtol=1e-5, err_msg=where)
        raw = plan.run(pixels, preprocess=True)
        np.testing.assert_allclose(raw, expected_raw, atol=TOLERANCE, rtol=1e-5, err_msg=where)
        # bit-identical whatever the batch it runs in
        for start, stop in ((0, 1), (3, 11), (n - 1, n), (1, BATCH_CHUNK + 2)):
            part = plan.run(x[start:stop])
            assert np.array_equal(part, whole[start:stop]), f"{where}: rows {start}-{stop}"


def _narrow_model(
    height: int, width: int, channels: int, filters: int, size: int, stride: int, pool, act: str
) -> dict:
    """One `valid` conv (a 2x2 pool after it: "max", "average" or None) and a dense head."""
    layers: list[dict] = [
        {
            "type": "conv2d",
            "filters": filters,
            "kernel_size": size,
            "strides": stride,
            "padding": "valid",
            "activation": act,
        }
    ]
    if pool:
        layers.append({"type": f"{pool}_pooling2d", "pool_size": 2})
    layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
    return {
        "name": "narrow",
        "input": {
            "shape": [height, width, channels],
            "scale": 1.0,
            "mean": [0.0] * channels,
            "std": [1.0] * channels,
        },
        "labels": ["a", "b", "c"],
        "layers": layers,
    }


def _check_narrow(doc: dict, seed: int) -> None:
    """`direct_narrow` is offered for the model's conv and matches the NumPy reference, is
    bit-identical to `direct` (every output is the same chain of fused multiply-adds) and
    across batches."""
    arch = parse_architecture(doc)
    block = blocks(arch.layers, inference=True)[0]
    assert block.layer.inference_variants(block)[:2] == ("direct", "direct_narrow")
    weights = random_weights(doc, seed=seed)
    x = np.random.default_rng(seed).standard_normal((BATCH_CHUNK + 3, *arch.input_shape))
    x = x.astype(np.float32)
    expected = ref.forward(doc, weights, x)
    narrow = InferencePlan(arch, weights, {0: "direct_narrow"})
    assert narrow.steps[0].narrow
    whole = narrow.run(x)
    where = f"{doc['layers'][:2]} {arch.input_shape}"
    np.testing.assert_allclose(whole, expected, atol=TOLERANCE, rtol=1e-5, err_msg=where)
    direct = InferencePlan(arch, weights, {0: "direct"}).run(x)
    np.testing.assert_array_equal(whole, direct, err_msg=where)
    for start, stop in ((0, 1), (2, 9), (1, BATCH_CHUNK + 2)):
        assert np.array_equal(narrow.run(x[start:stop]), whole[start:stop]), where


@pytest.mark.parametrize(
    "width, channels, size, stride, pool, act",
    [
        (17, 64, 3, 2, None, "relu"),  # rows of 8 pixels; weights in chunks (over 256 rows)
        (27, 40, 3, 2, None, "tanh"),  # rows of 13: a 7-pixel call, then the other 6 in one
        (16, 72, 2, 1, "max", "relu"),  # a fused 2x2 max pool over 14-pixel conv rows, chunks
        (16, 29, 2, 1, "average", "sigmoid"),  # a fused average pool, an odd channel count
    ],
)
def test_direct_narrow_on_chunked_weights_strides_and_fused_pools(
    width, channels, size, stride, pool, act
):
    _check_narrow(_narrow_model(9, width, channels, 80, size, stride, pool, act), width)


@pytest.mark.parametrize("seed", range(8))
def test_direct_narrow_on_random_shapes(seed):
    """Random layers for which `direct_narrow` is offered: widths, channels, filters (not a
    multiple of 32 too), kernel sizes, strides, pools and activations."""
    rng = np.random.default_rng(700 + seed)
    for _ in range(200):  # draw until the variant applies (most draws qualify)
        size = int(rng.choice([1, 2, 3, 4]))
        stride = 2 if size == 3 else int(rng.choice([1, 2]))  # a 3x3 at stride 1: Winograd
        channels = int(rng.choice([3, 16, 29, 48, 64]))
        filters = int(rng.choice([64, 72, 96, 128]))
        width = int(rng.integers(size + 6 * stride, 45))
        pool = rng.choice([None, "max", "average"])
        act = str(rng.choice(["relu", "linear", "tanh", "sigmoid"]))
        doc = _narrow_model(
            int(rng.integers(size + 2, 9)), width, channels, filters, size, stride, pool, act
        )
        try:
            arch = parse_architecture(doc)
        except ModelError:  # a pool on a conv output too small for it: draw again
            continue
        block = blocks(arch.layers, inference=True)[0]
        if "direct_narrow" in block.layer.inference_variants(block):
            break
    else:
        raise AssertionError("no random layer took direct_narrow")
    _check_narrow(doc, seed)


def _patches_model(rng: np.random.Generator) -> dict:
    """Two convs whose output rows are short (under 6 pixels), so both are offered `patches`;
    the first writes into the second's zero-bordered input (`same` padding)."""
    size = int(rng.choice([1, 2, 3, 4, 5]))
    stride = int(rng.choice([1, 2]))
    side = int(rng.integers(size, size + 5 * stride))  # 1-5 output pixels a row
    channels = int(rng.choice([1, 3, 16, 29, 64]))
    convs = [
        {"filters": int(rng.choice([5, 16, 40, 64, 72])), "kernel_size": size, "strides": stride,
         "padding": "valid"},
        {"filters": int(rng.choice([8, 20, 64])), "kernel_size": int(rng.choice([1, 3, 5])),
         "strides": 1, "padding": "same"},
    ]  # fmt: skip
    acts = rng.choice(["relu", "linear", "tanh", "sigmoid"], size=2)
    layers = [{"type": "conv2d", **c, "activation": str(a)} for c, a in zip(convs, acts)]
    layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
    return {
        "name": "patches",
        "input": {
            "shape": [int(rng.integers(size, side + 1)), side, channels],
            "scale": 1.0 / 255.0,
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
        "labels": ["a", "b", "c"],
        "layers": layers,
    }


@pytest.mark.parametrize("seed", range(8))
def test_patches_on_random_shapes(seed, monkeypatch):
    """`patches` (groups of pixels across rows and images, im2col) on random short-row convs:
    it matches the NumPy reference on preprocessed and raw input, gives the same bits as
    `direct` (the same chains of fused multiply-adds), whatever the batch and with the weights
    in rows (AVX-512) or in strips of 16 channels (AVX2), and writes into the next conv's
    padded input."""
    from convserve.core.kernels import gemm

    rng = np.random.default_rng(900 + seed)
    doc = _patches_model(rng)
    arch = parse_architecture(doc)
    offered = [b.layer.index for b in blocks(arch.layers, inference=True)
               if "patches" in b.layer.inference_variants(b)]  # fmt: skip
    assert offered == [0, 1], (doc["layers"][:2], arch.input_shape)
    weights = random_weights(doc, seed=seed)
    n = BATCH_CHUNK + 5
    x = rng.standard_normal((n, *arch.input_shape)).astype(np.float32)
    pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
    where = f"{doc['layers'][:2]} {arch.input_shape}"
    plan = InferencePlan(arch, weights, {0: "patches", 1: "patches"})
    assert plan.steps[0].patches and plan.steps[1].patches
    whole = plan.run(x)
    np.testing.assert_allclose(
        whole, ref.forward(doc, weights, x), atol=TOLERANCE, rtol=1e-5, err_msg=where
    )
    raw = plan.run(pixels, preprocess=True)
    expected_raw = ref.forward(doc, weights, pixels, preprocess=True)
    np.testing.assert_allclose(raw, expected_raw, atol=TOLERANCE, rtol=1e-5, err_msg=where)
    direct = InferencePlan(arch, weights, {0: "direct", 1: "direct"})
    np.testing.assert_array_equal(whole, direct.run(x), err_msg=where)
    for start, stop in ((0, 1), (2, 9), (n - 1, n), (1, BATCH_CHUNK + 2)):
        assert np.array_equal(plan.run(x[start:stop]), whole[start:stop]), where
    monkeypatch.setattr(gemm, "STRIPS", not gemm.STRIPS)  # the other weight layout
    other = InferencePlan(arch, weights, {0: "patches", 1: "patches"})
    widths = {p.steps[0].wk.shape[1] for p in (plan, other)}  # COp and 16 (one: COp is 16)
    assert 16 in widths and widths == {16, plan.steps[0].bias.size}
    np.testing.assert_array_equal(other.run(x), whole, err_msg=where + ", other layout")


@pytest.mark.parametrize("strips", [False, True])
def test_patches_of_few_pixels_split_the_channels_among_the_threads(strips, monkeypatch):
    """A batch of at most PATCH_GROUP pixels is one group whose output channels go in ranges,
    one per thread (40 filters: 32 + the last 8 of a 16-channel block): the reference and the
    same bits as `direct` at one and two images, in either weight layout."""
    from convserve.core.kernels import direct as kdirect
    from convserve.core.kernels import gemm

    monkeypatch.setattr(gemm, "STRIPS", strips)
    layers = [{"type": "conv2d", "filters": 40, "kernel_size": 3, "strides": 2,
               "padding": "same", "activation": "relu"}, {"type": "flatten"},
              {"type": "dense", "units": 3}]  # fmt: skip
    doc = {"name": "p", "input": {"shape": [8, 8, 24], "scale": 1.0, "mean": [0.0] * 24,
           "std": [1.0] * 24}, "labels": ["a", "b", "c"], "layers": layers}  # fmt: skip
    arch = parse_architecture(doc)
    weights = random_weights(doc, seed=5)
    x = np.random.default_rng(6).standard_normal((2, 8, 8, 24)).astype(np.float32)
    plan = InferencePlan(arch, weights, {0: "patches"})
    direct = InferencePlan(arch, weights, {0: "direct"})
    for n in (2, 1):  # the larger batch first: growing the buffers drops the programs
        got = plan.run(x[:n])
        np.testing.assert_allclose(got, ref.forward(doc, weights, x[:n]), atol=TOLERANCE)
        np.testing.assert_array_equal(got, direct.run(x[:n]))
    (call,) = [c for c in plan._programs[(1, False, plan.threads)][0] if "patches" in str(c[0])]
    group, ways = call[1][-3], call[1][-2]
    assert group == 16 <= kdirect.PATCH_GROUP and ways == min(2, plan.threads)


@pytest.mark.parametrize("seed", range(8))
def test_direct_runs_over_short_rows_on_random_shapes(seed, monkeypatch):
    """`direct` on conv rows shorter than two micro-kernel blocks runs by `conv_runs` (runs of
    pixels over row ends, the channels in ranges when an image has few runs): the NumPy
    reference on preprocessed and raw input, the same bits as by rows (`conv`) whatever the
    batch, in either weight layout, writing into the next conv's padded input and not."""
    from convserve.core.kernels import gemm
    from convserve.core.layers import conv2d

    rng = np.random.default_rng(1700 + seed)
    doc = _patches_model(rng)
    doc["layers"][1]["filters"] = int(rng.choice([8, 20, 64, 136, 200]))  # 1-4 ranges of 64
    side = int(rng.integers(2, 9))
    doc["input"]["shape"][:2] = [side + int(rng.integers(0, 9)), side + conv2d.RUN_ROWS_UNDER]
    doc["layers"][0].update(kernel_size=1, strides=1, padding="valid")  # keeps the long rows
    doc["layers"][1].update(strides=2, padding=str(rng.choice(["same", "valid"])))
    doc["layers"][1]["kernel_size"] = int(rng.choice([1, 3, 5]))
    third = {"type": "conv2d", "filters": int(rng.choice([16, 72])), "kernel_size": 3,
             "padding": "same", "activation": "relu"}  # fmt: skip
    doc["layers"].insert(2, third)  # the second writes into its zero-bordered input
    arch = parse_architecture(doc)
    weights = random_weights(doc, seed=seed)
    where = f"{doc['layers'][:3]} {arch.input_shape}"
    assert arch.layers[1].output_shape[1] < conv2d.RUN_ROWS_UNDER <= arch.layers[0].output_shape[1]
    n = BATCH_CHUNK + 3
    x = rng.standard_normal((n, *arch.input_shape)).astype(np.float32)
    pixels = rng.integers(0, 256, x.shape).astype(np.uint8)
    plan = InferencePlan(arch, weights, {0: "direct", 1: "direct", 2: "direct"})
    whole = plan.run(x)
    kernels = [getattr(c[0], "__name__", str(c[0])) for c in next(iter(plan._programs.values()))[0]]
    assert kernels.count("conv_runs") == 2 and kernels.count("conv") == 1, kernels
    short = [k for k, step in enumerate(plan.steps)
             if type(step).__name__ == "DirectConv" and step.shape[1] < conv2d.RUN_ROWS_UNDER]  # fmt: skip
    assert len(short) == 2 and plan._into_next[short[0]], where
    np.testing.assert_allclose(
        whole, ref.forward(doc, weights, x), atol=TOLERANCE, rtol=1e-5, err_msg=where
    )
    raw = plan.run(pixels, preprocess=True)
    expected_raw = ref.forward(doc, weights, pixels, preprocess=True)
    np.testing.assert_allclose(raw, expected_raw, atol=TOLERANCE, rtol=1e-5, err_msg=where)
    for start, stop in ((0, 1), (1, 3), (2, 9), (n - 1, n), (1, BATCH_CHUNK + 2)):
        assert np.array_equal(plan.run(x[start:stop]), whole[start:stop]), where
    monkeypatch.setattr(conv2d, "RUN_ROWS_UNDER", 0)  # every conv by rows
    rows = InferencePlan(arch, weights, {0: "direct", 1: "direct", 2: "direct"})
    np.testing.assert_array_equal(rows.run(x), whole, err_msg=where + ", by rows")
    monkeypatch.undo()
    monkeypatch.setattr(gemm, "STRIPS", not gemm.STRIPS)  # the other weight layout
    other = InferencePlan(arch, weights, {0: "direct", 1: "direct", 2: "direct"})
    np.testing.assert_array_equal(other.run(x), whole, err_msg=where + ", other layout")
    np.testing.assert_array_equal(other.run(x[:1]), whole[:1], err_msg=where + ", other layout")


@pytest.mark.parametrize("seed", range(12))
def test_direct_1x1_convs_between_plain_buffers_run_each_image_as_one_row(seed, monkeypatch):
    """A 1x1 stride-1 conv whose input and output are plain buffers of whole images runs
    `conv` over each image's pixels as one row (at = (0, 0, 1, pixels)) where its stores are
    fused (filters a multiple of 16, ReLU or linear) and the batch gives every thread a
    piece; else by rows or runs. Either way: the NumPy reference, the same bits whatever the
    batch, and the same bits as by rows or runs."""
    from convserve.core.layers import conv2d

    rng = np.random.default_rng(2600 + seed)
    side = int(rng.integers(2, 21))
    channels = int(rng.choice([3, 16, 40]))
    filters = int(rng.choice([16, 48, 64, 136, 200]))
    act = str(rng.choice(["relu", "linear", "tanh"]))
    after = str(rng.choice(["dense", "conv1x1", "conv3x3"]))  # conv3x3: a bordered output
    layers = [
        {"type": "conv2d", "filters": int(rng.choice([16, 24, 128])), "kernel_size": 3,
         "padding": "same", "activation": "relu"},
        {"type": "conv2d", "filters": filters, "kernel_size": 1, "activation": act},
    ]  # fmt: skip
    if after != "dense":
        size, padding = (1, "valid") if after == "conv1x1" else (3, "same")
        layers.append({"type": "conv2d", "filters": 16, "kernel_size": size, "padding": padding,
                       "activation": "relu"})  # fmt: skip
    layers += [{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "linear"}]
    doc = {"name": "rows", "input": {"shape": [side, side + 1, channels], "scale": 1.0,
           "mean": [0.0] * channels, "std": [1.0] * channels}, "labels": ["a", "b", "c"],
           "layers": layers}  # fmt: skip
    arch = parse_architecture(doc)
    weights = random_weights(doc, seed=seed)
    plan_of = {k: "direct" for k in range(len(arch.layers)) if arch.layers[k].type == "conv2d"}
    where = f"{side}x{side + 1}x{channels} -> {filters} {act}, then {after}"
    n = BATCH_CHUNK + 3
    x = rng.standard_normal((n, *arch.input_shape)).astype(np.float32)
    plan = InferencePlan(arch, weights, plan_of)
    whole = plan.run(x)
    np.testing.assert_allclose(
        whole, ref.forward(doc, weights, x), atol=TOLERANCE, rtol=1e-5, err_msg=where
    )
    for start, stop in ((0, 1), (1, 3), (2, 9), (1, BATCH_CHUNK + 2)):
        assert np.array_equal(plan.run(x[start:stop]), whole[start:stop]), where
    pixels = side * (side + 1)
    for batch in (1, BATCH_CHUNK):
        calls = plan._programs[(batch, False, plan.threads)][0]
        convs = [c for c in calls if getattr(c[0], "__name__", "") == "conv"]
        long_rows = [c for c in convs if c[1][-2] == (0, 0, 1, pixels)]  # (its `at`)
        fused = filters % 16 == 0 and act != "tanh"
        pieces = batch * (pixels // conv2d.IMAGE_ROW_PIECE_PIXELS) >= plan.threads
        # the 1x1 conv, and a 1x1 conv of 16 filters with ReLU after it
        expected = int(fused and after != "conv3x3" and pieces) + int(after == "conv1x1" and pieces)
        assert len(long_rows) == expected, f"{where}, {batch} images"
        for call in long_rows:
            assert call[1][0].shape[1] == 1, where
    monkeypatch.setattr(conv2d, "IMAGE_ROW_PIECE_PIXELS", 10**9)  # by rows or runs
    rows = InferencePlan(arch, weights, plan_of)
    np.testing.assert_array_equal(rows.run(x), whole, err_msg=where + ", by rows")


def test_direct_runs_split_the_channels_when_an_image_has_few_runs():
    """A 4x4 output of 128 channels at one image: one run of its 16 pixels, the channels in
    two ranges of 64 (a task per thread, each reading half the weights); at 8 images a run
    per image, all channels; a 8x8 output of 64 channels: at one image two runs of 32, at 8
    a run per image."""
    from convserve.core.layers.conv2d import DirectConv

    def runs(shape, filters, n, threads):
        step = DirectConv.__new__(DirectConv)
        step.shape, step.bias = shape, np.zeros(filters, np.float32)
        return step._runs(n, threads)

    assert runs((4, 4, 128), 128, 1, 2) == (16, 2)
    assert runs((4, 4, 128), 128, 8, 2) == (16, 1)
    assert runs((8, 8, 64), 64, 1, 2) == (32, 1)
    assert runs((8, 8, 64), 64, 8, 2) == (64, 1)
    assert runs((11, 11, 64), 64, 8, 2) == (61, 1)  # 121 pixels in two runs
    assert runs((4, 4, 128), 128, 1, 1) == (16, 1)
    assert runs((3, 5, 40), 48, 1, 4) == (4, 1)  # 15 pixels in 4 runs: a task per thread


def test_patches_is_offered_for_short_rows_without_a_pool_only():
    """Rows of 6 pixels or more (a full micro-kernel block) or a pool after the conv: no
    `patches`."""

    def variants(side: int, pool: bool) -> tuple[str, ...]:
        layers = [{"type": "conv2d", "filters": 64, "kernel_size": 3, "strides": 2,
                   "padding": "valid", "activation": "relu"}]  # fmt: skip
        layers += [{"type": "max_pooling2d", "pool_size": 2}] if pool else []
        layers += [{"type": "flatten"}, {"type": "dense", "units": 3}]
        doc = {"name": "p", "input": {"shape": [side, side, 32], "scale": 1.0, "mean": [0.0] * 32,
               "std": [1.0] * 32}, "labels": ["a", "b", "c"], "layers": layers}  # fmt: skip
        block = blocks(parse_architecture(doc).layers, inference=True)[0]
        return block.layer.inference_variants(block)

    assert "patches" in variants(11, pool=False)  # 5-pixel rows
    assert "patches" not in variants(13, pool=False)  # 6-pixel rows
    assert "patches" not in variants(11, pool=True)


def test_an_unknown_variant_is_refused():
    doc = preset("fashion_mnist")
    with pytest.raises(ValueError, match="layer 2 .*no kernel variant 'k3_pool'"):
        InferencePlan(parse_architecture(doc), random_weights(doc), {0: "direct", 2: "k3_pool"})


# -- the choice ---------------------------------------------------------------------------------
def _rounds(times: list[float], count: int = 3) -> list[list[float]]:
    """Timings of `count` rounds, every round the same, at each batch size."""
    return [[t] * count for t in times]


def test_pick_keeps_the_default_unless_clearly_faster():
    from convserve.core import planner

    rounds = {"winograd": _rounds([1.0, 1.0]), "direct": _rounds([0.99, 0.99])}  # noise
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"
    rounds = {"winograd": _rounds([1.0, 1.0]), "direct": _rounds([0.5, 1.2])}  # 0.77: faster
    assert planner.pick(("winograd", "direct"), rounds) == "direct"
    rounds = {"winograd": _rounds([1.0, 1.0]), "direct": _rounds([0.5, 2.5])}  # 1.12: slower
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"


def test_a_tie_goes_to_the_variant_whose_worst_batch_size_loses_least():
    """Scores within SWITCH_MARGIN tie; when the choice loses more than the margin at some
    batch size (relative to the fastest there), the tied variant whose slowest batch size
    loses least replaces it."""
    from convserve.core import planner

    # at 1 / 8 / 32 images: the default loses 20 % at one image, direct 6 % and 14 % above
    rounds = {"winograd": _rounds([1.2, 1.0, 1.0]), "direct": _rounds([1.01, 1.06, 1.14])}
    score = planner.scores(("winograd", "direct"), rounds)
    assert score["direct"] < score["winograd"] * (1 + planner.SWITCH_MARGIN)  # a tie
    assert score["direct"] > score["winograd"]
    assert planner.worst(("winograd", "direct"), rounds) == pytest.approx(
        {"winograd": 1.2 / 1.01, "direct": 1.14}
    )
    assert planner.pick(("winograd", "direct"), rounds) == "direct"
    # a worst batch size better by less than the margin still decides a tie
    rounds["direct"] = _rounds([1.01, 1.06, 1.17])
    assert planner.pick(("winograd", "direct"), rounds) == "direct"
    # equal worst cases keep the default
    rounds = {"winograd": _rounds([1.1, 1.0, 1.0]), "direct": _rounds([1.0, 1.05, 1.1])}
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"
    # a worse worst case does not move it
    rounds["direct"] = _rounds([1.0, 1.02, 1.12])
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"
    # without a tie the score decides, whatever the worst batch size
    rounds = {"winograd": _rounds([1.3, 1.0, 1.0]), "direct": _rounds([1.0, 1.25, 1.25])}
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"
    # the tie-break also moves a clear winner to a variant that ties with it
    rounds = {
        "winograd": _rounds([2.0, 2.0, 2.0]),
        "direct": _rounds([1.2, 1.0, 1.0]),
        "patches": _rounds([1.01, 1.06, 1.14]),
    }
    assert planner.pick(("winograd", "direct", "patches"), rounds) == "patches"


def test_candidates_are_compared_round_by_round():
    """The machine's speed drifts between rounds: each round's calls are compared with the same
    round's, and one lucky or disturbed round does not decide."""
    from convserve.core import planner

    # direct is 10 % faster in every round, while the machine runs at half speed in most
    rounds = {"winograd": [[2.0, 2.0, 1.0, 2.0, 2.0]], "direct": [[1.8, 1.8, 0.9, 1.8, 1.8]]}
    assert planner.pick(("winograd", "direct"), rounds) == "direct"
    # direct wins one round by half and loses the others by 10 %
    rounds = {"winograd": [[1.0, 1.0, 1.0, 1.0, 1.0]], "direct": [[0.5, 1.1, 1.1, 1.1, 1.1]]}
    assert planner.pick(("winograd", "direct"), rounds) == "winograd"
    assert planner.scores(("winograd", "direct"), rounds)["direct"] == pytest.approx(1.1)


def test_the_whole_model_keeps_the_fastest_timed_plan_unless_the_default_clearly_wins():
    from convserve.core import planner

    choose = planner.whole_model_choice
    names = ("planned", "default", "largest batch")
    rounds = {
        "planned": _rounds([1.0, 1.0]),
        "default": _rounds([1.1, 1.1]),
        "largest batch": _rounds([0.98, 0.98]),
    }
    # the faster of the two plans from the layers' timings, by any margin
    assert choose(names, rounds) == "largest batch"
    rounds["default"] = _rounds([0.96, 0.96])  # 2 % faster than the best of them: noise
    assert choose(names, rounds) == "largest batch"
    rounds["default"] = _rounds([0.9, 0.9])  # clearly faster
    assert choose(names, rounds) == "default"
    # the per-layer choice is the default plan: the other needs the margin
    rounds = {"planned": _rounds([1.0, 1.0]), "largest batch": _rounds([0.98, 0.98])}
    assert choose(("planned", "largest batch"), rounds) == "planned"
    rounds["largest batch"] = _rounds([0.9, 0.9])
    assert choose(("planned", "largest batch"), rounds) == "largest batch"


@pytest.fixture
def fresh_planner(monkeypatch):
    """The planner with an empty in-process memo (the disk cache is each test's own) that
    caches complete plans however busy the machine is while the tests run."""
    from convserve.core import planner

    monkeypatch.setattr(planner, "_memo", {})
    monkeypatch.setattr(planner, "NOISE_LIMIT", math.inf)
    monkeypatch.setattr(planner, "PLAN_SECONDS", 120.0)  # never out of time on a busy machine
    return planner


def test_a_plan_is_timed_cached_and_read_back(tmp_path, fresh_planner, monkeypatch):
    planner = fresh_planner
    doc = preset("cifar10")
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    plan, chunk = planner.plan_for(arch, weights, tmp_path, seconds=60)
    assert chunk == BATCH_CHUNK  # batches of up to BATCH_CHUNK images: no larger chunk to try
    choices = {b.layer.index: b.layer.inference_variants(b) for b in blocks(arch.layers, True)}
    assert set(plan) == set(default_plan(arch))
    assert all(plan[i] in choices[i] for i in plan)
    files = list(tmp_path.glob("*.json"))
    key = planner.plan_key(arch, planner.timing_batches(BATCH_CHUNK))
    assert [f.name for f in files] == [f"{key}.json"]
    record = json.loads(files[0].read_text())
    assert {int(k): v for k, v in record["plan"].items()} == plan
    assert record["chunk"] == chunk
    timed = {int(k) for k in record["seconds"] if k.lstrip("-").isdigit()} - {planner.WHOLE_MODEL}
    # the four convs and the first dense layer (2304 inputs; the last, of 10 units, has a single
    # kernel)
    assert timed == {i for i, v in choices.items() if len(v) > 1} == {0, 1, 3, 4, 7}

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(planner, "measure_plan", no_timing)
    planner._memo.clear()
    assert planner.plan_for(arch, weights, tmp_path) == (plan, chunk)  # from disk
    # the model uses it: its warm-up takes the cached plan
    planner._memo.clear()
    model = Model(doc, weights, plan_cache=tmp_path)
    model.warmup((1, BATCH_CHUNK))
    assert model.kernel_plan == plan
    assert model.replica().kernel_plan == plan


def test_a_damaged_cache_file_is_replanned(tmp_path, fresh_planner):
    planner = fresh_planner
    doc = preset("fashion_mnist")
    arch = parse_architecture(doc)
    key = planner.plan_key(arch, planner.timing_batches(BATCH_CHUNK))
    (tmp_path / f"{key}.json").write_text('{"plan": {"0": "no such kernel"}}')
    assert planner.read_cached(tmp_path, key, arch) is None
    plan, chunk = planner.plan_for(arch, random_weights(doc), tmp_path, seconds=60)
    assert planner.read_cached(tmp_path, key, arch) == (plan, chunk)
    record = json.loads((tmp_path / f"{key}.json").read_text())
    for bad in (BATCH_CHUNK + 1, "32", None, True):  # a chunk this key does not try
        (tmp_path / f"{key}.json").write_text(json.dumps({**record, "chunk": bad}))
        assert planner.read_cached(tmp_path, key, arch) is None


def test_the_key_follows_shapes_cpu_and_code_not_names(fresh_planner, monkeypatch):
    planner = fresh_planner
    doc = preset("cifar10")
    key = planner.plan_key(parse_architecture(doc))
    renamed = preset("cifar10")
    renamed["name"] = "other"
    renamed["layers"][0]["name"] = "first"
    renamed["labels"] = [f"class {i}" for i in range(10)]
    assert planner.plan_key(parse_architecture(renamed)) == key
    wider = preset("cifar10")
    wider["input"]["shape"] = [40, 32, 3]
    assert planner.plan_key(parse_architecture(wider)) != key
    more = preset("cifar10")
    more["layers"][3]["filters"] = 96
    assert planner.plan_key(parse_architecture(more)) != key
    assert planner.plan_key(parse_architecture(doc), (1, 8)) != key
    assert planner.plan_key(parse_architecture(doc), (1,), 0, (32, 64)) != key
    monkeypatch.setattr(planner, "code_stamp", lambda: "another version")
    assert planner.plan_key(parse_architecture(doc)) != key
    monkeypatch.undo()
    monkeypatch.setattr(planner, "cpu_identity", lambda: "another CPU")
    assert planner.plan_key(parse_architecture(doc)) != key


def test_the_code_stamp_covers_kernels_and_layers(tmp_path):
    from convserve.core.kernels import cache_stamp

    (tmp_path / "a.py").write_text("x = 1\n")
    before = cache_stamp.package_stamp(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert cache_stamp.package_stamp(tmp_path) != before


def test_planning_stays_within_the_models_batch_size(tmp_path, fresh_planner):
    """A model limited to batches of 4 is timed at batch 1 and 4, never at a larger batch."""
    doc = preset("fashion_mnist")
    model = Model(doc, random_weights(doc), batch_size=4, plan_cache=tmp_path)
    model.warmup((1, 2))
    (record,) = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert record["batches"] == [1, 4]
    assert {int(k): v for k, v in record["plan"].items()} == model.kernel_plan


def test_a_dense_only_model_is_timed_at_the_rows_it_runs_at_once(tmp_path, fresh_planner):
    """A model of dense layers runs up to ROWS_CHUNK rows at once: it is timed at that many
    (within its batch size), a model with convolutions at BATCH_CHUNK images."""
    from convserve.core.bench_models import bench_model
    from convserve.core.inference import ROWS_CHUNK

    assert fresh_planner.timing_batches(1000) == (1, 8, BATCH_CHUNK)
    assert fresh_planner.timing_batches(1000, ROWS_CHUNK) == (1, 8, ROWS_CHUNK)
    assert fresh_planner.timing_batches(100, ROWS_CHUNK) == (1, 8, 100)
    for name, batch, timed in (("mlp_tanh", 100, 100), ("mlp_tanh", 999, ROWS_CHUNK)):
        doc = bench_model(name)
        where = tmp_path / f"{name}-{batch}"
        model = Model(doc, random_weights(doc), batch_size=batch, plan_cache=where)
        assert model._plan.chunk == ROWS_CHUNK
        model.warmup((1,))
        records = [json.loads(f.read_text()) for f in where.glob("*.json")]
        assert [r["batches"] for r in records] == [[1, 8, timed]]


def test_chunk_sizes_double_up_to_the_largest_batch(fresh_planner):
    from convserve.core.inference import ROWS_CHUNK

    sizes = fresh_planner.chunk_sizes
    assert fresh_planner.MAX_CHUNK == 256
    assert sizes(1000) == (BATCH_CHUNK, 64, 128, 256)
    assert sizes(100) == (BATCH_CHUNK, 64, 100)
    assert sizes(64) == (BATCH_CHUNK, 64)
    assert sizes(20) == sizes(BATCH_CHUNK) == (BATCH_CHUNK,)
    assert sizes(1000, ROWS_CHUNK) == (ROWS_CHUNK,)
    # at most CHUNK_MAX_BYTES of activations a chunk: 1 MB an image stops at 64 images, 13 MB
    # (a 224 x 224 image through 64 channels) at the default
    assert fresh_planner.CHUNK_MAX_BYTES == 64 * 2**20
    assert sizes(1000, BATCH_CHUNK, 2**20) == (BATCH_CHUNK, 64)
    assert sizes(1000, BATCH_CHUNK, 13 * 2**20) == (BATCH_CHUNK,)
    assert sizes(100, BATCH_CHUNK, 2**16) == (BATCH_CHUNK, 64, 100)


def test_each_larger_chunk_is_timed_against_the_best_so_far(fresh_planner, monkeypatch):
    """`measure_chunk` times the whole model at each larger chunk size, in chunks of the best so
    far against one piece; the larger becomes the best when it is faster by CHUNK_MARGIN, and a
    size that is not does not end the search. The deadline does, keeping the best so far."""
    planner = fresh_planner
    doc = preset("lenet5")
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    per_image = {}  # seconds an image in a pass run in chunks of each size
    asked = []

    def time_runners(runners, shape, deadline, batches, seed=0, parallel_min_batch=0):
        assert {r.chunk for r in runners.values()} == {int(name) for name in runners}
        asked.append((tuple(runners), batches))
        if deadline < 0:
            return None
        (n,) = batches
        return {v: [[per_image[int(v)] * n] * planner.ROUNDS] for v in runners}, 1.0

    monkeypatch.setattr(planner, "time_runners", time_runners)
    sizes = (32, 64, 128, 256)
    plan = default_plan(arch)
    per_image.update({32: 1.0, 64: 0.9, 128: 0.9 * (1 - planner.CHUNK_MARGIN / 2), 256: 0.5})
    chunk, timings, noise = planner.measure_chunk(arch, weights, plan, sizes, 1e18)
    assert (chunk, noise) == (256, 1.0)  # 128 wins by less than the margin, 256 by more
    assert asked == [(("32", "64"), (64,)), (("64", "128"), (128,)), (("64", "256"), (256,))]
    assert set(timings) == {"chunk 64", "chunk 128", "chunk 256"}
    per_image.update({64: 1.0, 128: 0.8, 256: 0.85})  # 64 ties, 128 wins, 256 loses
    asked.clear()
    assert planner.measure_chunk(arch, weights, plan, sizes, 1e18)[0] == 128
    assert [names for names, _ in asked] == [("32", "64"), ("32", "128"), ("128", "256")]
    asked.clear()
    assert planner.measure_chunk(arch, weights, plan, sizes, -1.0) == (32, {}, 1.0)
    assert len(asked) == 1


def test_a_model_run_on_larger_batches_gets_a_timed_chunk(tmp_path, fresh_planner):
    """A model that runs batches of up to 64 images is timed whole in chunks of BATCH_CHUNK and
    of 64; the chunk chosen is cached with the plan, and the model and its replicas run in it.
    Images come out the same, to the bit, whatever the chunk."""
    doc = preset("lenet5")
    weights = random_weights(doc)
    model = Model(doc, weights, batch_size=64, plan_cache=tmp_path)
    model.warmup((1, 64))
    (record,) = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert "chunk 64" in record["seconds"]
    assert record["chunk"] == model.batch_chunk == model.replica().batch_chunk
    assert model.batch_chunk in (BATCH_CHUNK, 64)
    x = np.random.default_rng(3).standard_normal((100, 28, 28, 1)).astype(np.float32)
    y = model.forward(x)
    np.testing.assert_allclose(y, ref.forward(doc, weights, x), atol=TOLERANCE)
    for chunk in (7, BATCH_CHUNK, 64, 100):
        other = InferencePlan(model.architecture, model.weights, model.kernel_plan, chunk)
        assert other.chunk == chunk
        assert np.array_equal(other.run(x), y), chunk


def test_an_unwritable_cache_does_not_fail_loading(tmp_path, fresh_planner):
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    cache = blocker / "plans"  # cannot be created: its parent is a file
    doc = preset("lenet5")
    weights = random_weights(doc)
    model = Model(doc, weights, plan_cache=cache)
    model.warmup((1, 4))
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(model.forward(x), ref.forward(doc, weights, x), atol=TOLERANCE)
    assert not cache.exists()


def test_out_of_time_keeps_the_defaults_and_writes_nothing(tmp_path, fresh_planner):
    planner = fresh_planner
    doc = preset("cifar10")
    arch = parse_architecture(doc)
    plan, timings, noise = planner.measure_plan(arch, random_weights(doc), seconds=0.0)
    assert (plan, timings, noise) == (default_plan(arch), {}, None)
    assert planner.plan_for(arch, random_weights(doc), tmp_path, seconds=0.0) == (plan, BATCH_CHUNK)
    assert list(tmp_path.glob("*.json")) == []


def test_out_of_time_midway_keeps_the_layers_timed(tmp_path, fresh_planner, monkeypatch):
    """Time runs out after the first layer with a choice: that layer keeps its timed choice,
    the others their default, and nothing is cached; out of time in the whole-model round,
    the layers' own choices stand."""
    planner = fresh_planner
    doc = preset("cifar10")
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    default = default_plan(arch)
    first = planner._choices(arch)[0][0].layer.index
    real_time_block = planner.time_block
    real_choices = planner._choices

    def first_layer_only(arch_, block, weights_, variants, deadline, batches, *_):
        if block.layer.index != first:
            return None
        rounds, noise = real_time_block(arch_, block, weights_, variants, 1e300, batches)
        faked = {v: rounds[variants[0]] for v in variants}  # all tie but the last, 10x faster
        faked[variants[-1]] = [[t / 10 for t in times] for times in rounds[variants[0]]]
        return faked, noise

    monkeypatch.setattr(planner, "time_block", first_layer_only)
    plan, timings, noise = planner.measure_plan(arch, weights, seconds=60)
    variants = planner._choices(arch)[0][1]
    assert noise is None and list(timings) == [first]
    assert plan == {**default, first: variants[-1]} != default
    assert planner.plan_for(arch, weights, tmp_path, seconds=60) == (plan, BATCH_CHUNK)
    assert list(tmp_path.glob("*.json")) == []

    real_time_runners = planner.time_runners  # `first_layer_only` stays in place

    def layers_only(*args, **kwargs):  # the layers' rounds (which pass a layer index), not the
        return real_time_runners(*args, **kwargs) if len(args) > 4 else None  # model's

    monkeypatch.setattr(planner, "time_runners", layers_only)
    monkeypatch.setattr(planner, "_choices", lambda arch_: real_choices(arch_)[:1])
    plan, timings, noise = planner.measure_plan(arch, weights, seconds=60)
    assert noise is None and list(timings) == [first]
    assert plan == {**default, first: variants[-1]}


def test_a_plan_timed_on_a_busy_machine_is_used_but_not_cached(
    tmp_path, fresh_planner, monkeypatch
):
    planner = fresh_planner
    monkeypatch.setattr(planner, "NOISE_LIMIT", 0.5)  # every timing counts as disturbed
    doc = preset("lenet5")
    arch = parse_architecture(doc)
    plan, _ = planner.plan_for(arch, random_weights(doc), tmp_path, seconds=60)
    choices = {block.layer.index: variants for block, variants in planner._choices(arch)}
    assert plan[0] in choices[0]
    assert list(tmp_path.glob("*.json")) == []
    _, timings, noise = planner.measure_plan(arch, random_weights(doc), seconds=60)
    # every layer with a choice is timed
    assert noise >= 1.0 and set(timings) - {planner.WHOLE_MODEL} == {
        block.layer.index for block, _ in planner._choices(arch)
    }
    assert 0 in timings


@pytest.mark.parametrize(
    "planned_seconds, planned_kept",
    [(3e-3, False), (1e-3, True), (2.04e-3, True)],  # slower; faster; slower within the margin
)
def test_a_plan_is_dropped_only_if_the_whole_model_runs_clearly_slower(
    fresh_planner, monkeypatch, planned_seconds, planned_kept
):
    """Layers timed alone may pick variants that together lose: the whole model is timed with
    the per-layer choice, the default plan and each layer's fastest at the largest batch, and
    the default comes back only when it beats the others by the margin."""
    planner = fresh_planner
    doc = preset("cifar10")
    arch = parse_architecture(doc)
    default = default_plan(arch)
    # every layer with a choice picks its last variant, whatever the timings
    real_pick = planner.pick
    monkeypatch.setattr(
        planner,
        "pick",
        lambda variants, seconds: (
            variants[-1] if "default" not in variants else real_pick(variants, seconds)
        ),
    )
    real_time_runners = planner.time_runners
    whole_calls = []

    def time_runners(runners, *args, **kwargs):
        timed = real_time_runners(runners, *args, **kwargs)
        if "default" in runners:
            whole_calls.append({name: r.plan for name, r in runners.items()})
            count = len(timed[0]["default"])
            fake = {name: _rounds([3e-3] * count) for name in runners}
            fake["default"] = _rounds([2e-3] * count)
            fake["planned"] = _rounds([planned_seconds] * count)
            timed = fake, timed[1]
        return timed

    monkeypatch.setattr(planner, "time_runners", time_runners)
    # the pass in the model after it has its own test
    monkeypatch.setattr(planner, "in_model_pass", lambda arch, weights, plan, *_: (plan, 1.0))
    plan, timings, noise = planner.measure_plan(arch, random_weights(doc), seconds=60)
    forced = {**default, **{b.layer.index: v[-1] for b, v in planner._choices(arch)}}
    assert forced != default and len(whole_calls) == 1
    candidates = whole_calls[0]
    assert candidates["default"] == default and candidates["planned"] == forced
    # the third: each layer's fastest variant at the largest batch (unless one of the others)
    largest = {
        **default,
        **{
            i: min(t, key=planner.relative(tuple(t), t, -1).__getitem__)
            for i, t in timings.items()
            if i >= 0
        },
    }
    assert largest in candidates.values() and len(candidates) <= 3
    assert plan == (forced if planned_kept else default)
    assert planner.WHOLE_MODEL in timings and noise is not None


def test_planning_off_keeps_the_heuristic(tmp_path, fresh_planner):
    doc = preset("cifar10")
    model = Model(doc, random_weights(doc), plan=False, plan_cache=tmp_path)
    model.warmup((1,))
    assert model.kernel_plan == default_plan(parse_architecture(doc))
    assert list(tmp_path.iterdir()) == []
    direct = Model(doc, random_weights(doc), winograd=False, plan_cache=tmp_path)
    direct.warmup((1,))
    kinds = {i: layer.type for i, layer in enumerate(parse_architecture(doc).layers)}
    chosen = {kinds[i]: set() for i in direct.kernel_plan}
    for i, variant in direct.kernel_plan.items():
        chosen[kinds[i]].add(variant)
    heuristic = "passes" if WIDE else "strips"  # by the register file: AVX-512 or AVX2
    assert chosen == {"conv2d": {"direct"}, "dense": {heuristic}}
    assert list(tmp_path.iterdir()) == []


def test_the_default_directory_follows_numba_then_the_user_cache(monkeypatch, tmp_path):
    from convserve.core.planner import CACHE_SUBDIR, plan_cache_dir

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert plan_cache_dir() == tmp_path / "numba" / CACHE_SUBDIR
    assert plan_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan_cache_dir() == tmp_path / "xdg" / CACHE_SUBDIR


def test_the_pass_in_the_model_times_large_weights_against_smaller_ones(fresh_planner, monkeypatch):
    """After the layers' own timings, a layer whose variant reads IN_MODEL_MIN_BYTES of weights
    or more is timed in the whole model against its variants with at most half as many (the
    largest weights first), each check changing only that layer; the smaller variant replaces
    it only when the model runs faster by the margin."""
    from convserve.core.bench_models import bench_model

    planner = fresh_planner
    doc = bench_model("strided5")  # 5x5/2 convs: 3 -> 32, 32 -> 64, 64 -> 128 channels
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    assert default_plan(arch) == {0: "direct", 1: "winograd4_phases", 2: "winograd4_phases"}
    start = {0: "winograd4_phases", 1: "winograd4_phases", 2: "winograd4_phases"}
    # F(4x4, 3x3) over the phases: 36 products of 4 x CI by CO channels, direct 25 x CI by CO
    assert 4 * 36 * 128 * 64 >= planner.IN_MODEL_MIN_BYTES > 4 * 25 * 3 * 32
    checks = []
    faster = {1: "direct"}  # in the model, layer 1 runs faster direct; layer 2 does not

    def time_runners(runners, shape, deadline, batches, *_, **__):
        (_, current_runner), *others = runners.items()
        index = next(i for i in start if current_runner.plan[i] != others[0][1].plan[i])
        for _, runner in others:  # only this layer differs
            assert {i: v for i, v in runner.plan.items() if i != index} == {
                i: v for i, v in current_runner.plan.items() if i != index
            }
        checks.append((index, tuple(runners)))
        fake = {v: _rounds([2e-3] * len(batches)) for v in runners}
        if faster.get(index) in fake:
            fake[faster[index]] = _rounds([1.9e-3] * len(batches))  # 5 %: past the margin
        return fake, 1.2

    monkeypatch.setattr(planner, "time_runners", time_runners)
    timings = {}
    plan, noise = planner.in_model_pass(arch, weights, start, timings, 1e18, (1, 8, 32))
    # layer 2's 4.7 MB first, then layer 1's 1.2 MB; layer 0's 55 KB is not checked (direct's
    # 9.6 KB would be fewer than half)
    assert [index for index, _ in checks] == [2, 1]
    assert checks[0][1][0] == "winograd4_phases" and "direct" in checks[0][1]
    # F(2x2, 3x3) over the phases: 16 products, 524 KB, fewer than half of 1.18 MB
    assert checks[1][1] == ("winograd4_phases", "direct", "winograd_phases")
    assert plan == {**start, 1: "direct"} and noise == 1.2
    assert set(timings) == {"in model 1", "in model 2"}
    # a plan already on the smaller variants has nothing to check; out of time, nothing changes
    checks.clear()
    small = {0: "direct", 1: "direct", 2: "direct"}
    assert planner.in_model_pass(arch, weights, small, {}, 1e18, (1,)) == (small, 1.0)
    assert checks == []
    monkeypatch.undo()
    assert planner.in_model_pass(arch, weights, start, {}, 0.0, (1,)) == (start, 1.0)


def test_the_pass_in_the_model_times_near_ties_of_large_layers(fresh_planner, monkeypatch):
    """A large layer's variants of as many bytes whose scores alone were within NEAR_TIE of
    the current variant's are timed in the model too (alone, the weights may stay in cache
    where in the model they stream from L3); those further off, and small layers, are not."""
    from convserve.core.bench_models import bench_model

    planner = fresh_planner
    doc = bench_model("wide_dense")  # 784 -> 1,024 (3.2 MB) -> 512 (2 MB) -> 10
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    start = {1: "passes", 2: "passes"}
    tie = 1.09  # within NEAR_TIE of the current variant's score
    assert 1 + planner.SWITCH_MARGIN < tie < planner.NEAR_TIE < 1.12
    timings = {
        1: {"passes": _rounds([1e-3] * 3), "one_pass": _rounds([1.12e-3] * 3),
            "strips": _rounds([tie * 1e-3] * 3)},
        2: {"passes": _rounds([1e-3] * 3), "one_pass": _rounds([1.12e-3] * 3),
            "strips": _rounds([1.15e-3] * 3)},
    }  # fmt: skip
    checks = []

    def time_runners(runners, shape, deadline, batches, seed, *_, **__):
        checks.append((seed, tuple(runners)))
        fake = {v: _rounds([2e-3] * len(batches)) for v in runners}
        fake["strips"] = _rounds([1.5e-3] * len(batches))  # in the model, strips win
        return fake, 1.1

    monkeypatch.setattr(planner, "time_runners", time_runners)
    plan, noise = planner.in_model_pass(arch, weights, start, timings, 1e18, (1, 8, 256))
    assert checks == [(1, ("passes", "strips"))]  # not one_pass (1.12x), not layer 2
    assert plan == {1: "strips", 2: "passes"} and noise == 1.1
    assert set(timings) == {1, 2, "in model 1"}
    checks.clear()  # a layer under IN_MODEL_MIN_BYTES is not checked, however close
    monkeypatch.setattr(planner, "IN_MODEL_MIN_BYTES", 4 << 20)  # both layers under it
    assert planner.in_model_pass(arch, weights, start, dict(timings), 1e18, (1,)) == (start, 1.0)
    assert checks == []


def test_batches_below_parallel_min_batch_are_timed_on_one_thread(fresh_planner, monkeypatch):
    """A server runs batches below --parallel-min-batch on one numba thread
    (`threads.threads_by_batch`): the planner times them so, restores the thread count after,
    also out of time, and keys the plan on that policy; `Model` passes it on."""
    import numba

    planner = fresh_planner
    most = numba.get_num_threads()
    seen: list[tuple[int, int]] = []

    class Runner:
        def run(self, x):
            seen.append((x.shape[0], numba.get_num_threads()))

    timed = planner.time_runners({"a": Runner(), "b": Runner()}, (2, 2, 1), 1e18, (1, 8, 32), 0, 16)
    assert timed is not None
    assert {n: t for n, t in seen} == {1: 1, 8: 1, 32: most}
    assert numba.get_num_threads() == most
    seen.clear()
    assert planner.time_runners({"a": Runner()}, (2, 2, 1), 0.0, (1, 32), 0, 16) is None
    assert numba.get_num_threads() == most

    doc = preset("cifar10")
    arch = parse_architecture(doc)
    key = {m: planner.plan_key(arch, (1, 8, 32), m) for m in (0, 1, 2, 8, 9, 16, 32, 33)}
    # the key follows which of the timed batches run on one thread
    assert key[0] == key[1] and key[2] == key[8] and key[9] == key[16] == key[32]
    assert len({key[0], key[2], key[9], key[33]}) == 4
    asked = {}

    def plan_for(arch, weights, cache_dir=None, **options):
        asked.update(options)
        return default_plan(arch), BATCH_CHUNK

    monkeypatch.setattr(planner, "plan_for", plan_for)
    model = Model(doc, random_weights(doc), parallel_min_batch=16)
    model.replica().warmup((1,))
    assert asked["parallel_min_batch"] == 16


def test_every_candidate_is_compiled_before_the_clock_starts(tmp_path, fresh_planner, monkeypatch):
    """Before timing (when not cached and given time), `plan_for` runs every variant of every
    layer alone at each timing batch, twice, on the threads it is timed on, so that compiling
    kernels on a machine's first start does not use up the timing's PLAN_SECONDS; the thread
    count is restored after. A batch whose run would take longer than COMPILE_RUN_SECONDS (by
    the second run of the batch before) is skipped. Given no time, nothing runs."""
    import numba

    planner = fresh_planner
    most = numba.get_num_threads()
    doc = preset("fashion_mnist")
    arch = parse_architecture(doc)
    weights = random_weights(doc)
    runs: list[tuple[int, str, int, int]] = []
    real_runner = planner._block_runner

    class Recorder:
        def __init__(self, arch_, block, weights_, variant):
            self.architecture = real_runner(arch_, block, weights_, variant).architecture
            self.where = (block.layer.index, variant)

        def run(self, x):
            runs.append((*self.where, x.shape[0], numba.get_num_threads()))

    measured: list[tuple[float, int]] = []

    def measure_plan(arch_, weights_, seconds, batches, parallel_min_batch):
        measured.append((seconds, len(runs)))
        return default_plan(arch_), {}, None

    monkeypatch.setattr(planner, "_block_runner", Recorder)
    monkeypatch.setattr(planner, "measure_plan", measure_plan)
    planner.plan_for(arch, weights, tmp_path, seconds=1.5, parallel_min_batch=16)
    batches = planner.timing_batches(BATCH_CHUNK)
    expected = [
        (block.layer.index, variant, n, 1 if n < 16 else most)
        for block, variants in planner._choices(arch)
        for variant in variants
        for n in batches
    ]
    assert sorted(runs) == sorted(expected * 2) and len(expected) > len(batches)
    assert measured == [(1.5, 2 * len(expected))]  # after compiling, with all its seconds
    assert numba.get_num_threads() == most
    runs.clear()
    planner._memo.clear()
    planner.plan_for(arch, weights, tmp_path / "none", seconds=0.0)
    assert runs == [] and len(measured) == 2
    monkeypatch.setattr(planner, "COMPILE_RUN_SECONDS", 0.0)  # every larger batch "too long"
    planner._memo.clear()
    planner.plan_for(arch, weights, tmp_path / "small", seconds=1.5, parallel_min_batch=16)
    assert sorted(runs) == sorted(2 * [e for e in expected if e[2] == batches[0]])
