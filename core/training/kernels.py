"""Numba kernels for training: train-mode forward and backward of every layer, loss, optimizers.

Module-level pure functions on arrays with explicit output buffers. They run in float32 for
training and in float64 for the gradient checks.
Layouts: activations NHWC; conv weights packed as `wd[CO, KH*KW*CI]` in (ky, kx, ci) order;
dense weights as `W[units, in_features]`. Every reduction runs in a fixed order over a fixed
partition of the work (never "whichever thread comes first"), so results are bit-reproducible.
"""

from __future__ import annotations

import numpy as np
from convserve.core.activations import RELU, SIGMOID, SOFTMAX, TANH
from numba import njit, prange

# Work partitions for per-chunk gradient partials: fixed, so results do not depend on thread count.
NCHUNKS = 4

_JIT = {"fastmath": True, "cache": True}


# --------------------------------------------------------------------------------- helpers
@njit(inline="always", **_JIT)
def _store_row4(out2, row, exists, j, relu, z, v0, v1, v2, v3):
    """Store one row of a 4x4 GEMM tile at out2[row, j:j+4] (ReLU first if asked), if it exists."""
    if exists:
        if relu:
            v0 = max(v0, z)
            v1 = max(v1, z)
            v2 = max(v2, z)
            v3 = max(v3, z)
        o = out2[row]
        o[j] = v0
        o[j + 1] = v1
        o[j + 2] = v2
        o[j + 3] = v3


@njit(inline="always", **_JIT)
def _axpy(y, a, x):
    """y += a * x on contiguous 1-D arrays of the same length."""
    for i in range(y.shape[0]):
        y[i] += a * x[i]


@njit(inline="always", **_JIT)
def _patch_copy(img, n, oy, ox, kh, kw, sh, sw, pt, pl, vec, gather):
    """Move data between the receptive field of output pixel (oy, ox) of image n and vec (K,):
    gather copies the field into vec (zeros in the padding); otherwise img[n] += vec over the
    field, padding skipped. `gather` is a constant at each call site, so the branch folds."""
    h = img.shape[1]
    w = img.shape[2]
    c_in = img.shape[3]
    z = vec.dtype.type(0)
    k = 0
    for ky in range(kh):
        iy = oy * sh - pt + ky
        for kx in range(kw):
            ix = ox * sw - pl + kx
            inside = iy >= 0 and iy < h and ix >= 0 and ix < w
            if inside:
                pixel = img[n, iy, ix]
                for c in range(c_in):
                    if gather:
                        vec[k + c] = pixel[c]
                    else:
                        pixel[c] += vec[k + c]
            elif gather:
                for c in range(c_in):
                    vec[k + c] = z
            k += c_in


@njit(inline="always", **_JIT)
def _gather_patch(x, n, oy, ox, kh, kw, sh, sw, pt, pl, dst):
    """Copy the receptive field of output pixel (oy, ox) of image n into dst (K,), zeros outside."""
    _patch_copy(x, n, oy, ox, kh, kw, sh, sw, pt, pl, dst, True)


@njit(inline="always", **_JIT)
def _scatter_patch(dx, n, oy, ox, kh, kw, sh, sw, pt, pl, src):
    """dx[n] += src (K,) over the receptive field of output pixel (oy, ox), skipping padding."""
    _patch_copy(dx, n, oy, ox, kh, kw, sh, sw, pt, pl, src, False)


@njit(inline="always", **_JIT)
def _gemm_nt_rows(a, rows, b, bias, out2, out_row0, relu):
    """out2[out_row0 + i, j] = bias[j] + sum_k a[i, k] * b[j, k] for i < rows (then max(., 0) if relu).

    `a` (R4, K) has R4 >= rows, a multiple of 4 (extra rows are ignored on output);
    4 rows x 4 columns of scalar accumulators, the register-blocked micro-kernel.
    """
    kdim = a.shape[1]
    cols = b.shape[0]
    r4 = a.shape[0]
    z = out2.dtype.type(0)
    for r0 in range(0, r4, 4):
        a0 = a[r0]
        a1 = a[r0 + 1]
        a2 = a[r0 + 2]
        a3 = a[r0 + 3]
        j = 0
        while j + 4 <= cols:
            b0 = b[j]
            b1 = b[j + 1]
            b2 = b[j + 2]
            b3 = b[j + 3]
            s00 = z
            s01 = z
            s02 = z
            s03 = z
            s10 = z
            s11 = z
            s12 = z
            s13 = z
            s20 = z
            s21 = z
            s22 = z
            s23 = z
            s30 = z
            s31 = z
            s32 = z
            s33 = z
            for k in range(kdim):
                v0 = a0[k]
                v1 = a1[k]
                v2 = a2[k]
                v3 = a3[k]
                w0 = b0[k]
                w1 = b1[k]
                w2 = b2[k]
                w3 = b3[k]
                s00 += v0 * w0
                s01 += v0 * w1
                s02 += v0 * w2
                s03 += v0 * w3
                s10 += v1 * w0
                s11 += v1 * w1
                s12 += v1 * w2
                s13 += v1 * w3
                s20 += v2 * w0
                s21 += v2 * w1
                s22 += v2 * w2
                s23 += v2 * w3
                s30 += v3 * w0
                s31 += v3 * w1
                s32 += v3 * w2
                s33 += v3 * w3
            c0 = bias[j]
            c1 = bias[j + 1]
            c2 = bias[j + 2]
            c3 = bias[j + 3]
            s00 += c0
            s01 += c1
            s02 += c2
            s03 += c3
            s10 += c0
            s11 += c1
            s12 += c2
            s13 += c3
            s20 += c0
            s21 += c1
            s22 += c2
            s23 += c3
            s30 += c0
            s31 += c1
            s32 += c2
            s33 += c3
            _store_row4(out2, out_row0 + r0, r0 < rows, j, relu, z, s00, s01, s02, s03)
            _store_row4(out2, out_row0 + r0 + 1, r0 + 1 < rows, j, relu, z, s10, s11, s12, s13)
            _store_row4(out2, out_row0 + r0 + 2, r0 + 2 < rows, j, relu, z, s20, s21, s22, s23)
            _store_row4(out2, out_row0 + r0 + 3, r0 + 3 < rows, j, relu, z, s30, s31, s32, s33)
            j += 4
        while j < cols:
            bj = b[j]
            s0 = z
            s1 = z
            s2 = z
            s3 = z
            for k in range(kdim):
                w0 = bj[k]
                s0 += a0[k] * w0
                s1 += a1[k] * w0
                s2 += a2[k] * w0
                s3 += a3[k] * w0
            c0 = bias[j]
            s0 += c0
            s1 += c0
            s2 += c0
            s3 += c0
            if relu:
                s0 = max(s0, z)
                s1 = max(s1, z)
                s2 = max(s2, z)
                s3 = max(s3, z)
            if r0 < rows:
                out2[out_row0 + r0, j] = s0
            if r0 + 1 < rows:
                out2[out_row0 + r0 + 1, j] = s1
            if r0 + 2 < rows:
                out2[out_row0 + r0 + 2, j] = s2
            if r0 + 3 < rows:
                out2[out_row0 + r0 + 3, j] = s3
            j += 1


# --------------------------------------------------------------------------------- conv2d
@njit(inline="always", **_JIT)
def _conv_rows(patch, rows, wd, wt, bias, out2, relu, small):
    """out2[i] = bias + conv of patch row i for i < rows (then ReLU if relu): the 4x4 dot form
    over wd (CO, K), or with `small` (a short reduction) outer products over wt (K, CO)."""
    if not small:
        _gemm_nt_rows(patch, rows, wd, bias, out2, 0, relu)
        return
    z = out2.dtype.type(0)
    for r in range(rows):
        row = out2[r]
        row[:] = bias
        pr = patch[r]
        for k in range(pr.shape[0]):
            _axpy(row, pr[k], wt[k])
        if relu:
            for c in range(row.shape[0]):
                row[c] = max(row[c], z)


@njit(parallel=True, **_JIT)
def conv2d_forward(x, wd, wt, bias, out, kh, kw, sh, sw, pt, pl, relu, small):
    """out (N, OH, OW, CO) = conv(x (N, H, W, CI), wd (CO, K)) + bias, then ReLU if relu;
    `small` (K = KH*KW*CI short, e.g. a first layer) uses the transposed kernel wt (K, CO)."""
    n_img = x.shape[0]
    oh = out.shape[1]
    ow = out.shape[2]
    kdim = wd.shape[1]
    ow4 = (ow + 3) // 4 * 4
    for task in prange(n_img * oh):
        n = task // oh
        oy = task - n * oh
        patch = np.zeros((ow4, kdim), x.dtype)
        for ox in range(ow):
            _gather_patch(x, n, oy, ox, kh, kw, sh, sw, pt, pl, patch[ox])
        _conv_rows(patch, ow, wd, wt, bias, out[n, oy], relu, small)


@njit(inline="always", **_JIT)
def _pixel_backward(x, n, oy, ox, geometry, g, w, small, acc, dx, need_dx):
    """Add conv output pixel (oy, ox) of image n, with gradient g (CO,), to the weight and bias
    gradients dwc, dbc and (when need_dx) to dx. Only channels with a non-zero gradient cost
    anything. w and dwc are (CO, K) in the dot form, (K, CO) with `small` (outer products).
    geometry: (kh, kw, sh, sw, pt, pl); acc: (dwc, dbc, patch, gpatch), the chunk's state."""
    kh, kw, sh, sw, pt, pl = geometry
    dwc, dbc, patch, gpatch = acc
    z = dwc.dtype.type(0)
    co_n = g.shape[0]
    nonzero = False
    for co in range(co_n):
        if g[co] != z:
            nonzero = True
            break
    if not nonzero:
        return
    _gather_patch(x, n, oy, ox, kh, kw, sh, sw, pt, pl, patch)
    if small:
        for k in range(patch.shape[0]):
            pk = patch[k]
            if pk != z:
                _axpy(dwc[k], pk, g)
        for co in range(co_n):
            dbc[co] += g[co]
        if need_dx:
            for k in range(patch.shape[0]):
                wk = w[k]
                s = z
                for co in range(co_n):
                    s += g[co] * wk[co]
                gpatch[k] = s
    else:
        if need_dx:
            gpatch[:] = z
        for co in range(co_n):
            gc = g[co]
            if gc != z:
                _axpy(dwc[co], gc, patch)
                dbc[co] += gc
                if need_dx:
                    _axpy(gpatch, gc, w[co])
    if need_dx:
        _scatter_patch(dx, n, oy, ox, kh, kw, sh, sw, pt, pl, gpatch)


@njit(inline="always", **_JIT)
def _chunk_start(chunk, nchunks, x, kdim, dw_part, db_part):
    """Work chunk `chunk` of a conv backward: its images [n0, n1), its zeroed partial sums
    and the state `_pixel_backward` updates: (dw, db) zeroed and two scratch patches."""
    dwc = dw_part[chunk]
    dbc = db_part[chunk]
    dwc[:] = dwc.dtype.type(0)
    dbc[:] = dbc.dtype.type(0)
    n_img = x.shape[0]
    n0 = chunk * n_img // nchunks
    n1 = (chunk + 1) * n_img // nchunks
    return n0, n1, (dwc, dbc, np.empty(kdim, x.dtype), np.empty(kdim, x.dtype))


@njit(parallel=True, **_JIT)
def conv2d_backward(x, w, dout, dx, dw_part, db_part, kh, kw, sh, sw, pt, pl, need_dx, small):
    """Sparse backward: only output cells with a non-zero gradient cost anything.

    w is wd (CO, K), or with `small` the transposed kernel wt (K, CO); dw_part (NCHUNKS, CO, K),
    transposed with `small`, and db_part (NCHUNKS, CO) receive per-chunk partial sums (the caller
    adds them in order); dx (N, H, W, CI) is overwritten when need_dx.
    """
    geometry = (kh, kw, sh, sw, pt, pl)
    oh = dout.shape[1]
    ow = dout.shape[2]
    kdim = x.shape[3] * kh * kw
    nchunks = dw_part.shape[0]
    for chunk in prange(nchunks):
        n0, n1, acc = _chunk_start(chunk, nchunks, x, kdim, dw_part, db_part)
        for n in range(n0, n1):
            if need_dx:
                dx[n] = 0
            for oy in range(oh):
                for ox in range(ow):
                    g = dout[n, oy, ox]
                    _pixel_backward(x, n, oy, ox, geometry, g, w, small, acc, dx, need_dx)


@njit(parallel=True, **_JIT)
def conv2d_pool_forward(
    x, wd, wt, bias, pooled, arg, oh, ow, kh, kw, sh, sw, pt, pl, ph, pw, relu, small
):
    """conv2d (+ReLU) then a max pool whose windows tile the conv output (stride = pool size, valid).

    Only the conv pixels the pool reads are computed; the full conv output is never stored.
    pooled (N, QH, QW, CO) and arg (iy * OW + ix of the winner) are as maxpool_forward gives.
    `small` picks the outer-product form (uses wt (K, CO)) over the 4x4 dot form (uses wd (CO, K)).
    """
    n_img = x.shape[0]
    qh = pooled.shape[1]
    qw = pooled.shape[2]
    co_n = pooled.shape[3]
    kdim = wd.shape[1]
    win = ph * pw
    rows = qw * win
    rows4 = (rows + 3) // 4 * 4
    for task in prange(n_img * qh):
        n = task // qh
        py = task - n * qh
        conv = np.empty((rows, co_n), x.dtype)
        patch = np.zeros((rows4, kdim), x.dtype)
        r = 0
        for px in range(qw):
            for wy in range(ph):
                for wx in range(pw):
                    _gather_patch(
                        x, n, py * ph + wy, px * pw + wx, kh, kw, sh, sw, pt, pl, patch[r]
                    )
                    r += 1
        _conv_rows(patch, rows, wd, wt, bias, conv, relu, small)
        for px in range(qw):
            o = pooled[n, py, px]
            a = arg[n, py, px]
            first = conv[px * win]
            pos0 = (py * ph) * ow + px * pw
            for c in range(co_n):
                o[c] = first[c]
                a[c] = pos0
            for q in range(1, win):
                wy = q // pw
                wx = q - wy * pw
                cand = conv[px * win + q]
                pos = (py * ph + wy) * ow + px * pw + wx
                for c in range(co_n):
                    if cand[c] > o[c]:
                        o[c] = cand[c]
                        a[c] = pos


@njit(inline="always", **_JIT)
def _pix(xn, iy, ix, h, w):
    """x[n, iy, ix, 0], or 0 in the padding."""
    if iy >= 0 and iy < h and ix >= 0 and ix < w:
        return xn[iy, ix, 0]
    return xn.dtype.type(0)


@njit(inline="always", **_JIT)
def _pix4(xn, iy, x0, h, w):
    """x[n, iy, x0:x0+4, 0], 0 in the padding: one row of the 4x4 input patch under a 2x2/2
    pool window of a 3x3 conv (inlined, the values stay in registers)."""
    return (
        _pix(xn, iy, x0, h, w),
        _pix(xn, iy, x0 + 1, h, w),
        _pix(xn, iy, x0 + 2, h, w),
        _pix(xn, iy, x0 + 3, h, w),
    )


@njit(inline="always", **_JIT)
def _patch4x4(xn, y0, x0, h, w):
    """The 4x4 input patch at (y0, x0) as 16 values, row by row (p[4 * row + col]): what a
    2x2/2 pool window of a 3x3 conv reads."""
    return (
        _pix4(xn, y0, x0, h, w)
        + _pix4(xn, y0 + 1, x0, h, w)
        + _pix4(xn, y0 + 2, x0, h, w)
        + _pix4(xn, y0 + 3, x0, h, w)
    )


@njit(inline="always", **_JIT)
def _pool2_positions(py, px, ow):
    """Flat conv-output positions (iy * OW + ix) of the four pixels of 2x2/2 pool cell (py, px)."""
    pos00 = (2 * py) * ow + 2 * px
    return pos00, pos00 + 1, pos00 + ow, pos00 + ow + 1


@njit(parallel=True, **_JIT)
def conv3x3c1_pool2_forward(x, wt, bias, pooled, arg, ow, pt, pl, relu):
    """conv2d_pool_forward for the common first layer: 1 input channel, 3x3 kernel, stride 1, then a
    2x2/2 max pool. The 4x4 input patch of a pool window lives in 16 scalars; the loop over the
    output channels is innermost, so it vectorises with the kernel taps broadcast (wt is (9, CO))."""
    n_img, h, w = x.shape[0], x.shape[1], x.shape[2]
    qh = pooled.shape[1]
    qw = pooled.shape[2]
    co_n = pooled.shape[3]
    z = pooled.dtype.type(0)
    for task in prange(n_img * qh):
        n = task // qh
        py = task - n * qh
        xn = x[n]
        y0 = 2 * py - pt
        for px in range(qw):
            x0 = 2 * px - pl
            p = _patch4x4(xn, y0, x0, h, w)
            o = pooled[n, py, px]
            a = arg[n, py, px]
            pos00, pos01, pos10, pos11 = _pool2_positions(py, px, ow)
            for c in range(co_n):
                w0 = wt[0, c]
                w1 = wt[1, c]
                w2 = wt[2, c]
                w3 = wt[3, c]
                w4 = wt[4, c]
                w5 = wt[5, c]
                w6 = wt[6, c]
                w7 = wt[7, c]
                w8 = wt[8, c]
                b = bias[c]
                s00 = (
                    b
                    + p[0] * w0
                    + p[1] * w1
                    + p[2] * w2
                    + p[4] * w3
                    + p[5] * w4
                    + p[6] * w5
                    + p[8] * w6
                    + p[9] * w7
                    + p[10] * w8
                )
                s01 = (
                    b
                    + p[1] * w0
                    + p[2] * w1
                    + p[3] * w2
                    + p[5] * w3
                    + p[6] * w4
                    + p[7] * w5
                    + p[9] * w6
                    + p[10] * w7
                    + p[11] * w8
                )
                s10 = (
                    b
                    + p[4] * w0
                    + p[5] * w1
                    + p[6] * w2
                    + p[8] * w3
                    + p[9] * w4
                    + p[10] * w5
                    + p[12] * w6
                    + p[13] * w7
                    + p[14] * w8
                )
                s11 = (
                    b
                    + p[5] * w0
                    + p[6] * w1
                    + p[7] * w2
                    + p[9] * w3
                    + p[10] * w4
                    + p[11] * w5
                    + p[13] * w6
                    + p[14] * w7
                    + p[15] * w8
                )
                if relu:
                    s00 = max(s00, z)
                    s01 = max(s01, z)
                    s10 = max(s10, z)
                    s11 = max(s11, z)
                m = s00
                ai = pos00
                if s01 > m:
                    m = s01
                    ai = pos01
                if s10 > m:
                    m = s10
                    ai = pos10
                if s11 > m:
                    m = s11
                    ai = pos11
                o[c] = m
                a[c] = ai


@njit(parallel=True, **_JIT)
def conv3x3c1_pool2_backward(x, pooled, dpool, arg, dwt_part, db_part, ow, pt, pl, relu):
    """Parameter gradients for conv3x3c1_pool2_forward (a first layer: no input gradient).
    dwt_part (NCHUNKS, 9, CO) and db_part (NCHUNKS, CO) receive per-chunk partial sums."""
    n_img, h, w = x.shape[0], x.shape[1], x.shape[2]
    qh = dpool.shape[1]
    qw = dpool.shape[2]
    co_n = dpool.shape[3]
    nchunks = dwt_part.shape[0]
    z = dwt_part.dtype.type(0)
    for chunk in prange(nchunks):
        dwc = dwt_part[chunk]
        dbc = db_part[chunk]
        dwc[:] = z
        dbc[:] = z
        d0 = dwc[0]
        d1 = dwc[1]
        d2 = dwc[2]
        d3 = dwc[3]
        d4 = dwc[4]
        d5 = dwc[5]
        d6 = dwc[6]
        d7 = dwc[7]
        d8 = dwc[8]
        n0 = chunk * n_img // nchunks
        n1 = (chunk + 1) * n_img // nchunks
        for n in range(n0, n1):
            xn = x[n]
            for py in range(qh):
                y0 = 2 * py - pt
                for px in range(qw):
                    x0 = 2 * px - pl
                    p = _patch4x4(xn, y0, x0, h, w)
                    g_row = dpool[n, py, px]
                    a_row = arg[n, py, px]
                    v_row = pooled[n, py, px]
                    pos00, pos01, pos10, pos11 = _pool2_positions(py, px, ow)
                    for c in range(co_n):
                        g = g_row[c]
                        if relu and v_row[c] <= z:
                            g = z
                        ai = a_row[c]
                        g00 = g if ai == pos00 else z
                        g01 = g if ai == pos01 else z
                        g10 = g if ai == pos10 else z
                        g11 = g if ai == pos11 else z
                        dbc[c] += g
                        d0[c] += g00 * p[0] + g01 * p[1] + g10 * p[4] + g11 * p[5]
                        d1[c] += g00 * p[1] + g01 * p[2] + g10 * p[5] + g11 * p[6]
                        d2[c] += g00 * p[2] + g01 * p[3] + g10 * p[6] + g11 * p[7]
                        d3[c] += g00 * p[4] + g01 * p[5] + g10 * p[8] + g11 * p[9]
                        d4[c] += g00 * p[5] + g01 * p[6] + g10 * p[9] + g11 * p[10]
                        d5[c] += g00 * p[6] + g01 * p[7] + g10 * p[10] + g11 * p[11]
                        d6[c] += g00 * p[8] + g01 * p[9] + g10 * p[12] + g11 * p[13]
                        d7[c] += g00 * p[9] + g01 * p[10] + g10 * p[13] + g11 * p[14]
                        d8[c] += g00 * p[10] + g01 * p[11] + g10 * p[14] + g11 * p[15]


@njit(inline="always", **_JIT)
def _pooled_grads(dpool, arg, pooled, n, py, px, pos, relu, gvec):
    """gvec[co] = the gradient reaching conv output pixel `pos` (iy * OW + ix) through pooled cell
    (py, px): dpool where the pool picked that pixel (and ReLU let it through, i.e. the pooled
    value, which is that pixel's, is > 0), else 0. Returns whether any is non-zero."""
    z = gvec.dtype.type(0)
    g = dpool[n, py, px]
    a = arg[n, py, px]
    pv = pooled[n, py, px]
    any_nz = False
    for co in range(gvec.shape[0]):
        v = g[co] if a[co] == pos else z
        if relu and pv[co] <= z:
            v = z
        gvec[co] = v
        if v != z:
            any_nz = True
    return any_nz


@njit(parallel=True, **_JIT)
def conv2d_pool_backward(
    x,
    w,
    pooled,
    oh,
    ow,
    dpool,
    arg,
    dx,
    dw_part,
    db_part,
    kh,
    kw,
    sh,
    sw,
    pt,
    pl,
    ph,
    pw,
    psh,
    psw,
    ppt,
    ppl,
    relu,
    need_dx,
    small,
):
    """Backward of conv2d (+ReLU) followed by max pooling, without the dense conv-output gradient.

    Visits each pooled cell's window pixels and does work only for the channels the pool picked
    there. Same outputs as maxpool_backward + activation_backward + conv2d_backward, whose
    layouts (w, dw_part by `small`) it takes.
    """
    geometry = (kh, kw, sh, sw, pt, pl)
    co_n = dpool.shape[3]
    qh = dpool.shape[1]
    qw = dpool.shape[2]
    kdim = x.shape[3] * kh * kw
    nchunks = dw_part.shape[0]
    for chunk in prange(nchunks):
        n0, n1, acc = _chunk_start(chunk, nchunks, x, kdim, dw_part, db_part)
        gvec = np.empty(co_n, x.dtype)
        for n in range(n0, n1):
            if need_dx:
                dx[n] = 0
            for py in range(qh):
                for px in range(qw):
                    y0, y1 = _span(py, psh, ppt, ph, oh)
                    x0, x1 = _span(px, psw, ppl, pw, ow)
                    for iy in range(y0, y1):
                        for ix in range(x0, x1):
                            if _pooled_grads(
                                dpool, arg, pooled, n, py, px, iy * ow + ix, relu, gvec
                            ):
                                _pixel_backward(
                                    x, n, iy, ix, geometry, gvec, w, small, acc, dx, need_dx
                                )


@njit(**_JIT)
def sum_partials(parts, out):
    """out = parts[0] + parts[1] + ... in a fixed order (flat, contiguous)."""
    out[:] = parts[0]
    for c in range(1, parts.shape[0]):
        p = parts[c]
        for i in range(out.shape[0]):
            out[i] += p[i]


@njit(inline="always", **_JIT)
def _span(o, stride, pad, size, limit):
    """The input range [start, stop) that window o covers along one axis, clipped to [0, limit)."""
    start = o * stride - pad
    return max(start, 0), min(start + size, limit)


# --------------------------------------------------------------------------------- pooling
@njit(parallel=True, **_JIT)
def maxpool_forward(x, out, arg, ph, pw, sh, sw, pt, pl):
    """Max over each window (padding ignored); arg records the winner as iy * W + ix."""
    n_img, h, w, c_n = x.shape
    oh = out.shape[1]
    ow = out.shape[2]
    for task in prange(n_img * oh):
        n = task // oh
        oy = task - n * oh
        for ox in range(ow):
            o = out[n, oy, ox]
            a = arg[n, oy, ox]
            first = True
            y0, y1 = _span(oy, sh, pt, ph, h)
            x0, x1 = _span(ox, sw, pl, pw, w)
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    src = x[n, iy, ix]
                    pos = iy * w + ix
                    if first:
                        for c in range(c_n):
                            o[c] = src[c]
                            a[c] = pos
                        first = False
                    else:
                        for c in range(c_n):
                            if src[c] > o[c]:
                                o[c] = src[c]
                                a[c] = pos


@njit(parallel=True, **_JIT)
def maxpool_backward(dout, arg, dx):
    """dx (overwritten) receives each window's gradient at its recorded winner."""
    n_img = dout.shape[0]
    oh = dout.shape[1]
    ow = dout.shape[2]
    c_n = dout.shape[3]
    w = dx.shape[2]
    z = dx.dtype.type(0)
    for n in prange(n_img):
        dx[n] = z
        for oy in range(oh):
            for ox in range(ow):
                g = dout[n, oy, ox]
                a = arg[n, oy, ox]
                for c in range(c_n):
                    pos = a[c]
                    iy = pos // w
                    dx[n, iy, pos - iy * w, c] += g[c]


@njit(parallel=True, **_JIT)
def avgpool_forward(x, out, ph, pw, sh, sw, pt, pl):
    """Mean over each window's real (unpadded) cells."""
    n_img, h, w, c_n = x.shape
    oh = out.shape[1]
    ow = out.shape[2]
    z = out.dtype.type(0)
    for task in prange(n_img * oh):
        n = task // oh
        oy = task - n * oh
        for ox in range(ow):
            o = out[n, oy, ox]
            o[:] = z
            y0, y1 = _span(oy, sh, pt, ph, h)
            x0, x1 = _span(ox, sw, pl, pw, w)
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    src = x[n, iy, ix]
                    for c in range(c_n):
                        o[c] += src[c]
            inv = out.dtype.type(1) / out.dtype.type((y1 - y0) * (x1 - x0))
            for c in range(c_n):
                o[c] *= inv


@njit(parallel=True, **_JIT)
def avgpool_backward(dout, dx, ph, pw, sh, sw, pt, pl):
    """dx (overwritten): each window's gradient shared equally among its real cells."""
    n_img, h, w, c_n = dx.shape
    oh = dout.shape[1]
    ow = dout.shape[2]
    z = dx.dtype.type(0)
    for n in prange(n_img):
        dx[n] = z
        for oy in range(oh):
            y0, y1 = _span(oy, sh, pt, ph, h)
            for ox in range(ow):
                x0, x1 = _span(ox, sw, pl, pw, w)
                inv = dx.dtype.type(1) / dx.dtype.type((y1 - y0) * (x1 - x0))
                g = dout[n, oy, ox]
                for iy in range(y0, y1):
                    for ix in range(x0, x1):
                        d = dx[n, iy, ix]
                        for c in range(c_n):
                            d[c] += g[c] * inv


# --------------------------------------------------------------------------------- dense
@njit(parallel=True, **_JIT)
def dense_forward(x, w, bias, out, relu):
    """out (N, U) = x (N, I) @ w (U, I).T + bias (then ReLU if relu); 4 samples x 4 units per step."""
    n_img = x.shape[0]
    kdim = x.shape[1]
    blocks = (n_img + 3) // 4
    for blk in prange(blocks):
        r0 = blk * 4
        rows = min(4, n_img - r0)
        a = np.zeros((4, kdim), x.dtype)
        for r in range(rows):
            a[r] = x[r0 + r]
        _gemm_nt_rows(a, rows, w, bias, out, r0, relu)


@njit(parallel=True, **_JIT)
def dense_backward(x, w, y, dout, dw, db, dx, relu, need_dx):
    """All of a dense layer's backward in one parallel region: tasks 0..U-1 compute dw rows and db,
    tasks U..U+N-1 compute dx rows. With relu, dout is masked where the output y was not > 0."""
    n_img = x.shape[0]
    units = dout.shape[1]
    z = dw.dtype.type(0)
    tasks = units + (n_img if need_dx else 0)
    for task in prange(tasks):
        if task < units:
            j = task
            row = dw[j]
            row[:] = z
            s = z
            for n in range(n_img):
                g = dout[n, j]
                if relu and y[n, j] <= z:
                    g = z
                if g != z:
                    _axpy(row, g, x[n])
                    s += g
            db[j] = s
        else:
            n = task - units
            row = dx[n]
            row[:] = z
            for j in range(units):
                g = dout[n, j]
                if relu and y[n, j] <= z:
                    g = z
                if g != z:
                    _axpy(row, g, w[j])


# --------------------------------------------------------------------------------- activations
@njit(parallel=True, **_JIT)
def activation_forward(y, kind):
    """In place on a 2-D (rows, features) view; softmax is per row."""
    rows = y.shape[0]
    cols = y.shape[1]
    z = y.dtype.type(0)
    one = y.dtype.type(1)
    for r in prange(rows):
        v = y[r]
        if kind == RELU:
            for i in range(cols):
                if v[i] < z:
                    v[i] = z
        elif kind == TANH:
            for i in range(cols):
                v[i] = np.tanh(v[i])
        elif kind == SIGMOID:
            for i in range(cols):
                v[i] = one / (one + np.exp(-v[i]))
        elif kind == SOFTMAX:
            m = v[0]
            for i in range(1, cols):
                m = max(m, v[i])
            s = z
            for i in range(cols):
                e = np.exp(v[i] - m)
                v[i] = e
                s += e
            inv = one / s
            for i in range(cols):
                v[i] *= inv


@njit(parallel=True, **_JIT)
def activation_backward(dy, y, kind, dz):
    """dz = dL/dz from dy = dL/dy and the activation's output y (2-D views)."""
    rows = y.shape[0]
    cols = y.shape[1]
    z = y.dtype.type(0)
    one = y.dtype.type(1)
    for r in prange(rows):
        g = dy[r]
        v = y[r]
        d = dz[r]
        if kind == RELU:
            for i in range(cols):
                d[i] = g[i] if v[i] > z else z
        elif kind == TANH:
            for i in range(cols):
                d[i] = g[i] * (one - v[i] * v[i])
        elif kind == SIGMOID:
            for i in range(cols):
                d[i] = g[i] * v[i] * (one - v[i])
        elif kind == SOFTMAX:
            s = z
            for i in range(cols):
                s += g[i] * v[i]
            for i in range(cols):
                d[i] = v[i] * (g[i] - s)
        else:
            for i in range(cols):
                d[i] = g[i]


# --------------------------------------------------------------------------------- loss
@njit(**_JIT)
def softmax_cross_entropy(logits, labels, dlogits, smoothing=0.0):
    """Mean cross-entropy of softmax(logits) against smoothed one-hot targets
    q = (1 - smoothing) * onehot + smoothing / classes; dlogits = (softmax - q) / N.

    Returns (summed loss as float64, number of correct argmax predictions). With smoothing 0 the
    arithmetic is exactly the plain one-hot loss.
    """
    n_img = logits.shape[0]
    classes = logits.shape[1]
    inv_n = dlogits.dtype.type(1.0 / n_img)
    spread = dlogits.dtype.type(smoothing / classes * (1.0 / n_img))  # (q_i off the label) / N
    on_label = dlogits.dtype.type((1.0 - smoothing) * (1.0 / n_img))
    total = 0.0
    correct = 0
    for n in range(n_img):
        v = logits[n]
        d = dlogits[n]
        m = v[0]
        best = 0
        for i in range(1, classes):
            if v[i] > m:
                m = v[i]
                best = i
        s = 0.0
        for i in range(classes):
            e = np.exp(v[i] - m)
            d[i] = e
            s += e
        lab = labels[n]
        if smoothing == 0.0:
            total += np.log(s) - (v[lab] - m)
        else:  # -sum_i q_i log p_i, with log p_i = (v_i - m) - log s and sum_i q_i = 1
            mean_shifted = 0.0
            for i in range(classes):
                mean_shifted += v[i] - m
            mean_shifted /= classes
            total += np.log(s) - (1.0 - smoothing) * (v[lab] - m) - smoothing * mean_shifted
        if best == lab:
            correct += 1
        inv = 1.0 / s
        if smoothing == 0.0:
            for i in range(classes):
                d[i] = d[i] * inv * inv_n
            d[lab] -= inv_n
        else:
            for i in range(classes):
                d[i] = d[i] * inv * inv_n - spread
            d[lab] -= on_label
    return total, correct


# --------------------------------------------------------------------------------- optimizers
@njit(parallel=True, **_JIT)
def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW-style decoupled weight decay when weight_decay > 0 (p -= lr * wd * p)."""
    size = p.shape[0]
    f = p.dtype.type
    b1 = f(beta1)
    b2 = f(beta2)
    c1 = f(1.0 / (1.0 - beta1**step))
    c2 = f(1.0 / (1.0 - beta2**step))
    lr_f = f(lr)
    e = f(eps)
    decay = f(lr * weight_decay)
    one = f(1)
    blocks = (size + 4095) // 4096
    for blk in prange(blocks):
        for i in range(blk * 4096, min(size, blk * 4096 + 4096)):
            gi = g[i]
            mi = b1 * m[i] + (one - b1) * gi
            vi = b2 * v[i] + (one - b2) * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] -= lr_f * (mi * c1) / (np.sqrt(vi * c2) + e) + decay * p[i]


@njit(parallel=True, **_JIT)
def sgd_step(p, g, vel, lr, momentum, nesterov, weight_decay):
    """SGD with momentum (classic or Nesterov) and L2 weight decay added to the gradient."""
    size = p.shape[0]
    f = p.dtype.type
    lr_f = f(lr)
    mu = f(momentum)
    wd = f(weight_decay)
    blocks = (size + 4095) // 4096
    for blk in prange(blocks):
        for i in range(blk * 4096, min(size, blk * 4096 + 4096)):
            gi = g[i] + wd * p[i]
            vi = mu * vel[i] + gi
            vel[i] = vi
            if nesterov:
                p[i] -= lr_f * (gi + mu * vi)
            else:
                p[i] -= lr_f * vi
