"""The GEMM rows every conv and dense kernel runs on (`gemm._conv_row`) and the 16-unit dense
kernel (`dense._segmented_rows`), with the block shapes of every register file the core knows
(AVX-512: 32 vectors of 16 floats, AVX2: 8, SSE: 4) and weights in rows or in strips of 16
columns, whatever this machine has: the NumPy float64 reference on randomized shapes, and the
same bits for every register file and layout (each output is one in-order chain of fused
multiply-adds whatever its block)."""

from __future__ import annotations

import numpy as np
import pytest
from convserve.core.kernels import dense, direct, first_layer, gemm, ir
from convserve.core.layers.conv2d import in_strips
from convserve.core.layers.dense import pack_dense

REGISTER_FILES = (32, 8, 4)  # vectors of 16 floats: AVX-512, AVX2, SSE


def _row(a, b, count, width, lda, k, vectors, narrow, strips, passes=1):
    """`_conv_row` over `count` outputs (rows of `a`, lda apart) x `width` columns of b (k rows,
    ldb = width; with `strips`, b in strips of 16 columns), in `passes` calls over consecutive
    parts of k (the later ones add on)."""
    tile = np.full(count * width, np.nan, np.float32)
    bounds = np.linspace(0, k, passes + 1).astype(int)
    ldb, strip = (16, 16 * k) if strips else (width, 16)
    wf = in_strips(b.reshape(k, width)).ravel() if strips else b
    for p in range(passes):
        k0, k1 = bounds[p], bounds[p + 1]
        gemm._conv_row(
            a, k0, lda, 0, 1, k1 - k0, wf, k0 * ldb, ldb, tile, 0, width, count, width,
            1 if p else 0, narrow, vectors, strip,
        )  # fmt: skip
    return tile.reshape(count, width)


@pytest.mark.parametrize("seed", range(12))
def test_gemm_rows_match_float64_on_every_register_file(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.choice([1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 29]))
    width = 16 * int(rng.integers(1, 9))
    k = int(rng.integers(1, 300))
    lda = k + int(rng.integers(0, 5))  # rows of a may be further apart than k
    narrow = int(rng.integers(0, 2))
    passes = int(rng.integers(1, 4)) if k >= 3 else 1
    a = rng.standard_normal(count * lda).astype(np.float32)
    b = rng.standard_normal(k * width).astype(np.float32)
    rows = a.reshape(count, lda)[:, :k].astype(np.float64)
    expected = rows @ b.reshape(k, width).astype(np.float64)
    ways = [(v, strips) for v in REGISTER_FILES for strips in (False, True)]
    results = [_row(a, b, count, width, lda, k, v, narrow, s, passes) for v, s in ways]
    scale = np.sqrt(k)
    for way, got in zip(ways, results):
        np.testing.assert_allclose(got / scale, expected / scale, atol=1e-5, err_msg=f"{way}")
    for way, got in zip(ways[1:], results[1:]):
        np.testing.assert_array_equal(got, results[0], err_msg=f"{way} (vectors, strips)")


@pytest.mark.parametrize("seed", range(8))
def test_gemm_rows_ending_in_bias_and_activation_give_the_pass_after_them_bit_for_bit(seed):
    """`_conv_row` with a bias (the micro-kernels' `epilogue`): its last pass stores act(sum +
    bias) for ReLU and linear, the same bits as the plain sums followed by that addition and
    max in float32, on every register file, for a range of columns from any 16 (the bias read
    from there too)."""
    rng = np.random.default_rng(900 + seed)
    count = int(rng.choice([1, 2, 3, 5, 6, 7, 8, 12, 13, 29]))
    width = 16 * int(rng.integers(1, 9))
    k = int(rng.integers(1, 300))
    passes = int(rng.integers(1, 4)) if k >= 3 else 1
    c0 = 16 * int(rng.integers(0, 3))  # the range's first column, and its bias's
    a = rng.standard_normal(count * k).astype(np.float32)
    b = rng.standard_normal(k * width).astype(np.float32)
    bias = rng.standard_normal(c0 + width).astype(np.float32)
    bounds = np.linspace(0, k, passes + 1).astype(int)
    for vectors in REGISTER_FILES:
        for narrow in (0, 1):
            sums = _row(a, b, count, width, k, k, vectors, narrow, False, passes)
            for act in (0, 1):
                tile = np.full(count * width, np.nan, np.float32)
                for p in range(passes):
                    k0, k1 = bounds[p], bounds[p + 1]
                    more = 1 if p else 0
                    if p < passes - 1:
                        gemm._conv_row(
                            a, k0, k, 0, 1, k1 - k0, b, k0 * width, width, tile, 0, width,
                            count, width, more, narrow, vectors,
                        )  # fmt: skip
                    else:
                        gemm._conv_row(
                            a, k0, k, 0, 1, k1 - k0, b, k0 * width, width, tile, 0, width,
                            count, width, more, narrow, vectors, bias=bias, act=act, bias_at=c0,
                        )  # fmt: skip
                expected = sums + bias[c0:]
                if act == 1:
                    expected = np.where(expected > 0, expected, np.float32(0))
                np.testing.assert_array_equal(
                    tile.reshape(count, width), expected, err_msg=f"{vectors}, {narrow}, {act}"
                )


def _run(a, b, count, width, k, lda, segs, a_step, col0, row_len, jump, vectors, narrow, strips):
    """`_conv_row` over a run of `count` conv pixels on rows of row_len (first at column col0;
    pixel i's inputs: `segs` segments of k, a_step apart, from its own start, which moves on
    by lda a pixel and jump more at each row end) x `width` columns of b (segs * k rows)."""
    tile = np.full(count * width, np.nan, np.float32)
    ldb, strip = (16, 16 * segs * k) if strips else (width, 16)
    wf = in_strips(b.reshape(segs * k, width)).ravel() if strips else b
    gemm._conv_row(
        a, 0, lda, a_step, segs, k, wf, 0, ldb, tile, 0, width, count, width, 0, narrow, vectors,
        strip, col0, row_len, jump,
    )  # fmt: skip
    return tile.reshape(count, width)


@pytest.mark.parametrize("seed", range(10))
def test_gemm_runs_over_row_ends_match_float64_on_every_register_file(seed):
    """A run of conv pixels over several output rows (`row_len` > 0): blocks that cross a
    row end take the next row's inputs from after the jump. Against float64 with every
    register file and weight layout, the same bits every way and as each pixel alone."""
    rng = np.random.default_rng(500 + seed)
    row_len = int(rng.integers(1, 12))
    col0 = int(rng.integers(0, row_len))
    count = int(rng.integers(1, 40))
    width = 16 * int(rng.integers(1, 9))
    k, segs = int(rng.integers(1, 40)), int(rng.integers(1, 4))
    lda = int(rng.integers(1, 3)) * k  # pixels one or two steps apart
    jump = int(rng.integers(1, 30))
    a_step = row_len * lda + jump + 7  # a segment's next kernel row
    starts = []  # each pixel's first input
    at, col = 0, col0
    for _ in range(count):
        starts.append(at)
        at, col = at + lda, col + 1
        if col == row_len:
            at, col = at + jump, 0
    a = rng.standard_normal(starts[-1] + (segs - 1) * a_step + k).astype(np.float32)
    b = rng.standard_normal(segs * k * width).astype(np.float32)
    fields = np.array([np.concatenate([a[s + g * a_step : s + g * a_step + k]
                                       for g in range(segs)]) for s in starts])  # fmt: skip
    expected = fields.astype(np.float64) @ b.reshape(segs * k, width).astype(np.float64)
    results = {}
    for vectors in REGISTER_FILES:
        for strips in (False, True):
            for narrow in (0, 1):
                results[vectors, strips, narrow] = _run(
                    a, b, count, width, k, lda, segs, a_step, col0, row_len, jump, vectors,
                    narrow, strips,
                )  # fmt: skip
    first = next(iter(results.values()))
    scale = np.sqrt(segs * k)
    where = f"{count} pixels from column {col0} of {row_len}, {width} columns, {segs}x{k}"
    for way, got in results.items():
        np.testing.assert_allclose(
            got / scale, expected / scale, atol=1e-5, err_msg=f"{way} {where}"
        )
        np.testing.assert_array_equal(got, first, err_msg=f"{way} {where}")
    for i, s in enumerate(starts):  # each pixel alone, no runs
        alone = _run(a[s:], b, 1, width, k, lda, segs, a_step, 0, None, 0, 32, 0, False)
        np.testing.assert_array_equal(alone[0], first[i], err_msg=f"pixel {i} {where}")


def test_gemm_rows_of_one_to_five_inputs_take_each_input_once():
    """The micro-kernels take a segment's inputs two a step, then the odd one out: with 1-5
    inputs, in one call or in passes of 1-2 (an input skipped or taken twice would be far off
    float64), every register file and layout alike."""
    rng = np.random.default_rng(77)
    for k in range(1, 6):
        for count in (1, 4, 6, 13):
            for passes in range(1, min(k, 3) + 1):
                a = rng.standard_normal(count * k).astype(np.float32)
                b = rng.standard_normal(k * 64).astype(np.float32)
                expected = a.reshape(count, k).astype(np.float64) @ b.reshape(k, 64)
                ways = [(v, strips) for v in REGISTER_FILES for strips in (False, True)]
                results = [_row(a, b, count, 64, k, k, v, 0, s, passes) for v, s in ways]
                for way, got in zip(ways, results):
                    where = f"{way}, {k} inputs, {count} rows, {passes} passes"
                    np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=where)
                    np.testing.assert_array_equal(got, results[0], err_msg=where)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_short_gemm_rows_take_several_vectors_on_every_layout(count):
    """Rows of 1-3 outputs on 16-128 columns, narrow or not: the several-vector blocks of short
    rows (1 x 64 and 1-2 x 32, from strips too: `_mk1x4s`, `_mk1x2s`, `_mk2x2s`) against
    float64, the same bits every way."""
    rng = np.random.default_rng(count)
    for width in range(16, 129, 16):
        for narrow in (0, 1):
            k = int(rng.integers(1, 200))
            a = rng.standard_normal(count * k).astype(np.float32)
            b = rng.standard_normal(k * width).astype(np.float32)
            expected = a.reshape(count, k).astype(np.float64) @ b.reshape(k, width)
            ways = [(v, strips) for v in REGISTER_FILES for strips in (False, True)]
            results = [_row(a, b, count, width, k, k, v, narrow, s) for v, s in ways]
            for way, got in zip(ways, results):
                where = f"{way}, width {width}, narrow {narrow}"
                np.testing.assert_allclose(got, expected, atol=1e-4 * np.sqrt(k), err_msg=where)
                np.testing.assert_array_equal(got, results[0], err_msg=where)


@pytest.mark.parametrize("vectors", REGISTER_FILES)
@pytest.mark.parametrize("strips", [False, True])
def test_gemm_blocks_keep_their_accumulators_in_registers(vectors, strips):
    """Every block `_block_shape` picks fits the register file: rows x vectors accumulators, the
    weight vectors and a broadcast input (with fewer than 32 registers, rows of 1-2 outputs
    may take all the accumulators a register file holds, their weights read from memory). From
    weights in strips, several vectors a call only for rows of 1-2 outputs (`_mk1x4s`...)."""
    for count in range(1, 40):
        for left in range(16, 257, 16):
            for narrow in (0, 1):
                nv, lo, hi = gemm._block_shape(count, left, narrow, vectors, strips)
                assert 16 * nv <= left and (nv <= 2 or not narrow)
                assert 1 <= lo <= hi
                rows = count if count < lo else hi
                if vectors >= 32:
                    assert rows * nv + nv + 1 <= vectors
                elif count > 2:
                    assert nv == 1 and rows + 2 <= vectors
                else:
                    assert rows * nv <= vectors
                if strips and nv > 1:
                    assert count <= 2 and (nv == 2 or count == 1)
    assert gemm._block_shape(40, 64, 0, 8, strips) == (1, 4, 6)  # AVX2: 16 channels x 4-6 rows
    assert gemm._block_shape(40, 64, 0, 32, False) == (4, 4, 6)  # AVX-512: 64 x 4-6


@pytest.mark.parametrize("k", [5, 130, 4096, 4001])
def test_sixteen_unit_rows_match_float64_on_every_register_file(k):
    """`_segmented_rows`, 1-6 rows: chains together or one part after another, by register
    file and by whether the parts alias in L1 (4,096 inputs), all the same bits; and on the
    rows of 1-15 units back to back (`pack_dense`'s layout below 16 units), the same bits in
    those units."""
    rng = np.random.default_rng(k)
    for count in range(1, dense.SIX + 1):
        a = rng.standard_normal(count * k).astype(np.float32)
        w = rng.standard_normal(k * 16).astype(np.float32)
        expected = a.reshape(count, k).astype(np.float64) @ w.reshape(k, 16).astype(np.float64)
        results = []
        for vectors in REGISTER_FILES:
            tile = np.full(dense.SIX * 64, np.nan, np.float32)
            dense._segmented_rows(a, 0, k, w, tile, count, 16, vectors)
            got = tile.reshape(dense.SIX, 64)[:count, :16]
            np.testing.assert_allclose(got / np.sqrt(k), expected / np.sqrt(k), atol=1e-5)
            results.append(got)
        for got in results[1:]:
            np.testing.assert_array_equal(got, results[0], err_msg=f"{count} rows")
        for units in (1, 10, 15):
            packed, _ = pack_dense(w.reshape(k, 16)[:, :units], None)
            assert packed.size == k * units + 16 - units
            tile = np.full(dense.SIX * 64, np.nan, np.float32)
            dense._segmented_rows(a, 0, k, packed, tile, count, units)
            got = tile.reshape(dense.SIX, 64)[:count, :units]
            np.testing.assert_array_equal(got, results[0][:, :units], err_msg=f"{units} units")


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("filters,size", [(6, 5), (8, 5), (3, 3), (7, 4)])
def test_first_layer_pixel_blocks_match_float64_with_either_register_file(filters, size, average):
    """`conv1_pixels_pool2` (one input channel, at most 8 filters, output pixels in the lanes)
    with AVX-512's blocks (6 or 8 filters x 32 pixels) and AVX2's (6 or 4 x 16): valid conv +
    bias + ReLU + 2x2/2 max pool (or sigmoid + average pool) against float64, the same bits
    both ways."""
    rng = np.random.default_rng(filters * 10 + size)
    n, h, w = 3, 14 + size, 37 + size
    ph, pw = (h - size + 1) // 2, (w - size + 1) // 2
    wp = max(w, (2 * pw + 31) // 32 * 32 + size - 1)  # its 32-pixel blocks read past the edge
    x = np.zeros((n, h, wp, 1), np.float32)
    x[:, :, :w, 0] = rng.standard_normal((n, h, w))
    kernel = rng.standard_normal((size, size, filters)).astype(np.float32)
    wt = np.zeros((8, size * size), np.float32)
    wt[:filters] = kernel.reshape(size * size, filters).T
    bias = rng.standard_normal(filters).astype(np.float32)
    conv = np.zeros((n, h - size + 1, w - size + 1, filters))
    for dy in range(size):
        for dx in range(size):
            window = x[:, dy : dy + h - size + 1, dx : dx + w - size + 1, 0].astype(np.float64)
            conv += window[..., None] * kernel[dy, dx].astype(np.float64)
    conv = conv + bias
    conv = (1 / (1 + np.exp(-conv)) if average else np.maximum(conv, 0))[:, : 2 * ph, : 2 * pw]
    windows = conv.reshape(n, ph, 2, pw, 2, filters)
    expected = windows.mean(axis=(2, 4)) if average else windows.max(axis=(2, 4))
    act = 3 if average else 1  # sigmoid, relu
    results = []
    for wide in (True, False):
        tiles = np.zeros((2, 512), np.float32)
        out = np.full((n, ph, pw, filters), np.nan, np.float32)
        first_layer.conv1_pixels_pool2(x, wt, bias, tiles, out, size, size, act, average, wide)
        np.testing.assert_allclose(out, expected, atol=1e-4 * size, err_msg=f"wide {wide}")
        results.append(out)
    np.testing.assert_array_equal(results[1], results[0])


SLIDES = [(3, 1), (3, 2), (5, 1), (5, 2), (7, 2)]  # (kernel width, stride) of `ir._slider`s


@pytest.mark.parametrize("seed", range(10))
def test_sliding_window_rows_match_float64_and_give_the_generic_rows_bits(seed):
    """`direct._slid_pixels` (16 filters over 3 channels, `ir._slider`): a row of 1-60 pixels
    of a kernel kh x kw at stride sw, bias and ReLU or linear, against float64; the same bits
    as `direct._pixels_out`'s generic micro-kernels; every pixel written once its row has a
    block, none where it has not or the shape has no sliding kernel (then False)."""
    rng = np.random.default_rng(seed)
    kw, sw = SLIDES[seed % len(SLIDES)]
    kh = int(rng.integers(1, 8))
    count = int(rng.integers(1, 61))
    act = int(rng.integers(0, 2))
    width = (count - 1) * sw + kw + int(rng.integers(0, 4))  # input columns, some left over
    row = width * 3 + int(rng.integers(0, 5))  # rows may be further apart than a row
    a_off = int(rng.integers(0, 7))
    xf = rng.standard_normal(a_off + kh * row).astype(np.float32)
    wk = rng.standard_normal((kh * kw * 3, 16)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    o = int(rng.integers(0, 5))
    windows = np.stack(
        [xf[a_off + ky * row : a_off + ky * row + width * 3].reshape(width, 3) for ky in range(kh)]
    ).astype(np.float64)
    kernel = wk.reshape(kh, kw, 3, 16).astype(np.float64)
    expected = (
        np.stack(
            [
                np.einsum("yxc,yxco->o", windows[:, i * sw : i * sw + kw], kernel)
                for i in range(count)
            ]
        )
        + bias
    )
    if act == 1:
        expected = np.maximum(expected, 0)
    slid = np.full(o + count * 16 + 5, np.nan, np.float32)
    block = getattr(ir, f"SLIDE_{kw}S{sw}")  # pixels a call
    done = direct._slid_pixels(
        xf, a_off, row, kh, kw, sw, 3, wk.ravel(), 16, slid, o, 16, count, bias, act
    )  # fmt: skip
    assert done == (count >= block)
    got = slid[o : o + count * 16].reshape(count, 16)
    if not done:
        assert np.isnan(slid).all()
        return
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.sqrt(kh * kw * 3))
    generic = np.full_like(slid, np.nan)
    direct._pixels_out(
        xf, a_off, sw * 3, row, kh, kw, 3, wk.ravel(), 16, 16, np.zeros(4096, np.float32),
        generic, o, 16, count, 0, bias, act, True,
    )  # fmt: skip
    np.testing.assert_array_equal(got, generic[o : o + count * 16].reshape(count, 16))
    assert np.isnan(slid[:o]).all() and np.isnan(slid[o + count * 16 :]).all()  # no more


def test_sliding_window_rows_only_take_their_shapes():
    """Shapes without a sliding kernel are left to the generic micro-kernels: 1 or 4 input
    channels, a 7-wide kernel at stride 1, a 3-wide one at stride 3."""
    xf = np.ones(4096, np.float32)
    wk = np.ones(4096, np.float32)
    out = np.zeros(4096, np.float32)
    bias = np.zeros(16, np.float32)
    for kw, sw, ci in [(3, 1, 1), (3, 2, 4), (7, 1, 3), (3, 3, 3)]:
        assert not direct._slid_pixels(xf, 0, 300, 3, kw, sw, ci, wk, 16, out, 0, 16, 30, bias, 1)
    assert not out.any()
