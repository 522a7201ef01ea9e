"""Direct convolution (NHWC, float32) + bias + activation, optionally fused with a 2x2/2 max or
average pool. Any kernel size, stride and padding.

Weights are packed once by the plan in GEMM form `wk[K, COp]`: row k is tap k in (ky, kx, ci)
order for every filter, K = kh*kw*ci, `COp` = filters rounded up to 16 (zero columns); or,
where a micro-kernel block is 16 channels (AVX2, `gemm.STRIPS`), the same columns in strips of
16, each strip's K rows contiguous, as (COp/16 * K, 16).
The input is already padded (see `padding.py`). There is no patch copy ("implicit GEMM"): in
NHWC the (kx, ci) part of a pixel's receptive field is contiguous, so the micro-kernel walks
kernel rows as segments straight in the input.

The output may be the interior of a larger, zero-bordered buffer: `at` = (y0, x0, OH, OW)
places the OH x OW outputs at row y0, column x0 of `out`, so a conv writes straight into the
padded input of the conv after it and that layer's padding copy is skipped.

Fused pooling computes the two conv rows of a pooled row and keeps the max of each 2x2 window;
max pooling commutes with the per-channel bias and with every monotonic activation, so bias and
activation run once per pooled value. Average pooling activates the four values, then averages.
"""

from __future__ import annotations

import numba
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _store_pooled, _store_row
from convserve.core.kernels.gemm import _conv_row
from convserve.core.kernels.tasks import row_task
from numba import njit, prange

# Weight rows the micro-kernel calls over a row of pixels stream for one 64-channel block. A
# layer with more (3x3 over 64 channels: 576 rows, 147 KB, past L1) goes in chunks of whole
# taps, each call adding to the previous ones, so a chunk stays in cache across the row's
# calls. 256 rows (64 KB) measured fastest of 128, 256 and no chunks on 3x3 and 5x5 layers
# over 32-64 channels.
CHUNK_TAPS_ROWS = 256


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _strip(K, COp, ldb):
    """The distance between consecutive 16 output channels in weights of K rows and COp
    channels whose rows are ldb floats apart: 16 in rows of all channels (ldb = COp), 16 * K in
    strips of 16 channels (ldb = 16; `gemm.STRIPS`)."""
    return 16 if ldb == COp else 16 * K


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _conv_pixels(xf, a_off, lda, row, kh, kw, CI, wf, COp, ldb, tile, t_off, count, narrow):
    """tile[t_off + i*COp + j] = the conv sums of `count` pixels (pixel i's window from
    xf[a_off + i*lda], input rows `row` apart) for all COp channels: one `_conv_row` over the
    kh kernel rows when the weights are small, else chunks of up to CHUNK_TAPS_ROWS rows of whole
    taps (kernel rows, then columns), in the same order, so the same bits either way. `narrow`:
    blocks of 32 channels (`_conv_row`). The weights' rows are ldb floats apart: COp (rows of
    all channels) or 16 (strips of 16 channels, `_strip`)."""
    strip = _strip(kh * kw * CI, COp, ldb)
    if kh * kw * CI <= CHUNK_TAPS_ROWS:
        _conv_row(
            xf, a_off, lda, row, kh, kw * CI, wf, 0, ldb, tile, t_off, COp, count, COp, 0, narrow,
            strip=strip,
        )  # fmt: skip
        return
    per = max(1, CHUNK_TAPS_ROWS // CI)  # kernel columns per chunk
    for ky in range(kh):
        for x0 in range(0, kw, per):
            x1 = min(kw, x0 + per)
            more = 1 if ky > 0 or x0 > 0 else 0
            _conv_row(
                xf,
                a_off + ky * row + x0 * CI,
                lda,
                0,
                1,
                (x1 - x0) * CI,
                wf,
                (ky * kw + x0) * CI * ldb,
                ldb,
                tile,
                t_off,
                COp,
                count,
                COp,
                more,
                narrow,
                strip=strip,
            )


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
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    for t in prange(N * OH * splits):
        n, oy, ox0, ox1 = row_task(t, splits, OH, per, OW)
        cnt = ox1 - ox0
        tile = tiles[numba.get_thread_id()]
        a_off = ((n * H + oy * sh) * W + ox0 * sw) * CI
        _conv_pixels(xf, a_off, sw * CI, W * CI, kh, kw, CI, wf, COp, ldb, tile, 0, cnt, narrow)
        o = ((n * Hb + y0 + oy) * Wb + x0 + ox0) * CO
        for i in range(cnt):
            _store_row(tile, i * COp, bias, of, o + i * CO, 0, CO, act)
