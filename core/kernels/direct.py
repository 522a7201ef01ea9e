"""Direct convolution (NHWC, float32) + bias + activation, optionally fused with a max or average
pool (`conv_pool2` for 2x2/2 pools that tile the conv output, `conv_pool` for any other). Any
kernel size, stride and padding.

Weights are packed once by the plan in GEMM form `wk[K, COp]`: row k is tap k in (ky, kx, ci)
order for every filter, K = kh*kw*ci, `COp` = filters rounded up to 16 (zero columns); or,
where a micro-kernel block is 16 channels (AVX2, `gemm.STRIPS`), the same columns in strips of
16, each strip's K rows contiguous, as (COp/16 * K, 16).
The input is already padded (see `padding.py`). There is no patch copy ("implicit GEMM"): in
NHWC the (kx, ci) part of a pixel's receptive field is contiguous, so the micro-kernel walks
kernel rows as segments straight in the input.

An unpooled conv with ReLU or no activation, channels a multiple of 16 and weights in rows
ends each micro-kernel block in its bias and activation and stores it into the output itself
(`gemm._conv_row`'s `bias`); other convs store their sums in a per-thread tile, and a pass adds
bias and activation on the way to the output. `conv_raw` is `conv` on an unpadded input: each
task pads (and preprocesses) the input rows it reads, in place of a padding copy of the batch.

The output may be the interior of a larger, zero-bordered buffer: `at` = (y0, x0, OH, OW)
places the OH x OW outputs at row y0, column x0 of `out`, so a conv writes straight into the
padded input of the conv after it and that layer's padding copy is skipped.

`conv_pool2` computes the two conv rows of a pooled row and keeps the max of each 2x2 window;
max pooling commutes with the per-channel bias and with every monotonic activation, so bias and
activation run once per pooled value. Average pooling activates the four values, then averages.
"""

from __future__ import annotations

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _exponent_or, _store_pooled, _store_row
from convserve.core.kernels.gemm import WIDE, _conv_row
from convserve.core.kernels.ir import (
    SLIDE_3S1,
    SLIDE_3S2,
    SLIDE_5S1,
    SLIDE_5S2,
    SLIDE_7S2,
    _slide3s1,
    _slide3s2,
    _slide5s1,
    _slide5s2,
    _slide7s2,
)
from convserve.core.kernels.pool import _scale_into
from convserve.core.kernels.tasks import row_task
from numba import njit, prange

# Weight rows the micro-kernel calls over a row of pixels stream for one 64-channel block. A
# layer with more (3x3 over 64 channels: 576 rows, 147 KB, past L1) goes in chunks of whole
# taps, each call adding to the previous ones, so a chunk stays in cache across the row's
# calls. 256 rows (64 KB) measured fastest of 128, 256 and no chunks on 3x3 and 5x5 layers
# over 32-64 channels.
CHUNK_TAPS_ROWS = 256
# Weight rows per GEMM step of `conv_patches`: 64 rows of a 64-channel block (16 KB) and the
# group's 64 inputs a pixel (24 pixels: 6 KB) stay in L1 while the group's calls pass over them.
# On an Intel Xeon (AVX-512) 64 ran 0.88-0.94x the time of 128 on a 5x5/2 layer of 64 -> 128
# channels at 32 images.
PATCH_K_ROWS = 64
# Rows of one edge column a `conv_raw` edge task takes: a micro-kernel row of 12 pixels fills
# the widest block of 16 channels (`gemm._block_shape`).
EDGE_ROWS = 12
# `conv_raw`'s `wanted` where it reads no caller's input: no scan
NO_SCAN = np.zeros(1, np.int64)
# Output pixels a `conv_patches` task takes (fewer when the batch has too few for every thread)
PATCH_GROUP = 24


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _strip(K, COp, ldb):
    """The distance between consecutive 16 output channels in weights of K rows and COp
    channels whose rows are ldb floats apart: 16 in rows of all channels (ldb = COp), 16 * K in
    strips of 16 channels (ldb = 16; `gemm.STRIPS`)."""
    return 16 if ldb == COp else 16 * K


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _conv_pixels(
    xf, a_off, lda, row, kh, kw, CI, wf, COp, ldb, tile, t_off, count, narrow, c0=0, c1=0,
    col0=0, row_len=None, jump=0, bias=None, act=0,
):  # fmt: skip
    """tile[t_off + i*COp + j] = the conv sums of `count` pixels (pixel i's window from
    xf[a_off + i*lda], input rows `row` apart) for the channels c0 <= j < c1 (c1 = 0: all COp):
    one `_conv_row` over the kh kernel rows when the weights are small, else chunks of up to
    CHUNK_TAPS_ROWS rows of whole taps (kernel rows, then columns), in the same order, so the
    same bits either way. `narrow`: blocks of 32 channels (`_conv_row`). The weights' rows are
    ldb floats apart: COp (rows of all channels) or 16 (strips of 16 channels, `_strip`).
    With `row_len` the pixels run on over output rows of row_len pixels from column col0,
    `jump` input floats further at each row end (`_conv_row`; left out, it is None there too,
    and the row kernels' `_conv_row` is compiled without the wrapping blocks). With `bias` the
    last call over each output adds the bias and applies act (ReLU or linear) as it stores
    (`_conv_row`): the tile is then the layer's output, its rows COp apart."""
    strip = _strip(kh * kw * CI, COp, ldb)
    c1 = COp if c1 == 0 else c1
    b0 = c0 // 16 * strip
    t0 = t_off + c0
    if kh * kw * CI <= CHUNK_TAPS_ROWS:
        _conv_row(
            xf, a_off, lda, row, kh, kw * CI, wf, b0, ldb, tile, t0, COp, count, c1 - c0, 0,
            narrow, strip=strip, col0=col0, row_len=row_len, jump=jump, bias=bias, act=act,
            bias_at=c0,
        )  # fmt: skip
        return
    per = max(1, CHUNK_TAPS_ROWS // CI)  # kernel columns per chunk
    for ky in range(kh):
        for x0 in range(0, kw, per):
            x1 = min(kw, x0 + per)
            more = 1 if ky > 0 or x0 > 0 else 0
            if bias is not None:
                if ky == kh - 1 and x1 == kw:  # the last chunk: bias and activation
                    _conv_row(
                        xf, a_off + ky * row + x0 * CI, lda, 0, 1, (x1 - x0) * CI, wf,
                        b0 + (ky * kw + x0) * CI * ldb, ldb, tile, t0, COp, count, c1 - c0, more,
                        narrow, strip=strip, bias=bias, act=act, bias_at=c0,
                    )  # fmt: skip
                    continue
            _conv_row(
                xf, a_off + ky * row + x0 * CI, lda, 0, 1, (x1 - x0) * CI, wf,
                b0 + (ky * kw + x0) * CI * ldb, ldb, tile, t0, COp, count, c1 - c0, more, narrow,
                strip=strip, col0=col0, row_len=row_len, jump=jump,
            )  # fmt: skip


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _slide_calls(kernel, block, row_args):
    """`kernel` (an `ir._slider` of `block` pixels) over all count >= block pixels of a row,
    row_args = (xf, a_off, step, row, kh, wf, ldb, of, o, CO, count, bias, act) (`_slid_pixels`
    with step = sw * CI): blocks from the first, the last one ending at the row's end (over
    pixels a block before it computed: the same values again)."""
    xf, a_off, step, row, kh, wf, ldb, of, o, CO, count, bias, act = row_args
    done = 0
    while done < count:
        at = min(done, count - block)
        kernel(xf, a_off + at * step, row, kh, wf, 0, ldb, of, o + at * CO, CO, bias, act)
        done = at + block


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _slid_pixels(xf, a_off, row, kh, kw, sw, CI, wf, ldb, of, o, CO, count, bias, act):
    """Whether the sliding-window micro-kernels (`ir._slider`) stored act(conv sum + bias) of
    all `count` pixels of a conv row at of[o + i*CO]: pixel i's window from xf[a_off +
    i*sw*CI], input rows `row` apart, weights of 16 filters in rows ldb apart. Not where none
    fits: 3 input channels and a kernel 3 or 5 wide at stride 1 or 2, or 7 wide at stride 2,
    and at least one block of pixels. The same bits as `_pixels_out`.

    Small kernels over few channels leave `_pixels_out`'s micro-kernels far from their peak:
    27 multiply-adds a pixel and channel vector (3x3 over RGB) in calls whose shapes come at
    run time (kernel-row loops of 9 inputs, arguments through three calls), and one broadcast
    input per multiply-add. On an Intel Xeon (AVX-512), one thread, strided_rgb128's 3x3/2
    stem of 3 -> 16 channels (128 x 128 images) took 47-48 us an image through them; the same
    rows calling its micro-kernels straight, 24-28 us; these kernels, 36-37 us in the layer
    (two threads: 21-24 us against 27-29)."""
    if CI != 3:
        return False
    row_args = (xf, a_off, sw * CI, row, kh, wf, ldb, of, o, CO, count, bias, act)
    if kw == 3 and sw == 1 and count >= SLIDE_3S1:
        _slide_calls(_slide3s1, SLIDE_3S1, row_args)
    elif kw == 3 and sw == 2 and count >= SLIDE_3S2:
        _slide_calls(_slide3s2, SLIDE_3S2, row_args)
    elif kw == 5 and sw == 1 and count >= SLIDE_5S1:
        _slide_calls(_slide5s1, SLIDE_5S1, row_args)
    elif kw == 5 and sw == 2 and count >= SLIDE_5S2:
        _slide_calls(_slide5s2, SLIDE_5S2, row_args)
    elif kw == 7 and sw == 2 and count >= SLIDE_7S2:
        _slide_calls(_slide7s2, SLIDE_7S2, row_args)
    else:
        return False
    return True


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _pixels_out(
    xf, a_off, lda, row, kh, kw, CI, wf, COp, ldb, tile, of, o, CO, count, narrow, bias, act,
    fused,
):  # fmt: skip
    """of[o + i*CO + j] = act(conv sum + bias[j]) of `count` pixels (`_conv_pixels`'s from
    xf[a_off]): with `fused` in the micro-kernels' last calls (act ReLU or linear, CO = COp,
    weights not in strips), else through the tile (its first count * COp floats) and a pass."""
    if fused:
        _conv_pixels(
            xf, a_off, lda, row, kh, kw, CI, wf, COp, ldb, of, o, count, narrow, bias=bias,
            act=act,
        )  # fmt: skip
        return
    _conv_pixels(xf, a_off, lda, row, kh, kw, CI, wf, COp, ldb, tile, 0, count, narrow)
    for i in range(count):
        _store_row(tile, i * COp, bias, of, o + i * CO, 0, CO, act)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_pool2(x, wk, bias, tiles, out, kh, kw, sh, sw, act, average, splits, at, narrow):
    """Valid conv + bias + activation + 2x2/2 max pool (average pool with `average`; floor) on
    an already padded and preprocessed input. wk: (kh*kw*CI, COp), COp a multiple of 16, or
    the same in strips of 16 channels, (COp/16 * kh*kw*CI, 16) (`layers.conv2d.pack_gemm`). The (PH, PW) pooled outputs go to out (N, Hb, Wb, CO) from row y0, column x0:
    at = (y0, x0, PH, PW).

    Tasks: (image, pooled row, range of pooled columns), `splits` ranges per row.
    tiles: (threads, >= 4 * PW * COp) floats: the task's two conv rows. `narrow`: blocks of 32
    output channels (`gemm._conv_row`).
    """
    N, H, W, CI = x.shape
    COp = wk.size // (kh * kw * CI)
    ldb = wk.shape[1]
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, PH, PW = at
    per = (PW + splits - 1) // splits
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange(N * PH * splits):
        n, py, px0, px1 = row_task(t, splits, PH, per, PW)
        nw = px1 - px0
        tile = tiles[numba.get_thread_id()]
        L = 2 * nw
        for dy in range(2):
            a_off = ((n * H + (2 * py + dy) * sh) * W + 2 * px0 * sw) * CI
            t_off = dy * L * COp
            _conv_pixels(
                xf, a_off, sw * CI, W * CI, kh, kw, CI, wf, COp, ldb, tile, t_off, L, narrow
            )
        for w in range(nw):
            _store_pooled(
                tile,
                2 * w * COp,
                (L + 2 * w) * COp,
                COp,
                bias,
                of,
                ((n * Hb + y0 + py) * Wb + x0 + px0 + w) * CO,
                CO,
                act,
                average,
            )


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv(x, wk, bias, tiles, out, kh, kw, sh, sw, act, splits, at, narrow):
    """Valid conv + bias + activation on an already padded and preprocessed input. The (OH, OW)
    outputs go to out (N, Hb, Wb, CO) from row y0, column x0: at = (y0, x0, OH, OW).
    Tasks: (image, output row, range of columns), `splits` per row.
    tiles: (threads, >= OW * COp) floats. `narrow`: blocks of 32 output channels
    (`gemm._conv_row`).
    """
    N, H, W, CI = x.shape
    COp = wk.size // (kh * kw * CI)
    ldb = wk.shape[1]
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, OH, OW = at
    per = (OW + splits - 1) // splits
    # bias and ReLU or linear in the micro-kernels' last calls, straight into the output
    # (`_conv_pixels`), where its pixels' rows are COp apart and the weights not in strips
    fused = act <= 1 and CO == COp and ldb == COp
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange(N * OH * splits):
        n, oy, ox0, ox1 = row_task(t, splits, OH, per, OW)
        cnt = ox1 - ox0
        tile = tiles[numba.get_thread_id()]
        a_off = ((n * H + oy * sh) * W + ox0 * sw) * CI
        o = ((n * Hb + y0 + oy) * Wb + x0 + ox0) * CO
        _pixels_out(
            xf, a_off, sw * CI, W * CI, kh, kw, CI, wf, COp, ldb, tile, of, o, CO, cnt, narrow,
            bias, act, fused,
        )  # fmt: skip


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _input_rows(x, scale, shift, pre, dst, d0, n, iy0, ix0, rows, span):
    """dst[d0:] = `rows` rows of `span` pixels of image n of the unpadded NHWC input x from row
    iy0, column ix0, zeros where they fall outside it: the padded input's cells a conv task
    reads (`conv_raw`), times scale plus shift per (column, channel) when `pre`, as
    `padding.pad_input` writes them. Unsigned flat indices: on an Intel Xeon, copies through
    views of the rows took 3.4x as long (13.3 us against 3.9 for 192 rows of 128 x 3)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(x.size)
    c0 = min(max(ix0, 0), ix0 + span)  # the columns inside the image: [c0, c1)
    c1 = max(min(ix0 + span, W), c0)
    width = span * C
    lo = (c0 - ix0) * C  # a row's floats before the image's, and up to its end
    hi = (c1 - ix0) * C
    z = np.float32(0.0)
    for r in range(rows):
        d = np.uint64(d0 + r * width)
        iy = iy0 + r
        if iy < 0 or iy >= H or c0 == c1:
            for j in range(width):
                dst[d + np.uint64(j)] = z
            continue
        for j in range(lo):
            dst[d + np.uint64(j)] = z
        for j in range(hi, width):
            dst[d + np.uint64(j)] = z
        src = np.uint64(((n * H + iy) * W + c0) * C)
        inside = d + np.uint64(lo)
        if pre == 0:
            for j in range(hi - lo):
                u = np.uint64(j)
                dst[inside + u] = xf[src + u]
        else:
            at = np.uint64(c0 * C)
            for j in range(hi - lo):
                u = np.uint64(j)
                dst[inside + u] = xf[src + u] * scale[at + u] + shift[at + u]


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _window_patches(xf, dst, d0, n, H, W, C, iy0, sh, rows, ix0, kh, kw):
    """dst[d0:] = the kh x kw x C windows of `rows` conv pixels in one column of image n, pixel
    r reading the input rows from iy0 + r*sh (inside the image) and the columns from ix0, each
    window contiguous, zeros where a column falls outside the image. (`_input_rows` with a
    span of kw writes one such window, but as a call of its own per window: about 90 ns for a
    3x3x3 one on an Intel Xeon, most of an edge task's copy.)"""
    width = kw * C
    z = np.float32(0.0)
    lo = min(kw, max(0, -ix0)) * C  # a window row's floats before the image's, and up to its end
    hi = max(lo, min(kw, W - ix0) * C)
    d = np.uint64(d0)
    for r in range(rows):
        for ky in range(kh):
            src = np.uint64(((n * H + iy0 + r * sh + ky) * W + ix0) * C + lo)
            for j in range(lo):
                dst[d + np.uint64(j)] = z
            for j in range(hi - lo):
                dst[d + np.uint64(lo + j)] = xf[src + np.uint64(j)]
            for j in range(hi, width):
                dst[d + np.uint64(j)] = z
            d += np.uint64(width)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_raw(
    x, scale, shift, pre, wk, bias, tiles, out, kh, kw, sh, sw, act, splits, at, narrow, pads,
    wanted, found,
):  # fmt: skip
    """`conv` on the unpadded input: each task copies the input rows its pixels read, padded
    and preprocessed (`_input_rows`: x * scale + shift when `pre`), into its tile and runs its
    row from there. pads = (top, left) padding. Where `conv` would read a padded copy of the
    whole batch, which for a large input (32 images of 128 x 128 x 3: 6.3 MB) leaves the
    caches and comes back: the copy took about a quarter of the copy and the conv's time.

    Without `pre`, a row whose kernel rows lie inside the image reads its pixels straight from
    x where their windows lie inside it too (strided_rgb128's 3x3/2 stem over 128 x 128 x 3 at
    32 images: 0.93-0.96x the time). The pixels of those rows whose windows cross the left or
    right edge go in tasks of their own, EDGE_ROWS rows of one edge column a task: their
    windows copied side by side, one micro-kernel row over them. (With a copy and a call of one
    pixel a row instead, that stem at 32 images took 755-788 us against 649-683, on an Intel
    Xeon.) The same values in the same order: the same bits. tiles: (threads, >=
    `raw_tile_floats`).

    With wanted[0] set (x the caller's input), the first task of each output row also looks
    for NaN and infinity in the input rows it owns (from its first kernel row to the next
    output row's; the first and the last rows reach the image's edges, so every row is
    scanned once) just before its conv reads them, and ORs `elementwise._exponent_or` of them
    into found[8 * thread] (found: threads * 8 uint64, zeroed here), and in the end all of them
    into found[0] (a NaN or infinity sets a bit of `elementwise.SIGNS` there). A scan of the
    whole batch before the pass read a large input from memory twice: on an Intel Xeon,
    strided_rgb128's `Model.forward` took 0.94-0.98x the time with the rows scanned here at 32
    images, 0.91-0.97x at 256 (3 alternating processes each; alike at 1 and 8)."""
    N, H, W, CI = x.shape
    COp = wk.size // (kh * kw * CI)
    ldb = wk.shape[1]
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, OH, OW = at
    pt, pl = pads
    per = (OW + splits - 1) // splits
    fused = act <= 1 and CO == COp and ldb == COp  # as in `conv`
    # 16 filters over RGB pixels: rows by the sliding-window micro-kernels (`_slid_pixels`)
    slide = fused and COp == 16 and WIDE
    rows_at = per * COp  # the input rows after the sums
    # the output columns whose windows lie inside the image's: [inner0, inner1)
    inner0 = min(OW, (pl + sw - 1) // sw)
    inner1 = max(inner0, min(OW, (W + pl - kw) // sw + 1))
    # the output rows whose kernel rows lie inside the image's: [r0, r1)
    r0 = min(OH, (pt + sh - 1) // sh)
    r1 = max(r0, min(OH, (H + pt - kh) // sh + 1))
    # tasks per image: its rows' (splits a row), then its edge columns' groups of rows
    groups = 0
    if pre == 0 and (inner0 > 0 or inner1 < OW):
        groups = (r1 - r0 + EDGE_ROWS - 1) // EDGE_ROWS
    row_tasks = OH * splits
    window = kh * kw * CI
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    scan = wanted[0] != 0
    if scan:
        for i in range(found.size):
            found[i] = 0
    for t in prange(N * (row_tasks + groups)):
        n = t // (row_tasks + groups)
        u = t % (row_tasks + groups)
        tile = tiles[numba.get_thread_id()]
        if scan and u < row_tasks and u % splits == 0:  # the input rows this output row owns
            oy = u // splits
            own0 = 0 if oy == 0 else min(H, max(0, oy * sh - pt))
            own1 = H if oy == OH - 1 else min(H, max(own0, (oy + 1) * sh - pt))
            if own1 > own0:
                owned = xf[(n * H + own0) * W * CI : (n * H + own1) * W * CI]
                found[8 * numba.get_thread_id()] |= _exponent_or(owned)
        if u >= row_tasks:  # inside rows from r0 + (u - row_tasks) * EDGE_ROWS, each edge column
            ya = r0 + (u - row_tasks) * EDGE_ROWS
            rows = min(r1, ya + EDGE_ROWS) - ya
            at_patches = rows * COp
            for k in range(inner0 + OW - inner1):
                e = k if k < inner0 else inner1 + k - inner0
                _window_patches(
                    xf, tile, at_patches, n, H, W, CI, ya * sh - pt, sh, rows, e * sw - pl, kh, kw
                )  # fmt: skip
                _conv_pixels(
                    tile, at_patches, window, kw * CI, kh, kw, CI, wf, COp, ldb, tile, 0, rows,
                    narrow,
                )  # fmt: skip
                for r in range(rows):
                    o = ((n * Hb + y0 + ya + r) * Wb + x0 + e) * CO
                    _store_row(tile, r * COp, bias, of, o, 0, CO, act)
            continue
        oy = u // splits
        ox0 = min(OW, (u % splits) * per)
        ox1 = min(OW, ox0 + per)
        iy0 = oy * sh - pt
        o = ((n * Hb + y0 + oy) * Wb + x0 + ox0) * CO
        if pre == 0 and r0 <= oy < r1:  # inside rows: the edge tasks take their edge columns
            p0 = min(max(ox0, inner0), ox1)
            first = p0 - ox0
            count = max(min(ox1, inner1), p0) - p0
            src, a_off, row = xf, ((n * H + iy0) * W + p0 * sw - pl) * CI, W * CI
        else:  # the whole part from a padded (and preprocessed) copy of its rows
            first, count = 0, ox1 - ox0
            span = (count - 1) * sw + kw
            if count > 0:
                _input_rows(x, scale, shift, pre, tile, rows_at, n, iy0, ox0 * sw - pl, kh, span)
            src, a_off, row = tile, rows_at, span * CI
        if slide and _slid_pixels(
            src, a_off, row, kh, kw, sw, CI, wf, ldb, of, o + first * CO, CO, count, bias, act
        ):  # fmt: skip
            continue
        if count > 0:
            _pixels_out(
                src, a_off, sw * CI, row, kh, kw, CI, wf, COp, ldb, tile, of, o + first * CO, CO,
                count, narrow, bias, act, fused,
            )  # fmt: skip
    if scan:  # every thread's flags in found[0], one number for the caller to test
        for i in range(8, found.size, 8):
            found[0] |= found[i]


def raw_tile_floats(
    out_cols: int, channels: int, kernel: tuple[int, int], stride: int, ci: int
) -> int:
    """Per-thread floats `conv_raw` needs: for rows of `out_cols` pixels their sums, then the
    kernel rows of input they read; for an edge task EDGE_ROWS pixels' sums and windows."""
    rows = out_cols * channels + kernel[0] * ((out_cols - 1) * stride + kernel[1]) * ci
    return max(rows, EDGE_ROWS * (channels + kernel[0] * kernel[1] * ci))


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_runs(x, wk, bias, tiles, out, kh, kw, sh, sw, act, per, ways, at, narrow):
    """`conv` for short output rows: tasks (image, run of `per` pixels of its OH * OW in row
    order, range of output channels), `ways` ranges of whole 16s. A run goes on over row ends
    (`gemm._conv_row`): a 4x4 output fills micro-kernel blocks of 6 pixels, where its rows
    alone give blocks of 4; with the channels in ranges each thread reads only its range's
    weights. (A kernel of its own: in `conv`, the runs' bookkeeping slowed long rows: the strided
    net's first layer at 8 images on one thread took 134.5-138.3 us against 130.7-131.2.)
    tiles: (threads, >= per * COp) floats."""
    N, H, W, CI = x.shape
    COp = wk.size // (kh * kw * CI)
    ldb = wk.shape[1]
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, OH, OW = at
    runs = (OH * OW + per - 1) // per
    part = ((COp // 16 + ways - 1) // ways) * 16  # channels a range
    jump = (sh * W - OW * sw) * CI  # input floats from a row's end to the next row's start
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange(N * runs * ways):
        n, run, c0, c1 = row_task(t, ways, runs, part, COp)
        if c0 >= c1:  # a range past the channels
            continue
        p0 = run * per
        cnt = min(OH * OW - p0, per)
        tile = tiles[numba.get_thread_id()]
        oy, ox = p0 // OW, p0 % OW
        a_off = ((n * H + oy * sh) * W + ox * sw) * CI
        _conv_pixels(
            xf, a_off, sw * CI, W * CI, kh, kw, CI, wf, COp, ldb, tile, 0, cnt, narrow, c0, c1,
            ox, OW, jump,
        )  # fmt: skip
        stores = min(c1, CO) - c0
        i = 0
        while i < cnt:  # the run's pixels, a piece of an output row at a time
            o = ((n * Hb + y0 + oy) * Wb + x0 + ox) * CO + c0
            piece = min(cnt - i, OW - ox)
            for k in range(piece):
                t_off = (i + k) * COp + c0
                _store_row(tile, t_off, bias, of, o + k * CO, 0, stores, act, c0)
            i += piece
            oy, ox = oy + 1, 0


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _pixel_place(p, OH, OW):
    """(image, row, column) of output pixel p of a batch, pixels in (image, row, column) order."""
    per_image = OH * OW
    r = p % per_image
    return p // per_image, r // OW, r % OW


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_patches(x, wk, bias, tiles, out, kh, kw, sh, sw, act, group, ways, at):
    """Valid conv + bias + activation on an already padded and preprocessed input, by pixel
    groups: each task copies the receptive fields of `group` consecutive output pixels of the
    batch (across rows and images) into rows of K = kh*kw*CI floats (im2col) and runs one GEMM
    over them, PATCH_K_ROWS weight rows at a time. Where conv rows are shorter than a
    micro-kernel block (a 4x4 output: 4 pixels a call, each weight read for 4 pixels) the
    blocks are full and a chunk of weights serves the whole group from L1. With `ways` > 1 a
    group's output channels go in that many ranges of whole 16s, a task each (each copies the
    group's fields and reads only its range's weights: for a batch with fewer groups than
    threads). Every output is the same in-order chain of fused multiply-adds as in `conv`, so
    the bits are the same.
    The (OH, OW) outputs go to out (N, Hb, Wb, CO) from row y0, column x0: at = (y0, x0, OH,
    OW). tiles: (threads, >= group * (K + COp) + 16) floats: the rows, then their sums."""
    N, H, W, CI = x.shape
    K = kh * kw * CI
    COp = wk.size // K
    ldb = wk.shape[1]
    strip = _strip(K, COp, ldb)
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, OH, OW = at
    total = N * OH * OW
    seg = kw * CI  # a kernel row's inputs, contiguous in NHWC
    part = ((COp // 16 + ways - 1) // ways) * 16  # channels a range
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange((total + group - 1) // group * ways):
        p0 = t // ways * group
        c0 = t % ways * part
        c1 = min(COp, c0 + part)
        if c0 < c1:
            count = min(total, p0 + group) - p0
            tile = tiles[numba.get_thread_id()]
            sums = (count * K + 15) // 16 * 16  # on a cache line, as the tile is
            for i in range(count):
                n, oy, ox = _pixel_place(p0 + i, OH, OW)
                for ky in range(kh):
                    src = ((n * H + oy * sh + ky) * W + ox * sw) * CI
                    tile[i * K + ky * seg : i * K + (ky + 1) * seg] = xf[src : src + seg]
            for k0 in range(0, K, PATCH_K_ROWS):
                rows = min(K - k0, PATCH_K_ROWS)
                _conv_row(
                    tile, k0, K, 0, 1, rows, wf, k0 * ldb + c0 // 16 * strip, ldb, tile,
                    sums + c0, COp, count, c1 - c0, 1 if k0 > 0 else 0, 0, strip=strip,
                )  # fmt: skip
            for i in range(count):
                n, oy, ox = _pixel_place(p0 + i, OH, OW)
                o = ((n * Hb + y0 + oy) * Wb + x0 + ox) * CO
                _store_row(tile, sums + i * COp, bias, of, o, c0, min(c1, CO), act)


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _three(dst, d, src, ia, ib, ic, C, average):
    """dst[d + c] = max (sum with `average`) of src[ia + c], src[ib + c], src[ic + c], c < C; dst
    apart from the three (`pool._max_of`: a max kept in place is slow on AMD)."""
    dd = np.uint64(d)
    a = np.uint64(ia)
    b = np.uint64(ib)
    e = np.uint64(ic)
    if average:
        for c in range(C):
            u = np.uint64(c)
            dst[dd + u] = src[a + u] + src[b + u] + src[e + u]
    else:
        for c in range(C):
            u = np.uint64(c)
            dst[dd + u] = max(max(src[a + u], src[b + u]), src[e + u])


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _fold(dst, d, src, offs, count, C, average, spare):
    """dst[d + c] = the max (sum with `average`) over k < count of src[offs[k] + c], c < C, three
    cells a pass. spare: src offset of three scratch rows of C floats, the last of them zeros
    (a sum's missing operands; a max repeats its first cell instead); dst[d] is none of them
    (`_three`)."""
    zero = spare + 2 * C
    if count <= 3:
        pad = zero if average else offs[0]
        ib = offs[1] if count > 1 else pad
        ic = offs[2] if count > 2 else pad
        _three(dst, d, src, offs[0], ib, ic, C, average)
        return
    _three(src, spare, src, offs[0], offs[1], offs[2], C, average)
    k = 3
    acc = spare  # passes alternate between the two scratch rows
    while k < count:
        ib = offs[k]
        ic = offs[k + 1] if k + 1 < count else (zero if average else ib)
        k += 2
        if k >= count:
            _three(dst, d, src, acc, ib, ic, C, average)
        else:
            nxt = spare + C if acc == spare else spare
            _three(src, nxt, src, acc, ib, ic, C, average)
            acc = nxt


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_pool(x, wk, bias, tiles, out, kh, kw, sh, sw, act, pool, average, bands, at, narrow):
    """Valid conv + bias + activation + a max (average with `average`) pool of any window,
    stride and padding on an already padded and preprocessed input: pool = (ph, pw, psh, psw,
    pt, pl, OH, OW), window, strides, the pool's top and left padding and the conv's output
    rows and columns. Padding cells are ignored, as in `pool.pool2d`. The (PH, PW) pooled
    outputs go to out (N, Hb, Wb, CO) from row y0, column x0: at = (y0, x0, PH, PW).

    Tasks: (image, band of pooled rows), `bands` bands an image. A task computes each conv row
    its windows read once and pools it across (the windows' columns) into a ring of ph such
    rows, from which each pooled row pools down: the conv output never leaves the cache, and
    overlapping windows share their rows. A band's first pooled row computes all its rows, so
    the rows windows share across bands are computed twice. Max pools the raw sums and adds
    bias and activation to the max (both commute with it); average activates first.
    tiles: (threads, >= (cols + ph * PW + 4) * COp) floats, cols = the conv columns the pool
    reads.
    """
    N, H, W, CI = x.shape
    COp = wk.size // (kh * kw * CI)
    ldb = wk.shape[1]
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, PH, PW = at
    ph, pw, psh, psw, pt, pl, OH, OW = pool
    cols = min(OW, (PW - 1) * psw - pl + pw)
    per = (PH + bands - 1) // bands
    ring = cols * COp  # the ring of rows pooled across, after the conv row
    spare = ring + ph * PW * COp  # three scratch rows (`_fold`)
    pooled = spare + 3 * COp  # a pooled value before its store
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange(N * bands):
        n = t // bands
        py0 = t % bands * per
        tile = tiles[numba.get_thread_id()]
        for c in range(COp):
            tile[spare + 2 * COp + c] = 0.0
        offs = np.empty(max(ph, pw), np.int64)
        done = 0  # the task's conv rows before this one are in the ring
        for py in range(py0, min(PH, py0 + per)):
            r0 = max(0, py * psh - pt)
            r1 = min(OH, py * psh - pt + ph)
            for r in range(max(done, r0), r1):
                a_off = (n * H + r * sh) * W * CI
                _conv_pixels(
                    xf, a_off, sw * CI, W * CI, kh, kw, CI, wf, COp, ldb, tile, 0, cols, narrow
                )
                if average:  # the mean of the activated values
                    for c in range(cols):
                        _store_row(tile, c * COp, bias, tile, c * COp, 0, COp, act)
                for px in range(PW):
                    c0 = max(0, px * psw - pl)
                    c1 = min(OW, px * psw - pl + pw)
                    for k in range(c1 - c0):
                        offs[k] = (c0 + k) * COp
                    d = ring + (r % ph * PW + px) * COp
                    _fold(tile, d, tile, offs, c1 - c0, COp, average, spare)
            done = r1
            for px in range(PW):
                for k in range(r1 - r0):
                    offs[k] = ring + ((r0 + k) % ph * PW + px) * COp
                o = ((n * Hb + y0 + py) * Wb + x0 + px) * CO
                _fold(tile, pooled, tile, offs, r1 - r0, COp, average, spare)
                if average:
                    cells = (r1 - r0) * (min(OW, px * psw - pl + pw) - max(0, px * psw - pl))
                    _scale_into(of, o, tile, pooled, CO, np.float32(1.0) / np.float32(cells))
                else:
                    _store_row(tile, pooled, bias, of, o, 0, CO, act)
