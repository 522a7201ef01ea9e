"""Winograd kernels: the transforms built from interpolation points are exact, and the
`winograd` (F(2x2, 3x3)), `winograd4` (F(4x4, 3x3)) and `winograd5` (F(2x2, 5x5)) variants, and
F(4x4, 3x3) and F(2x2, 3x3) over a stride-2 conv's input phases (`winograd4_phases`,
`winograd_phases`) and F(4x4, 3x3) over shifted inputs (`winograd4_split`), match the
NumPy reference on randomized shapes and are bit-identical across batch sizes."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from convserve.core.architecture import parse_architecture
from convserve.core.inference import BATCH_CHUNK, InferencePlan
from convserve.core.kernels.winograd_transforms import F2X2_3X3, F2X2_5X5, F4X4_3X3, toom_cook

from tests import reference_numpy as ref
from tests.conftest import random_weights

TOLERANCE = 1e-4  # relative to the output's scale
KERNEL_SIZE = {"winograd": 3, "winograd4": 3, "winograd5": 5}


def _correlate(d: list[Fraction], g: list[Fraction], m: int) -> list[Fraction]:
    return [sum(d[k + j] * g[j] for j in range(len(g))) for k in range(m)]


@pytest.mark.parametrize(
    "m,r,points",
    [(2, 3, (0, 1, -1)), (2, 5, (0, 1, -1, 2, -2)), (4, 3, (0, 1, -1, 2, Fraction(-1, 2)))],
)
def test_toom_cook_transforms_compute_the_correlation_exactly(m, r, points):
    """A^T [(G g) * (B^T d)] is the 1-D correlation of d with g, in exact arithmetic, for random
    integer data; B^T's rows are integers."""
    t = toom_cook(m, r, points)
    assert t.alpha == m + r - 1
    assert all(v.denominator == 1 for row in t.bt for v in row)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(20):
        d = [Fraction(int(v)) for v in rng.integers(-50, 51, t.alpha)]
        g = [Fraction(int(v)) for v in rng.integers(-50, 51, r)]
        gg = [sum(a * b for a, b in zip(row, g)) for row in t.g]
        dd = [sum(a * b for a, b in zip(row, d)) for row in t.bt]
        y = [sum(a * p * q for a, p, q in zip(row, gg, dd)) for row in t.at]
        assert y == _correlate(d, g, m)


def test_toom_cook_refuses_bad_points():
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook(2, 3, (0, 1, 1))
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook(2, 5, (0, 1, -1))


def test_kernel_transform_is_float64_and_exact_on_2d():
    """G g G^T from `Transform.kernel` with the input/output sides gives the 2-D correlation."""
    rng = np.random.default_rng(5)
    for t in (F2X2_3X3, F4X4_3X3, F2X2_5X5):
        g = rng.standard_normal((t.r, t.r, 1, 1))
        d = rng.standard_normal((t.alpha, t.alpha))
        u = t.kernel(g)
        assert u.dtype == np.float64 and u.shape == (t.alpha**2, 1, 1)
        bt, at = np.array(t.bt, np.float64), np.array(t.at, np.float64)
        y = at @ (u.reshape(t.alpha, t.alpha) * (bt @ d @ bt.T)) @ at.T
        want = [
            [np.sum(d[i : i + t.r, j : j + t.r] * g[:, :, 0, 0]) for j in range(t.m)]
            for i in range(t.m)
        ]
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def _case(
    rng: np.random.Generator,
    variant: str,
    pool: str | None,
    act: str,
    padding: str,
    kernel: list[int] | None = None,
    strides: int = 1,
):
    """A one-conv model (its flattened output is the model's output) with random odd or even sizes and
    channel counts that are not multiples of 16 (some above, some below)."""
    kernel = kernel or [KERNEL_SIZE[variant]] * 2
    narrow = [1, 3] if variant not in ("winograd4", "winograd5") else []  # 8 channels on
    channels = int(rng.choice([*narrow, 8, 13, 17, 32, 35]))
    if variant == "winograd_phases":  # offered from 16 channels on
        channels = int(rng.choice([16, 17, 32, 35]))
    filters = int(rng.choice([1, 5, 16, 20, 37, 64, 70]))
    low = max(kernel) + strides if padding == "valid" else strides + 1  # 2 outputs a side
    h, w = (int(v) for v in rng.integers(low, 20 + 4 * strides, size=2))
    layers = [
        {
            "type": "conv2d",
            "filters": filters,
            "kernel_size": kernel,
            "strides": strides,
            "padding": padding,
            "activation": act,
            "use_bias": bool(rng.random() < 0.8),
        }
    ]
    if pool:
        layers.append({"type": f"{pool}_pooling2d", "pool_size": 2})
    layers.append({"type": "flatten"})  # a free view: the conv block's output is compared
    doc = {
        "name": "wino",
        "input": {
            "shape": [h, w, channels],
            "scale": 1 / 255,
            "mean": [0.3] * channels,
            "std": [0.6] * channels,
        },
        "layers": layers,
    }
    return doc


CASES = [
    (variant, pool, act, padding)
    for variant in KERNEL_SIZE
    for pool in (None, "max", "average")
    for act in ("linear", "relu", "tanh", "sigmoid")
    for padding in ("valid", "same")
]


def _check_against_the_reference(plan, doc: dict, weights: dict, rng, where: str) -> None:
    """Two chunks of float input and 5 images of raw pixels match the NumPy reference, and
    slices of the batch give the same bits as the whole."""
    shape = plan.architecture.input_shape
    n = BATCH_CHUNK + 3  # two chunks
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    where = f"{where} {shape}"
    expected = ref.forward(doc, weights, x)
    got = plan.run(x)
    scale = max(float(np.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE * scale, rtol=0, err_msg=where)
    pixels = rng.integers(0, 256, x.shape).astype(np.uint8)[:5]
    expected_raw = ref.forward(doc, weights, pixels, preprocess=True)
    scale = max(float(np.abs(expected_raw).max()), 1e-3)
    got_raw = plan.run(pixels, preprocess=True)
    np.testing.assert_allclose(got_raw, expected_raw, atol=TOLERANCE * scale, rtol=0, err_msg=where)
    for start, stop in ((0, 1), (2, 9), (n - 1, n), (1, BATCH_CHUNK + 2)):
        assert np.array_equal(plan.run(x[start:stop]), got[start:stop]), f"{where} {start}-{stop}"


@pytest.mark.parametrize("variant,pool,act,padding", CASES)
def test_winograd_variants_match_the_reference_and_are_batch_invariant(variant, pool, act, padding):
    rng = np.random.default_rng(CASES.index((variant, pool, act, padding)))
    for trial in range(2):
        doc = _case(rng, variant, pool, act, padding)
        arch = parse_architecture(doc)
        weights = random_weights(doc, seed=trial)
        plan = InferencePlan(arch, weights, {0: variant})
        step = plan.steps[0]
        assert type(step).__name__ == "WinogradConv"
        assert step.pool == (pool is not None)  # the 2x2/2 pool is fused
        assert step.u.shape[0] == (16 if variant == "winograd" else 36)
        assert step.size == (4 if variant == "winograd4" else 2)
        _check_against_the_reference(plan, doc, weights, rng, f"{variant} {doc['layers']}")


PHASE_CASES = [
    (pool, padding) for pool in (None, "max", "average") for padding in ("valid", "same")
]
PHASE_SIZES = {"winograd4_phases": 4, "winograd_phases": 2}  # outputs per tile side


@pytest.mark.parametrize("variant", PHASE_SIZES)
@pytest.mark.parametrize("pool,padding", PHASE_CASES)
def test_stride_2_convs_over_the_input_phases_match_the_reference(pool, padding, variant):
    """Stride-2 convs with kernels of 4-6 a side (square or not), run as 3x3 F(4x4, 3x3) or
    F(2x2, 3x3) convs over the input's 2x2 phases, match the reference on odd and even sides,
    as a first layer on raw pixels too, and are bit-identical across batch sizes."""
    size = PHASE_SIZES[variant]
    seed = 100 + PHASE_CASES.index((pool, padding)) + 50 * list(PHASE_SIZES).index(variant)
    rng = np.random.default_rng(seed)
    for trial in range(5):
        kernel = [int(v) for v in rng.integers(4, 7, size=2)]
        act = str(rng.choice(["linear", "relu", "tanh", "sigmoid"]))
        doc = _case(rng, variant, pool, act, padding, kernel=kernel, strides=2)
        arch = parse_architecture(doc)
        weights = random_weights(doc, seed=trial)
        plan = InferencePlan(arch, weights, {0: variant})
        step = plan.steps[0]
        assert type(step).__name__ == "WinogradConv" and step.views == (2, 2, 1, 2)
        assert step.pool == (pool is not None)  # the 2x2/2 pool is fused
        assert step.u.shape[0] == (size + 2) ** 2 and step.size == size
        assert step.u.size // step.u.shape[0] // step.bias.size == 4 * arch.input_shape[2]
        _check_against_the_reference(plan, doc, weights, rng, f"{variant} {doc['layers']}")


SPLIT_CASES = PHASE_CASES


@pytest.mark.parametrize("pool,padding", SPLIT_CASES)
def test_stride_1_kernels_in_3x3_blocks_match_the_reference(pool, padding):
    """Stride-1 convs with kernels other than 3x3 (2-9 a side, square or not, padded to 3x3
    blocks), run as F(4x4, 3x3) convs over shifted views of the input, match the reference
    on odd and even sides, as a first layer on raw pixels too, and are bit-identical across
    batch sizes."""
    variant = "winograd4_split"
    rng = np.random.default_rng(200 + SPLIT_CASES.index((pool, padding)))
    sizes = [[2, 2], [4, 4], [5, 5], [6, 6], [7, 7], [3, 7], [4, 2], [8, 9]]
    for trial in range(5):
        kernel = sizes[int(rng.integers(len(sizes)))]
        act = str(rng.choice(["linear", "relu", "tanh", "sigmoid"]))
        doc = _case(rng, variant, pool, act, padding, kernel=kernel)
        arch = parse_architecture(doc)
        weights = random_weights(doc, seed=trial)
        plan = InferencePlan(arch, weights, {0: variant})
        step = plan.steps[0]
        blocks = (-(-kernel[0] // 3), -(-kernel[1] // 3))
        assert type(step).__name__ == "WinogradConv" and step.views == (*blocks, 3, 1)
        assert step.pool == (pool is not None)  # the 2x2/2 pool is fused
        assert step.u.shape[0] == 36 and step.size == 4
        assert step.u.size // 36 // step.bias.size == blocks[0] * blocks[1] * arch.input_shape[2]
        _check_against_the_reference(plan, doc, weights, rng, f"{variant} {doc['layers']}")


def _taps_match(packed, kernel, reach: tuple[int, int], where) -> None:
    """Every tap (y, x) within `reach` of `kernel` (zeros past its edge) is tap (i, j) of view g
    of `packed`, (i, j, g) = where(y, x), channels g * CI + c."""
    kh, kw, ci, co = kernel.shape
    for y in range(reach[0]):
        for x in range(reach[1]):
            i, j, g = where(y, x)
            for c in range(ci):
                want = kernel[y, x, c] if y < kh and x < kw else np.zeros(co, np.float32)
                np.testing.assert_array_equal(packed[i, j, g * ci + c], want, f"{y} {x} {c}")


def test_a_kernel_over_views_keeps_every_tap_once():
    """`view_kernel`: in 3x3 blocks, tap (3a + i, 3b + j) of the kernel is tap (i, j) of block
    (a, b), whose channels are (a * gw + b) * CI + c; over a stride-2 conv's phases, tap
    (2i + p, 2j + q) is tap (i, j) of phase (p, q); the padding taps are zero, and a kernel
    past what its views reach is refused."""
    from convserve.core.layers.conv2d import PHASES, split_views, view_kernel, view_window

    kernel = np.arange(7 * 5 * 2 * 3, dtype=np.float32).reshape(7, 5, 2, 3) + 1
    views = split_views((7, 5))
    assert views == (3, 2, 3, 1) and view_window(views) == (9, 6)
    blocks = view_kernel(kernel, views)
    assert blocks.shape == (3, 3, 3 * 2 * 2, 3)
    # tap (y, x) = (3a + i, 3b + j): block (a, b) of 2 a row
    _taps_match(blocks, kernel, (9, 6), lambda y, x: (y % 3, x % 3, y // 3 * 2 + x // 3))
    five = kernel[:5]
    assert view_window(PHASES) == (6, 6)
    phases = view_kernel(five, PHASES)
    assert phases.shape == (3, 3, 4 * 2, 3)
    # tap (y, x) = (2i + p, 2j + q): phase (p, q)
    _taps_match(phases, five, (6, 6), lambda y, x: (y // 2, x // 2, y % 2 * 2 + x % 2))
    with pytest.raises(ValueError, match="reaches past"):
        view_kernel(kernel, PHASES)  # 7 rows: the phases reach 6


@pytest.mark.parametrize("variant", list(KERNEL_SIZE))
def test_winograd_tasks_of_any_band_of_tile_rows_give_the_same_bits(variant, monkeypatch):
    """A task's GEMMs take up to `BAND_TILES` tiles in whole rows of tiles: one row, several
    with a shorter last band, a whole image, or rows of several images (small images, and
    every image under a large `BAND_TILES`) give the reference's results and the same bits."""
    from convserve.core.layers import conv2d

    rng = np.random.default_rng(len(variant))
    for trial in range(6):
        doc = _case(rng, variant, [None, "max", "average"][trial % 3], "relu", "same")
        doc["input"]["shape"][:2] = [int(v) for v in rng.integers([2, 9][trial % 2], 24, size=2)]
        arch = parse_architecture(doc)
        weights = random_weights(doc, seed=trial)
        x = rng.standard_normal((7, *arch.input_shape)).astype(np.float32)
        expected = ref.forward(doc, weights, x)
        results = []
        for most in (1, 7, 16, 1000):
            monkeypatch.setattr(conv2d, "BAND_TILES", most)
            plan = InferencePlan(arch, weights, {0: variant})
            results += [plan.run(x), plan.run(x[:1]), plan.run(x[:2]), plan.run(x[:5])]
        where = f"{variant} {doc['layers']} {arch.input_shape}"
        scale = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(
            results[0], expected, atol=TOLERANCE * scale, rtol=0, err_msg=where
        )
        for i, got in enumerate(results):
            assert np.array_equal(got, results[0][: len(got)]), f"{where} result {i}"


def test_winograd_variants_are_offered_only_for_their_kernel_size_at_stride_1():
    """The planner may time `winograd4` (3x3) and `winograd5` (5x5) against `direct` on
    stride-1 convs of their kernel size from 8 input channels on, never elsewhere."""
    from convserve.core.layers.conv2d import FIVE_SPLIT_MAX_BYTES
    from convserve.core.layers.fusion import blocks

    def variants(kernel_size: int, strides: int, channels: int = 16) -> tuple[str, ...]:
        conv = {"type": "conv2d", "filters": 8, "kernel_size": kernel_size, "strides": strides}
        # 20 x 20: output rows of 6 pixels or more, so `patches` (short rows) is not offered
        doc = {"input": {"shape": [20, 20, channels]}, "layers": [conv, {"type": "flatten"}]}
        block = blocks(parse_architecture(doc).layers, inference=True)[0]
        return block.layer.inference_variants(block)

    assert variants(3, 1) == ("winograd", "direct", "winograd4")
    # 5x5: in 2x2 blocks of 3x3 first, F(2x2, 5x5) first past FIVE_SPLIT_MAX_BYTES
    assert variants(5, 1) == ("winograd4_split", "winograd5", "direct")
    big = 4 * 36 * 4 * 640 * 16  # floats of 640 -> 8 (16) channels in 2x2 blocks, in bytes
    assert big > FIVE_SPLIT_MAX_BYTES
    assert variants(5, 1, channels=640) == ("winograd5", "direct", "winograd4_split")
    for kernel_size, strides in ((3, 2), (7, 2), ([1, 7], 1), (1, 1), (5, 3), ([5, 3], 2)):
        assert not any(v.startswith("winograd") for v in variants(kernel_size, strides))
    # stride 1, other sizes: in 3x3 blocks, first from 8 input channels on for 4x4 and larger
    for kernel_size in (4, 6, 7, [3, 7], 9):
        assert variants(kernel_size, 1) == ("winograd4_split", "direct")
    for kernel_size in (4, 5, 6, 7, [3, 7], 9):
        assert variants(kernel_size, 1, channels=3) == ("direct", "winograd4_split")
    assert variants(2, 1) == ("direct", "winograd4_split")
    # not where the transformed kernel would outgrow SPLIT_MAX_BYTES (36 x 9 x 4096 x 16 floats)
    assert variants(7, 1, channels=4096) == ("direct",)
    assert variants(5, 1, channels=7) == ("direct", "winograd4_split")  # too few to pay
    assert variants(3, 1, channels=7) == ("direct", "winograd")
    # stride 2, 4-6 a side: F(4x4, 3x3) over the phases, first from 16 input channels on, and
    # F(2x2, 3x3) over them (fewer products read at one image) offered from there on
    for kernel_size in (4, 5, 6, [4, 6]):
        assert variants(kernel_size, 2) == ("winograd4_phases", "direct", "winograd_phases")
        assert variants(kernel_size, 2, channels=15) == ("direct", "winograd4_phases")
        assert variants(kernel_size, 2, channels=1) == ("direct", "winograd4_phases")
