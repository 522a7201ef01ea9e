"""Convolution kernels (NHWC, float32), optionally fused with 2x2/2 max pooling.

Weights are packed once by the plan:
- dot form `wd[COp, Kp]`: row `co` holds the kernel in (ky, kx, ci) order, `COp` = filters
  rounded up to 4 and `Kp` = kh*kw*ci rounded up to 16, padded with zeros;
- for the 1-input-channel 3x3 kernel, `wt[9, COp]` (taps x channels).

Each task gathers the patches of its pixels into a per-thread scratch row (this handles stride,
padding, kernel size and the model's preprocessing `x * scale + shift`), then runs the
"4 pixels x 4 output channels" micro-kernel: 16 scalar accumulators over a contiguous reduction,
which LLVM keeps in 16 vector registers. Fused pooling uses the 4 pixels of a pool window as the
micro-kernel's 4 pixels; max pooling commutes with the per-channel bias and with every monotonic
activation, so bias and activation run once per pooled value.

Activation codes: 0 linear, 1 relu, 2 tanh, 3 sigmoid (softmax is applied by a separate kernel).
Keep helpers in this file: numba's cache only tracks the kernel's own source file.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)

import numba
import numpy as np
from numba import njit, prange

_Z = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(fastmath=True, cache=True, nogil=True)
def _act(v, act):
    if act == 1:
        return v if v > _Z else _Z
    if act == 2:
        return np.tanh(v)
    if act == 3:
        return _ONE / (_ONE + np.exp(-v))
    return v


@njit(fastmath=True, cache=True, nogil=True)
def _copy(dst, src, scale, shift, pre):
    """dst = src (or src * scale + shift, per channel) for 1-D slices of equal length."""
    if pre == 0:
        for j in range(dst.size):
            dst[j] = src[j]
    else:
        for j in range(dst.size):
            dst[j] = src[j] * scale[j] + shift[j]


@njit(fastmath=True, cache=True, nogil=True)
def _gather(xf, H, W, CI, n, oy, ox, kh, kw, sh, sw, pt, pl, scale, shift, pre, pat, o, Kp):
    """Write pixel (oy, ox)'s receptive field (zeros outside the image) to pat[o:o+Kp]."""
    rowlen = kw * CI
    iy0 = oy * sh - pt
    ix0 = ox * sw - pl
    inside_x = ix0 >= 0 and ix0 + kw <= W
    for ky in range(kh):
        iy = iy0 + ky
        r = o + ky * rowlen
        if iy < 0 or iy >= H:
            pat[r:r + rowlen] = _Z
        elif inside_x and pre == 0:
            src = ((n * H + iy) * W + ix0) * CI
            _copy(pat[r:r + rowlen], xf[src:src + rowlen], scale, shift, 0)
        else:
            for kx in range(kw):
                ix = ix0 + kx
                rr = r + kx * CI
                if ix < 0 or ix >= W:
                    pat[rr:rr + CI] = _Z
                else:
                    src = ((n * H + iy) * W + ix) * CI
                    _copy(pat[rr:rr + CI], xf[src:src + CI], scale, shift, pre)
    pat[o + kh * rowlen:o + Kp] = _Z


@njit(fastmath=True, cache=True, nogil=True)
def _dot4x4(pat, q0, q1, q2, q3, wd, c, Kp):
    """16 dot products: pixels at pat[q*:q*+Kp] times weight rows c..c+3."""
    p0 = pat[q0:q0 + Kp]
    p1 = pat[q1:q1 + Kp]
    p2 = pat[q2:q2 + Kp]
    p3 = pat[q3:q3 + Kp]
    w0 = wd[c]
    w1 = wd[c + 1]
    w2 = wd[c + 2]
    w3 = wd[c + 3]
    a00 = a01 = a02 = a03 = _Z
    a10 = a11 = a12 = a13 = _Z
    a20 = a21 = a22 = a23 = _Z
    a30 = a31 = a32 = a33 = _Z
    for j in range(Kp):
        x0 = p0[j]
        x1 = p1[j]
        x2 = p2[j]
        x3 = p3[j]
        v0 = w0[j]
        v1 = w1[j]
        v2 = w2[j]
        v3 = w3[j]
        a00 += x0 * v0
        a01 += x0 * v1
        a02 += x0 * v2
        a03 += x0 * v3
        a10 += x1 * v0
        a11 += x1 * v1
        a12 += x1 * v2
        a13 += x1 * v3
        a20 += x2 * v0
        a21 += x2 * v1
        a22 += x2 * v2
        a23 += x2 * v3
        a30 += x3 * v0
        a31 += x3 * v1
        a32 += x3 * v2
        a33 += x3 * v3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv_pool2(x, wd, bias, scale, shift, pre, scratch, out, kh, kw, sh, sw, pt, pl, act, splits):
    """Conv + bias + activation + 2x2/2 max pool (floor). out: (N, PH, PW, CO).

    Tasks: (image, pooled row, channel split). scratch: (threads, 2 * 2PW * Kp).
    """
    N, H, W, CI = x.shape
    COp, Kp = wd.shape
    PH, PW, CO = out.shape[1], out.shape[2], out.shape[3]
    groups = COp // 4
    per = (groups + splits - 1) // splits
    ncols = 2 * PW
    xf = x.reshape(x.size)
    for t in prange(N * PH * splits):
        s = t % splits
        r = t // splits
        py = r % PH
        n = r // PH
        pat = scratch[numba.get_thread_id()]
        for dy in range(2):
            for ox in range(ncols):
                _gather(xf, H, W, CI, n, 2 * py + dy, ox, kh, kw, sh, sw, pt, pl, scale, shift, pre,
                        pat, (dy * ncols + ox) * Kp, Kp)
        g0 = s * per
        g1 = min(groups, g0 + per)
        for px in range(PW):
            q0 = 2 * px * Kp
            q2 = (ncols + 2 * px) * Kp
            orow = out[n, py, px]
            for g in range(g0, g1):
                c = 4 * g
                a = _dot4x4(pat, q0, q0 + Kp, q2, q2 + Kp, wd, c, Kp)
                for i in range(4):
                    if c + i < CO:
                        m = max(max(a[i], a[4 + i]), max(a[8 + i], a[12 + i])) + bias[c + i]
                        orow[c + i] = _act(m, act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv(x, wd, bias, scale, shift, pre, scratch, out, kh, kw, sh, sw, pt, pl, act, chunk, splits):
    """Generic conv + bias + activation. out: (N, OH, OW, CO).

    Tasks: (image, chunk of `chunk` output pixels in row-major order, channel split).
    scratch: (threads, chunk * Kp).
    """
    N, H, W, CI = x.shape
    COp, Kp = wd.shape
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    npx = OH * OW
    nchunks = (npx + chunk - 1) // chunk
    groups = COp // 4
    per = (groups + splits - 1) // splits
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for t in prange(N * nchunks * splits):
        s = t % splits
        r = t // splits
        k = r % nchunks
        n = r // nchunks
        p0 = k * chunk
        cnt = min(npx, p0 + chunk) - p0
        pat = scratch[numba.get_thread_id()]
        for i in range(cnt):
            p = p0 + i
            _gather(xf, H, W, CI, n, p // OW, p % OW, kh, kw, sh, sw, pt, pl, scale, shift, pre,
                    pat, i * Kp, Kp)
        g0 = s * per
        g1 = min(groups, g0 + per)
        for i in range(0, cnt, 4):
            last = cnt - 1
            q1 = min(i + 1, last) * Kp
            q2 = min(i + 2, last) * Kp
            q3 = min(i + 3, last) * Kp
            for g in range(g0, g1):
                c = 4 * g
                a = _dot4x4(pat, i * Kp, q1, q2, q3, wd, c, Kp)
                for u in range(4):
                    if i + u < cnt:
                        base = (n * npx + p0 + i + u) * CO
                        for v in range(4):
                            if c + v < CO:
                                of[base + c + v] = _act(a[4 * u + v] + bias[c + v], act)


@njit(fastmath=True, cache=True, nogil=True)
def _px(xf, H, W, n, y, x, sc, sf):
    if y < 0 or y >= H or x < 0 or x >= W:
        return _Z
    return xf[(n * H + y) * W + x] * sc + sf


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
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
    lo = _Z if act == 1 else np.float32(-np.inf)
    for t in prange(N * PH * splits):
        s = t % splits
        r = t // splits
        py = r % PH
        n = r // PH
        b0 = s * per
        b1 = min(nb, b0 + per)
        y = 2 * py - pt
        for px in range(PW):
            xx = 2 * px - pl
            if y >= 0 and y + 4 <= H and xx >= 0 and xx + 4 <= W:  # interior: no bounds checks
                o = (n * H + y) * W + xx
                r0 = xf[o:o + 4]
                r1 = xf[o + W:o + W + 4]
                r2 = xf[o + 2 * W:o + 2 * W + 4]
                r3 = xf[o + 3 * W:o + 3 * W + 4]
                v00, v01, v02, v03 = r0[0] * sc + sf, r0[1] * sc + sf, r0[2] * sc + sf, r0[3] * sc + sf
                v10, v11, v12, v13 = r1[0] * sc + sf, r1[1] * sc + sf, r1[2] * sc + sf, r1[3] * sc + sf
                v20, v21, v22, v23 = r2[0] * sc + sf, r2[1] * sc + sf, r2[2] * sc + sf, r2[3] * sc + sf
                v30, v31, v32, v33 = r3[0] * sc + sf, r3[1] * sc + sf, r3[2] * sc + sf, r3[3] * sc + sf
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
            orow = out[n, py, px]
            for b in range(b0, b1):
                w = wb[b]
                ob = orow[16 * b:16 * b + 16]
                for j in range(16):
                    a = w[0, j]
                    bb = w[1, j]
                    c = w[2, j]
                    d = w[3, j]
                    e = w[4, j]
                    f = w[5, j]
                    g = w[6, j]
                    h = w[7, j]
                    k = w[8, j]
                    s0 = v00 * a + v01 * bb + v02 * c + v10 * d + v11 * e + v12 * f + v20 * g + v21 * h + v22 * k
                    s1 = v01 * a + v02 * bb + v03 * c + v11 * d + v12 * e + v13 * f + v21 * g + v22 * h + v23 * k
                    s2 = v10 * a + v11 * bb + v12 * c + v20 * d + v21 * e + v22 * f + v30 * g + v31 * h + v32 * k
                    s3 = v11 * a + v12 * bb + v13 * c + v21 * d + v22 * e + v23 * f + v31 * g + v32 * h + v33 * k
                    m = max(max(s0, s1), max(s2, s3)) + w[9, j]
                    ob[j] = m if m > lo else lo
                if act > 1:
                    for j in range(16):
                        ob[j] = _act(ob[j], act)
