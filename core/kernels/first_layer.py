"""First-layer kernels (float32): a 1-input-channel, stride-1 conv + bias + activation + 2x2/2
max pool, where a GEMM over one input channel would be too short to pay. Two shapes: at most 8
filters (output pixels in the vector lanes; average pooling too) and 3x3 with a multiple of 16 filters (the 4x4
input patch of a pool window held in scalars, preprocessing applied on the fly).
"""

from __future__ import annotations

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _QUARTER, _Z, _act
from convserve.core.kernels.gemm import WIDE
from convserve.core.kernels.ir import _mkt4x1, _mkt6x1, _mkt6x2, _mkt8x2
from convserve.core.kernels.tasks import row_task
from numba import njit, prange


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv1_pixels_pool2(x, wt, bias, tiles, out, kh, kw, act, average, wide=WIDE):
    """1-input-channel, stride-1 conv with at most 8 filters + bias + activation + 2x2/2 max pool
    (with `average`: the mean of the four activated outputs, as LeNet-5's sigmoid layers take),
    with output pixels in the vector lanes (filters in the lanes would leave most of them empty):
    the transposed micro-kernel multiplies 8 (or, for at most 6 filters, 6) broadcast weights by
    32 consecutive input pixels. With AVX2's 16 registers of 8 floats, whose accumulators those
    blocks would spill, 6 filters x 16 pixels or 4 x 16 a call (on an AMD Zen 3, 32 pixels of 8
    5x5 filters: 179 ns instead of 514; of 6: 126 instead of 348). `wide`: the AVX-512 blocks
    (default: `gemm.WIDE`, by the register file; the same bits either way).

    x: padded, preprocessed input (N, Hp, Wp, 1) with Wp >= 32 * ceil(2*PW / 32) + kw - 1;
    wt: (8, kh*kw), filter rows zero padded; tiles: (threads, >= 512). out: (N, PH, PW, CO).
    Tasks: (image, pooled row, block of 16 pooled columns)."""
    N, Hp, Wp = x.shape[0], x.shape[1], x.shape[2]
    PH, PW, CO = out.shape[1], out.shape[2], out.shape[3]
    xf = x.reshape(x.size)
    wf = wt.reshape(wt.size)
    of = out.reshape(out.size)
    taps = kh * kw
    nblk = (2 * PW + 31) // 32
    for t in prange(N * PH * nblk):
        blk = t % nblk
        r = t // nblk
        py = r % PH
        n = r // PH
        tile = tiles[numba.get_thread_id()]
        x0 = 32 * blk
        for dy in range(2):  # tile[dy*256 + co*32 + j]: conv row 2py+dy, filter co, pixel x0+j
            b_off = (n * Hp + 2 * py + dy) * Wp + x0
            if wide and CO <= 6:
                _mkt6x2(wf, 0, taps, kw, kh, kw, xf, b_off, Wp, 1, tile, dy * 256, 32)
            elif wide:
                _mkt8x2(wf, 0, taps, kw, kh, kw, xf, b_off, Wp, 1, tile, dy * 256, 32)
            else:
                for h in range(0, 32, 16):  # 16 pixels a call
                    b, c = b_off + h, dy * 256 + h
                    if CO <= 6:
                        _mkt6x1(wf, 0, taps, kw, kh, kw, xf, b, Wp, 1, tile, c, 32)
                    else:  # filters 0-3, then 4-7
                        _mkt4x1(wf, 0, taps, kw, kh, kw, xf, b, Wp, 1, tile, c, 32)
                        _mkt4x1(wf, 4 * taps, taps, kw, kh, kw, xf, b, Wp, 1, tile, c + 128, 32)
        px1 = min(PW, 16 * blk + 16)
        if average:
            # bias + activation first, on rows of 32 pixels (a filter's pixels 32 apart in the
            # pooling loop would keep tanh or sigmoid scalar), then the order of
            # `elementwise._store_pooled`
            for dy in range(2):
                for co in range(CO):
                    row = np.uint64(dy * 256 + co * 32)
                    bc = bias[co]
                    for jj in range(32):
                        u = row + np.uint64(jj)
                        tile[u] = _act(tile[u] + bc, act)
            for px in range(16 * blk, px1):
                j = np.uint64(2 * px - x0)
                o = np.uint64(((n * PH + py) * PW + px) * CO)
                for co in range(CO):
                    i = np.uint64(co * 32) + j
                    s = tile[i] + tile[i + 1]
                    s += tile[i + 256] + tile[i + 257]
                    of[o + np.uint64(co)] = s * _QUARTER
            continue
        for px in range(16 * blk, px1):
            j = np.uint64(2 * px - x0)
            o = np.uint64(((n * PH + py) * PW + px) * CO)
            for co in range(CO):
                i = np.uint64(co * 32) + j
                m = max(max(tile[i], tile[i + 1]), max(tile[i + 256], tile[i + 257]))
                of[o + np.uint64(co)] = _act(m + bias[co], act)


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _row4(xf, o, sc, sf):
    """Four consecutive input pixels from xf[o], preprocessed (`x * scale + shift`)."""
    return xf[o] * sc + sf, xf[o + 1] * sc + sf, xf[o + 2] * sc + sf, xf[o + 3] * sc + sf


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _px(xf, H, W, n, y, x, sc, sf):
    if y < 0 or y >= H or x < 0 or x >= W:
        return _Z
    return xf[(n * H + y) * W + x] * sc + sf


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv1_k3_pool2(x, wb, scale, shift, out, pt, pl, act, splits):
    """1 input channel, 3x3, stride 1 conv + bias + activation + 2x2/2 max pool (floor).

    Holds the 4x4 input patch of a pool window in scalars and loops over 16 output channels
    innermost (one vector). wb: (CO/16, 10, 16), per block of 16 channels the 9 taps then the
    bias; CO a multiple of 16. out: (N, PH, PW, CO). Applies `x * scale + shift` to the input
    (pass 1 and 0 for none).
    """
    N, H, W = x.shape[0], x.shape[1], x.shape[2]
    PH, PW = out.shape[1], out.shape[2]
    nb = wb.shape[0]
    sc = scale[0]
    sf = shift[0]
    per = (nb + splits - 1) // splits
    xf = x.reshape(x.size)
    o5 = out.reshape(N, PH, PW, nb, 16)  # channel blocks of 16: clean vector stores
    lo = _Z if act == 1 else np.float32(-np.inf)
    for t in prange(N * PH * splits):
        n, py, b0, b1 = row_task(t, splits, PH, per, nb)
        y = 2 * py - pt
        for px in range(PW):
            xx = 2 * px - pl
            if y >= 0 and y + 4 <= H and xx >= 0 and xx + 4 <= W:  # interior: no bounds checks
                o = (n * H + y) * W + xx
                o1 = o + W
                o2 = o1 + W
                o3 = o2 + W
                v00, v01, v02, v03 = _row4(xf, o, sc, sf)
                v10, v11, v12, v13 = _row4(xf, o1, sc, sf)
                v20, v21, v22, v23 = _row4(xf, o2, sc, sf)
                v30, v31, v32, v33 = _row4(xf, o3, sc, sf)
            else:
                v00 = _px(xf, H, W, n, y, xx, sc, sf)
                v01 = _px(xf, H, W, n, y, xx + 1, sc, sf)
                v02 = _px(xf, H, W, n, y, xx + 2, sc, sf)
                v03 = _px(xf, H, W, n, y, xx + 3, sc, sf)
                v10 = _px(xf, H, W, n, y + 1, xx, sc, sf)
                v11 = _px(xf, H, W, n, y + 1, xx + 1, sc, sf)
                v12 = _px(xf, H, W, n, y + 1, xx + 2, sc, sf)
                v13 = _px(xf, H, W, n, y + 1, xx + 3, sc, sf)
                v20 = _px(xf, H, W, n, y + 2, xx, sc, sf)
                v21 = _px(xf, H, W, n, y + 2, xx + 1, sc, sf)
                v22 = _px(xf, H, W, n, y + 2, xx + 2, sc, sf)
                v23 = _px(xf, H, W, n, y + 2, xx + 3, sc, sf)
                v30 = _px(xf, H, W, n, y + 3, xx, sc, sf)
                v31 = _px(xf, H, W, n, y + 3, xx + 1, sc, sf)
                v32 = _px(xf, H, W, n, y + 3, xx + 2, sc, sf)
                v33 = _px(xf, H, W, n, y + 3, xx + 3, sc, sf)
            for b in range(b0, b1):
                for j in range(16):
                    a = wb[b, 0, j]
                    bb = wb[b, 1, j]
                    c = wb[b, 2, j]
                    d = wb[b, 3, j]
                    e = wb[b, 4, j]
                    f = wb[b, 5, j]
                    g = wb[b, 6, j]
                    h = wb[b, 7, j]
                    k = wb[b, 8, j]
                    s0 = (
                        v00 * a
                        + v01 * bb
                        + v02 * c
                        + v10 * d
                        + v11 * e
                        + v12 * f
                        + v20 * g
                        + v21 * h
                        + v22 * k
                    )
                    s1 = (
                        v01 * a
                        + v02 * bb
                        + v03 * c
                        + v11 * d
                        + v12 * e
                        + v13 * f
                        + v21 * g
                        + v22 * h
                        + v23 * k
                    )
                    s2 = (
                        v10 * a
                        + v11 * bb
                        + v12 * c
                        + v20 * d
                        + v21 * e
                        + v22 * f
                        + v30 * g
                        + v31 * h
                        + v32 * k
                    )
                    s3 = (
                        v11 * a
                        + v12 * bb
                        + v13 * c
                        + v21 * d
                        + v22 * e
                        + v23 * f
                        + v31 * g
                        + v32 * h
                        + v33 * k
                    )
                    m = max(max(s0, s1), max(s2, s3)) + wb[b, 9, j]
                    o5[n, py, px, b, j] = m if m > lo else lo
                if act > 1:
                    for j in range(16):
                        o5[n, py, px, b, j] = _act(o5[n, py, px, b, j], act)
