"""Convolution kernels (NHWC, float32), optionally fused with 2x2/2 max pooling.

Weights are packed once by the plan:
- GEMM form `wk[Kp, COp]`: row `k` holds tap k (in (ky, kx, ci) order) for every filter, `COp` =
  filters rounded up to 16 and `Kp` = kh*kw*ci rounded up to 16, padded with zeros;
- for the small first layers, channel blocks `wb` (see each kernel).

Each task gathers the patches of its pixels into a per-thread scratch row (this handles stride,
padding, kernel size and the model's preprocessing `x * scale + shift`), then runs a register-
blocked GEMM micro-kernel on 4 patch rows x 16-64 output channels: `_mk4x4` and friends below are
numba intrinsics that emit LLVM vector IR directly (16 accumulators of 16 floats held in
registers, one broadcast patch value times 1-4 weight vectors per step, no horizontal sums).
Numba cannot express this in Python: scalar-accumulator kernels either spill or need a
horizontal sum per output. Fused pooling uses the 4 pixels of a pool window as the 4 rows; max
pooling commutes with the per-channel bias and with every monotonic activation, so bias and
activation run once per pooled value. Each output is a plain in-order fused multiply-add chain
over k, the same whatever the batch size, so results are batch-invariant.

Activation codes: 0 linear, 1 relu, 2 tanh, 3 sigmoid (softmax is applied by a separate kernel).
Keep helpers in this file: numba's cache only tracks the kernel's own source file.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_Z = np.float32(0.0)
_ONE = np.float32(1.0)


def _microkernel(rows: int, vectors: int):
    """An intrinsic `mk(a, a_off, lda, b, b_off, ldb, c, c_off, ldc, K)` computing, on flat
    float32 arrays, C[r, 0:16*vectors] = sum over k < K of A[r, k] * B[k, 0:16*vectors] for
    r < rows, where X[i, j] means x[x_off + i * ldx + j]. K >= 1; no bounds checks."""

    @intrinsic
    def mk(typingctx, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, k_len):
        sig = types.void(a, a_off, lda, b, b_off, ldb, c, c_off, ldc, k_len)

        def codegen(context, builder, signature, args):
            a_arr, a_off, lda, b_arr, b_off, ldb, c_arr, c_off, ldc, k_len = args
            ap = context.make_array(signature.args[0])(context, builder, a_arr).data
            bp = context.make_array(signature.args[3])(context, builder, b_arr).data
            cp = context.make_array(signature.args[6])(context, builder, c_arr).data
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), 16)
            vptr = vec.as_pointer()
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 "llvm.fma.v16f32")
            zero = ir.Constant(vec, [0.0] * 16)
            undef = ir.Constant(vec, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
            entry = builder.block
            loop = builder.function.append_basic_block("mk_loop")
            done = builder.function.append_basic_block("mk_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            acc = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
            for row in acc:
                for phi in row:
                    phi.add_incoming(zero, entry)
            b_row = builder.add(b_off, builder.mul(k, ldb))
            bv = [builder.load(builder.bitcast(builder.gep(bp, [builder.add(b_row, ir.Constant(i64, 16 * v))]), vptr),
                               align=4) for v in range(vectors)]
            new = []
            for r in range(rows):
                a_at = builder.add(builder.add(a_off, builder.mul(ir.Constant(i64, r), lda)), k)
                scalar = builder.load(builder.gep(ap, [a_at]), align=4)
                splat = builder.shuffle_vector(builder.insert_element(undef, scalar, ir.Constant(i32, 0)), undef,
                                               splat_mask)
                new.append([builder.call(fma, [splat, bv[v], acc[r][v]]) for v in range(vectors)])
            k_next = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k_next, builder.block)
            for r in range(rows):
                for v in range(vectors):
                    acc[r][v].add_incoming(new[r][v], builder.block)
            builder.cbranch(builder.icmp_signed("<", k_next, k_len), loop, done)
            builder.position_at_end(done)
            for r in range(rows):
                c_row = builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc))
                for v in range(vectors):
                    dst = builder.gep(cp, [builder.add(c_row, ir.Constant(i64, 16 * v))])
                    builder.store(new[r][v], builder.bitcast(dst, vptr), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return mk


_mk4x1 = _microkernel(4, 1)
_mk4x2 = _microkernel(4, 2)
_mk4x4 = _microkernel(4, 4)


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
    """Write pixel (oy, ox)'s receptive field (zeros outside the image) to pat[o:o+Kp].

    Long rows are copied through 1-D slices (vectorised); short ones (few input channels)
    with plain scalar loops, where setting up slices would cost more than the copy."""
    rowlen = kw * CI
    iy0 = oy * sh - pt
    ix0 = ox * sw - pl
    inside_x = ix0 >= 0 and ix0 + kw <= W
    for ky in range(kh):
        iy = iy0 + ky
        r = o + ky * rowlen
        if iy < 0 or iy >= H:
            for j in range(rowlen):
                pat[r + j] = _Z
        elif inside_x and pre == 0:
            src = ((n * H + iy) * W + ix0) * CI
            if rowlen >= 32:
                _copy(pat[r:r + rowlen], xf[src:src + rowlen], scale, shift, 0)
            else:
                for j in range(rowlen):
                    pat[r + j] = xf[src + j]
        else:
            for kx in range(kw):
                ix = ix0 + kx
                rr = r + kx * CI
                if ix < 0 or ix >= W:
                    for c in range(CI):
                        pat[rr + c] = _Z
                else:
                    src = ((n * H + iy) * W + ix) * CI
                    if pre == 0:
                        for c in range(CI):
                            pat[rr + c] = xf[src + c]
                    else:
                        for c in range(CI):
                            pat[rr + c] = xf[src + c] * scale[c] + shift[c]
    for j in range(o + kh * rowlen, o + Kp):
        pat[j] = _Z


@njit(fastmath=True, cache=True, nogil=True)
def _gather_wide(x2, H, W, n, oy, ox, kh, kw, sh, sw, pt, pl, pat3, i):
    """`_gather` for many input channels without preprocessing, with no array views (each view
    is an atomic reference-count update on an array both threads share): pixel (oy, ox)'s
    receptive field goes to pat3[i] (taps, CI); x2 is the input as (N*H*W, CI)."""
    CI = x2.shape[1]
    iy0 = oy * sh - pt
    ix0 = ox * sw - pl
    for ky in range(kh):
        iy = iy0 + ky
        for kx in range(kw):
            ix = ix0 + kx
            tap = ky * kw + kx
            if iy < 0 or iy >= H or ix < 0 or ix >= W:
                for c in range(CI):
                    pat3[i, tap, c] = _Z
            else:
                q = (n * H + iy) * W + ix
                for c in range(CI):
                    pat3[i, tap, c] = x2[q, c]


@njit(fastmath=True, cache=True, nogil=True)
def _gemm4(pat, p_off, Kp, wf, COp, tile):
    """tile[0:4, :COp] = pat[p_off : p_off + 4*Kp] as 4 rows of Kp, times wf as (Kp, COp)."""
    tf = tile.reshape(tile.size)
    ldc = tile.shape[1]
    c = 0
    while c + 64 <= COp:
        _mk4x4(pat, p_off, Kp, wf, c, COp, tf, c, ldc, Kp)
        c += 64
    if c + 32 <= COp:
        _mk4x2(pat, p_off, Kp, wf, c, COp, tf, c, ldc, Kp)
        c += 32
    if c < COp:
        _mk4x1(pat, p_off, Kp, wf, c, COp, tf, c, ldc, Kp)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv_pool2(x, wk, bias, scale, shift, pre, scratch, tiles, out, kh, kw, sh, sw, pt, pl, act, splits):
    """Conv + bias + activation + 2x2/2 max pool (floor). out: (N, PH, PW, CO).

    Tasks: (image, pooled row, range of pooled columns); `splits` ranges per row.
    scratch: (threads, >= 4 * PW * Kp); tiles: (threads, 4, COp).
    """
    N, H, W, CI = x.shape
    Kp, COp = wk.shape
    PH, PW, CO = out.shape[1], out.shape[2], out.shape[3]
    per = (PW + splits - 1) // splits
    xf = x.reshape(x.size)
    x2 = x.reshape(N * H * W, CI)
    wf = wk.reshape(wk.size)
    wide = pre == 0 and CI >= 16 and kh * kw * CI == Kp
    for t in prange(N * PH * splits):
        s = t % splits
        r = t // splits
        py = r % PH
        n = r // PH
        px0 = min(PW, s * per)
        nw = min(PW, px0 + per) - px0
        tid = numba.get_thread_id()
        buf = scratch[tid]
        tile = tiles[tid]
        # rows 4w .. 4w+3 of the patch matrix: pool window w's pixels (0,0), (0,1), (1,0), (1,1)
        if wide:
            pat3 = buf[:4 * nw * Kp].reshape(4 * nw, kh * kw, CI)
            for i in range(4 * nw):
                q = i % 4
                _gather_wide(x2, H, W, n, 2 * py + q // 2, 2 * (px0 + i // 4) + q % 2, kh, kw, sh, sw, pt, pl,
                             pat3, i)
        else:
            for i in range(4 * nw):
                q = i % 4
                _gather(xf, H, W, CI, n, 2 * py + q // 2, 2 * (px0 + i // 4) + q % 2, kh, kw, sh, sw, pt, pl,
                        scale, shift, pre, buf, i * Kp, Kp)
        for w in range(nw):
            _gemm4(buf, 4 * w * Kp, Kp, wf, COp, tile)
            for co in range(CO):
                m = max(max(tile[0, co], tile[1, co]), max(tile[2, co], tile[3, co])) + bias[co]
                out[n, py, px0 + w, co] = _act(m, act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv(x, wk, bias, scale, shift, pre, scratch, tiles, out, kh, kw, sh, sw, pt, pl, act, chunk):
    """Generic conv + bias + activation. out: (N, OH, OW, CO).

    Tasks: (image, chunk of `chunk` output pixels in row-major order), `chunk` a multiple of 4.
    scratch: (threads, >= chunk * Kp); tiles: (threads, 4, COp).
    """
    N, H, W, CI = x.shape
    Kp, COp = wk.shape
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    npx = OH * OW
    nchunks = (npx + chunk - 1) // chunk
    xf = x.reshape(x.size)
    x2 = x.reshape(N * H * W, CI)
    wf = wk.reshape(wk.size)
    wide = pre == 0 and CI >= 16 and kh * kw * CI == Kp
    of = out.reshape(out.size)
    for t in prange(N * nchunks):
        k = t % nchunks
        n = t // nchunks
        p0 = k * chunk
        cnt = min(npx, p0 + chunk) - p0
        tid = numba.get_thread_id()
        buf = scratch[tid]
        tile = tiles[tid]
        if wide:
            pat3 = buf[:cnt * Kp].reshape(cnt, kh * kw, CI)
            for i in range(cnt):
                p = p0 + i
                _gather_wide(x2, H, W, n, p // OW, p % OW, kh, kw, sh, sw, pt, pl, pat3, i)
        else:
            for i in range(cnt):
                p = p0 + i
                _gather(xf, H, W, CI, n, p // OW, p % OW, kh, kw, sh, sw, pt, pl, scale, shift, pre,
                        buf, i * Kp, Kp)
        for i in range(cnt, (cnt + 3) // 4 * 4):  # rows past the end: zeros, results dropped
            for j in range(Kp):
                buf[i * Kp + j] = _Z
        for i in range(0, cnt, 4):
            _gemm4(buf, i * Kp, Kp, wf, COp, tile)
            for u in range(min(4, cnt - i)):
                base = (n * npx + p0 + i + u) * CO
                for co in range(CO):
                    of[base + co] = _act(tile[u, co] + bias[co], act)


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
    o5 = out.reshape(N, PH, PW, nb, 16)  # channel blocks of 16: clean vector stores
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
                o1 = o + W
                o2 = o1 + W
                o3 = o2 + W
                v00, v01, v02, v03 = xf[o] * sc + sf, xf[o + 1] * sc + sf, xf[o + 2] * sc + sf, xf[o + 3] * sc + sf
                v10, v11, v12, v13 = xf[o1] * sc + sf, xf[o1 + 1] * sc + sf, xf[o1 + 2] * sc + sf, xf[o1 + 3] * sc + sf
                v20, v21, v22, v23 = xf[o2] * sc + sf, xf[o2 + 1] * sc + sf, xf[o2 + 2] * sc + sf, xf[o2 + 3] * sc + sf
                v30, v31, v32, v33 = xf[o3] * sc + sf, xf[o3 + 1] * sc + sf, xf[o3 + 2] * sc + sf, xf[o3 + 3] * sc + sf
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
                    s0 = v00 * a + v01 * bb + v02 * c + v10 * d + v11 * e + v12 * f + v20 * g + v21 * h + v22 * k
                    s1 = v01 * a + v02 * bb + v03 * c + v11 * d + v12 * e + v13 * f + v21 * g + v22 * h + v23 * k
                    s2 = v10 * a + v11 * bb + v12 * c + v20 * d + v21 * e + v22 * f + v30 * g + v31 * h + v32 * k
                    s3 = v11 * a + v12 * bb + v13 * c + v21 * d + v22 * e + v23 * f + v31 * g + v32 * h + v33 * k
                    m = max(max(s0, s1), max(s2, s3)) + wb[b, 9, j]
                    o5[n, py, px, b, j] = m if m > lo else lo
                if act > 1:
                    for j in range(16):
                        o5[n, py, px, b, j] = _act(o5[n, py, px, b, j], act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv1_k5_pool2(x, wb, scale, shift, out, rowbuf, pt, pl, act, splits):
    """1 input channel, 5x5, stride 1 conv + bias + activation + 2x2/2 max pool (floor): the
    LeNet first layer. Like `conv1_k3_pool2`: the 6x6 input patch of a pool window in scalars,
    16 output channels per vector. wb: (ceil(CO/16), 26, 16): 25 taps then the bias, zero
    padded. rowbuf: (threads, ceil(CO/16), 16) scratch for channel counts not a multiple of 16.
    """
    N, H, W = x.shape[0], x.shape[1], x.shape[2]
    PH, PW, CO = out.shape[1], out.shape[2], out.shape[3]
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
        tid = numba.get_thread_id()
        y = 2 * py - pt
        for px in range(PW):
            xx = 2 * px - pl
            if y >= 0 and y + 6 <= H and xx >= 0 and xx + 6 <= W:  # interior: no bounds checks
                o = (n * H + y) * W + xx
                v00 = xf[o + 0 * W + 0] * sc + sf
                v01 = xf[o + 0 * W + 1] * sc + sf
                v02 = xf[o + 0 * W + 2] * sc + sf
                v03 = xf[o + 0 * W + 3] * sc + sf
                v04 = xf[o + 0 * W + 4] * sc + sf
                v05 = xf[o + 0 * W + 5] * sc + sf
                v10 = xf[o + 1 * W + 0] * sc + sf
                v11 = xf[o + 1 * W + 1] * sc + sf
                v12 = xf[o + 1 * W + 2] * sc + sf
                v13 = xf[o + 1 * W + 3] * sc + sf
                v14 = xf[o + 1 * W + 4] * sc + sf
                v15 = xf[o + 1 * W + 5] * sc + sf
                v20 = xf[o + 2 * W + 0] * sc + sf
                v21 = xf[o + 2 * W + 1] * sc + sf
                v22 = xf[o + 2 * W + 2] * sc + sf
                v23 = xf[o + 2 * W + 3] * sc + sf
                v24 = xf[o + 2 * W + 4] * sc + sf
                v25 = xf[o + 2 * W + 5] * sc + sf
                v30 = xf[o + 3 * W + 0] * sc + sf
                v31 = xf[o + 3 * W + 1] * sc + sf
                v32 = xf[o + 3 * W + 2] * sc + sf
                v33 = xf[o + 3 * W + 3] * sc + sf
                v34 = xf[o + 3 * W + 4] * sc + sf
                v35 = xf[o + 3 * W + 5] * sc + sf
                v40 = xf[o + 4 * W + 0] * sc + sf
                v41 = xf[o + 4 * W + 1] * sc + sf
                v42 = xf[o + 4 * W + 2] * sc + sf
                v43 = xf[o + 4 * W + 3] * sc + sf
                v44 = xf[o + 4 * W + 4] * sc + sf
                v45 = xf[o + 4 * W + 5] * sc + sf
                v50 = xf[o + 5 * W + 0] * sc + sf
                v51 = xf[o + 5 * W + 1] * sc + sf
                v52 = xf[o + 5 * W + 2] * sc + sf
                v53 = xf[o + 5 * W + 3] * sc + sf
                v54 = xf[o + 5 * W + 4] * sc + sf
                v55 = xf[o + 5 * W + 5] * sc + sf
            else:
                v00 = _px(xf, H, W, n, y + 0, xx + 0, sc, sf)
                v01 = _px(xf, H, W, n, y + 0, xx + 1, sc, sf)
                v02 = _px(xf, H, W, n, y + 0, xx + 2, sc, sf)
                v03 = _px(xf, H, W, n, y + 0, xx + 3, sc, sf)
                v04 = _px(xf, H, W, n, y + 0, xx + 4, sc, sf)
                v05 = _px(xf, H, W, n, y + 0, xx + 5, sc, sf)
                v10 = _px(xf, H, W, n, y + 1, xx + 0, sc, sf)
                v11 = _px(xf, H, W, n, y + 1, xx + 1, sc, sf)
                v12 = _px(xf, H, W, n, y + 1, xx + 2, sc, sf)
                v13 = _px(xf, H, W, n, y + 1, xx + 3, sc, sf)
                v14 = _px(xf, H, W, n, y + 1, xx + 4, sc, sf)
                v15 = _px(xf, H, W, n, y + 1, xx + 5, sc, sf)
                v20 = _px(xf, H, W, n, y + 2, xx + 0, sc, sf)
                v21 = _px(xf, H, W, n, y + 2, xx + 1, sc, sf)
                v22 = _px(xf, H, W, n, y + 2, xx + 2, sc, sf)
                v23 = _px(xf, H, W, n, y + 2, xx + 3, sc, sf)
                v24 = _px(xf, H, W, n, y + 2, xx + 4, sc, sf)
                v25 = _px(xf, H, W, n, y + 2, xx + 5, sc, sf)
                v30 = _px(xf, H, W, n, y + 3, xx + 0, sc, sf)
                v31 = _px(xf, H, W, n, y + 3, xx + 1, sc, sf)
                v32 = _px(xf, H, W, n, y + 3, xx + 2, sc, sf)
                v33 = _px(xf, H, W, n, y + 3, xx + 3, sc, sf)
                v34 = _px(xf, H, W, n, y + 3, xx + 4, sc, sf)
                v35 = _px(xf, H, W, n, y + 3, xx + 5, sc, sf)
                v40 = _px(xf, H, W, n, y + 4, xx + 0, sc, sf)
                v41 = _px(xf, H, W, n, y + 4, xx + 1, sc, sf)
                v42 = _px(xf, H, W, n, y + 4, xx + 2, sc, sf)
                v43 = _px(xf, H, W, n, y + 4, xx + 3, sc, sf)
                v44 = _px(xf, H, W, n, y + 4, xx + 4, sc, sf)
                v45 = _px(xf, H, W, n, y + 4, xx + 5, sc, sf)
                v50 = _px(xf, H, W, n, y + 5, xx + 0, sc, sf)
                v51 = _px(xf, H, W, n, y + 5, xx + 1, sc, sf)
                v52 = _px(xf, H, W, n, y + 5, xx + 2, sc, sf)
                v53 = _px(xf, H, W, n, y + 5, xx + 3, sc, sf)
                v54 = _px(xf, H, W, n, y + 5, xx + 4, sc, sf)
                v55 = _px(xf, H, W, n, y + 5, xx + 5, sc, sf)
            for b in range(b0, b1):
                # one pass per pixel of the pool window keeps 25 broadcasts + 1 accumulator in registers
                for j in range(16):
                    e = (v00 * wb[b, 0, j] + v01 * wb[b, 1, j] + v02 * wb[b, 2, j] + v03 * wb[b, 3, j] + v04 * wb[b, 4, j]
                         + v10 * wb[b, 5, j] + v11 * wb[b, 6, j] + v12 * wb[b, 7, j] + v13 * wb[b, 8, j] + v14 * wb[b, 9, j]
                         + v20 * wb[b, 10, j] + v21 * wb[b, 11, j] + v22 * wb[b, 12, j] + v23 * wb[b, 13, j] + v24 * wb[b, 14, j]
                         + v30 * wb[b, 15, j] + v31 * wb[b, 16, j] + v32 * wb[b, 17, j] + v33 * wb[b, 18, j] + v34 * wb[b, 19, j]
                         + v40 * wb[b, 20, j] + v41 * wb[b, 21, j] + v42 * wb[b, 22, j] + v43 * wb[b, 23, j] + v44 * wb[b, 24, j])
                    rowbuf[tid, b, j] = e
                for j in range(16):
                    e = (v01 * wb[b, 0, j] + v02 * wb[b, 1, j] + v03 * wb[b, 2, j] + v04 * wb[b, 3, j] + v05 * wb[b, 4, j]
                         + v11 * wb[b, 5, j] + v12 * wb[b, 6, j] + v13 * wb[b, 7, j] + v14 * wb[b, 8, j] + v15 * wb[b, 9, j]
                         + v21 * wb[b, 10, j] + v22 * wb[b, 11, j] + v23 * wb[b, 12, j] + v24 * wb[b, 13, j] + v25 * wb[b, 14, j]
                         + v31 * wb[b, 15, j] + v32 * wb[b, 16, j] + v33 * wb[b, 17, j] + v34 * wb[b, 18, j] + v35 * wb[b, 19, j]
                         + v41 * wb[b, 20, j] + v42 * wb[b, 21, j] + v43 * wb[b, 22, j] + v44 * wb[b, 23, j] + v45 * wb[b, 24, j])
                    rowbuf[tid, b, j] = max(rowbuf[tid, b, j], e)
                for j in range(16):
                    e = (v10 * wb[b, 0, j] + v11 * wb[b, 1, j] + v12 * wb[b, 2, j] + v13 * wb[b, 3, j] + v14 * wb[b, 4, j]
                         + v20 * wb[b, 5, j] + v21 * wb[b, 6, j] + v22 * wb[b, 7, j] + v23 * wb[b, 8, j] + v24 * wb[b, 9, j]
                         + v30 * wb[b, 10, j] + v31 * wb[b, 11, j] + v32 * wb[b, 12, j] + v33 * wb[b, 13, j] + v34 * wb[b, 14, j]
                         + v40 * wb[b, 15, j] + v41 * wb[b, 16, j] + v42 * wb[b, 17, j] + v43 * wb[b, 18, j] + v44 * wb[b, 19, j]
                         + v50 * wb[b, 20, j] + v51 * wb[b, 21, j] + v52 * wb[b, 22, j] + v53 * wb[b, 23, j] + v54 * wb[b, 24, j])
                    rowbuf[tid, b, j] = max(rowbuf[tid, b, j], e)
                for j in range(16):
                    e = (v11 * wb[b, 0, j] + v12 * wb[b, 1, j] + v13 * wb[b, 2, j] + v14 * wb[b, 3, j] + v15 * wb[b, 4, j]
                         + v21 * wb[b, 5, j] + v22 * wb[b, 6, j] + v23 * wb[b, 7, j] + v24 * wb[b, 8, j] + v25 * wb[b, 9, j]
                         + v31 * wb[b, 10, j] + v32 * wb[b, 11, j] + v33 * wb[b, 12, j] + v34 * wb[b, 13, j] + v35 * wb[b, 14, j]
                         + v41 * wb[b, 15, j] + v42 * wb[b, 16, j] + v43 * wb[b, 17, j] + v44 * wb[b, 18, j] + v45 * wb[b, 19, j]
                         + v51 * wb[b, 20, j] + v52 * wb[b, 21, j] + v53 * wb[b, 22, j] + v54 * wb[b, 23, j] + v55 * wb[b, 24, j])
                    m = max(rowbuf[tid, b, j], e) + wb[b, 25, j]
                    rowbuf[tid, b, j] = m if m > lo else lo
            for c in range(b0 * 16, min(CO, b1 * 16)):
                out[n, py, px, c] = _act(rowbuf[tid, c // 16, c % 16], act)


@njit(fastmath=True, cache=True, nogil=True)
def _pxc(xf, H, W, n, y, x, c, scale, shift):
    if y < 0 or y >= H or x < 0 or x >= W:
        return _Z
    return xf[((n * H + y) * W + x) * 3 + c] * scale[c] + shift[c]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv_c3k3(x, wb, scale, shift, out, rowbuf, sh, sw, pt, pl, act, splits):
    """3 input channels (RGB), 3x3 conv + bias + activation, any stride and padding: the usual
    first layer of colour models. The 27 input values of a pixel are held in scalars and 16
    output channels form one vector (no horizontal sums, unlike the dot micro-kernel, which
    wastes most of its time on them for such a short reduction). wb: (ceil(CO/16), 28, 16):
    27 taps in (ky, kx, ci) order then the bias. rowbuf: (threads, ceil(CO/16), 16) scratch.
    Applies `x * scale + shift` per channel to the input (pass 1 and 0 for none).
    """
    N, H, W = x.shape[0], x.shape[1], x.shape[2]
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    nb = wb.shape[0]
    per = (nb + splits - 1) // splits
    xf = x.reshape(x.size)
    full = CO % 16 == 0  # then results go straight to `out` in vectors of 16 channels
    o5 = out.reshape(N, OH, OW, CO // 16 if full else 1, 16 if full else CO)
    lo = _Z if act == 1 else np.float32(-np.inf)
    for t in prange(N * OH * splits):
        s = t % splits
        r = t // splits
        oy = r % OH
        n = r // OH
        b0 = s * per
        b1 = min(nb, b0 + per)
        tid = numba.get_thread_id()
        y = oy * sh - pt
        for ox in range(OW):
            xx = ox * sw - pl
            if y >= 0 and y + 3 <= H and xx >= 0 and xx + 3 <= W:  # interior: no bounds checks
                o = ((n * H + y) * W + xx) * 3
                v000 = xf[o + 0 * W * 3 + 0] * scale[0] + shift[0]
                v001 = xf[o + 0 * W * 3 + 1] * scale[1] + shift[1]
                v002 = xf[o + 0 * W * 3 + 2] * scale[2] + shift[2]
                v010 = xf[o + 0 * W * 3 + 3] * scale[0] + shift[0]
                v011 = xf[o + 0 * W * 3 + 4] * scale[1] + shift[1]
                v012 = xf[o + 0 * W * 3 + 5] * scale[2] + shift[2]
                v020 = xf[o + 0 * W * 3 + 6] * scale[0] + shift[0]
                v021 = xf[o + 0 * W * 3 + 7] * scale[1] + shift[1]
                v022 = xf[o + 0 * W * 3 + 8] * scale[2] + shift[2]
                v100 = xf[o + 1 * W * 3 + 0] * scale[0] + shift[0]
                v101 = xf[o + 1 * W * 3 + 1] * scale[1] + shift[1]
                v102 = xf[o + 1 * W * 3 + 2] * scale[2] + shift[2]
                v110 = xf[o + 1 * W * 3 + 3] * scale[0] + shift[0]
                v111 = xf[o + 1 * W * 3 + 4] * scale[1] + shift[1]
                v112 = xf[o + 1 * W * 3 + 5] * scale[2] + shift[2]
                v120 = xf[o + 1 * W * 3 + 6] * scale[0] + shift[0]
                v121 = xf[o + 1 * W * 3 + 7] * scale[1] + shift[1]
                v122 = xf[o + 1 * W * 3 + 8] * scale[2] + shift[2]
                v200 = xf[o + 2 * W * 3 + 0] * scale[0] + shift[0]
                v201 = xf[o + 2 * W * 3 + 1] * scale[1] + shift[1]
                v202 = xf[o + 2 * W * 3 + 2] * scale[2] + shift[2]
                v210 = xf[o + 2 * W * 3 + 3] * scale[0] + shift[0]
                v211 = xf[o + 2 * W * 3 + 4] * scale[1] + shift[1]
                v212 = xf[o + 2 * W * 3 + 5] * scale[2] + shift[2]
                v220 = xf[o + 2 * W * 3 + 6] * scale[0] + shift[0]
                v221 = xf[o + 2 * W * 3 + 7] * scale[1] + shift[1]
                v222 = xf[o + 2 * W * 3 + 8] * scale[2] + shift[2]
            else:
                v000 = _pxc(xf, H, W, n, y + 0, xx + 0, 0, scale, shift)
                v001 = _pxc(xf, H, W, n, y + 0, xx + 0, 1, scale, shift)
                v002 = _pxc(xf, H, W, n, y + 0, xx + 0, 2, scale, shift)
                v010 = _pxc(xf, H, W, n, y + 0, xx + 1, 0, scale, shift)
                v011 = _pxc(xf, H, W, n, y + 0, xx + 1, 1, scale, shift)
                v012 = _pxc(xf, H, W, n, y + 0, xx + 1, 2, scale, shift)
                v020 = _pxc(xf, H, W, n, y + 0, xx + 2, 0, scale, shift)
                v021 = _pxc(xf, H, W, n, y + 0, xx + 2, 1, scale, shift)
                v022 = _pxc(xf, H, W, n, y + 0, xx + 2, 2, scale, shift)
                v100 = _pxc(xf, H, W, n, y + 1, xx + 0, 0, scale, shift)
                v101 = _pxc(xf, H, W, n, y + 1, xx + 0, 1, scale, shift)
                v102 = _pxc(xf, H, W, n, y + 1, xx + 0, 2, scale, shift)
                v110 = _pxc(xf, H, W, n, y + 1, xx + 1, 0, scale, shift)
                v111 = _pxc(xf, H, W, n, y + 1, xx + 1, 1, scale, shift)
                v112 = _pxc(xf, H, W, n, y + 1, xx + 1, 2, scale, shift)
                v120 = _pxc(xf, H, W, n, y + 1, xx + 2, 0, scale, shift)
                v121 = _pxc(xf, H, W, n, y + 1, xx + 2, 1, scale, shift)
                v122 = _pxc(xf, H, W, n, y + 1, xx + 2, 2, scale, shift)
                v200 = _pxc(xf, H, W, n, y + 2, xx + 0, 0, scale, shift)
                v201 = _pxc(xf, H, W, n, y + 2, xx + 0, 1, scale, shift)
                v202 = _pxc(xf, H, W, n, y + 2, xx + 0, 2, scale, shift)
                v210 = _pxc(xf, H, W, n, y + 2, xx + 1, 0, scale, shift)
                v211 = _pxc(xf, H, W, n, y + 2, xx + 1, 1, scale, shift)
                v212 = _pxc(xf, H, W, n, y + 2, xx + 1, 2, scale, shift)
                v220 = _pxc(xf, H, W, n, y + 2, xx + 2, 0, scale, shift)
                v221 = _pxc(xf, H, W, n, y + 2, xx + 2, 1, scale, shift)
                v222 = _pxc(xf, H, W, n, y + 2, xx + 2, 2, scale, shift)
            for b in range(b0, b1):
                # one pass per kernel row keeps 9 broadcasts + 1 accumulator in registers
                for j in range(16):
                    e = (v000 * wb[b, 0, j] + v001 * wb[b, 1, j] + v002 * wb[b, 2, j] + v010 * wb[b, 3, j] + v011 * wb[b, 4, j]
                         + v012 * wb[b, 5, j] + v020 * wb[b, 6, j] + v021 * wb[b, 7, j] + v022 * wb[b, 8, j])
                    rowbuf[tid, b, j] = e + wb[b, 27, j]
                for j in range(16):
                    e = (v100 * wb[b, 9, j] + v101 * wb[b, 10, j] + v102 * wb[b, 11, j] + v110 * wb[b, 12, j] + v111 * wb[b, 13, j]
                         + v112 * wb[b, 14, j] + v120 * wb[b, 15, j] + v121 * wb[b, 16, j] + v122 * wb[b, 17, j])
                    rowbuf[tid, b, j] += e
                for j in range(16):
                    e = (v200 * wb[b, 18, j] + v201 * wb[b, 19, j] + v202 * wb[b, 20, j] + v210 * wb[b, 21, j] + v211 * wb[b, 22, j]
                         + v212 * wb[b, 23, j] + v220 * wb[b, 24, j] + v221 * wb[b, 25, j] + v222 * wb[b, 26, j])
                    m = rowbuf[tid, b, j] + e
                    if full:
                        o5[n, oy, ox, b, j] = m if m > lo else lo
                    else:
                        rowbuf[tid, b, j] = m
            if full:
                if act > 1:
                    for b in range(b0, b1):
                        for j in range(16):
                            o5[n, oy, ox, b, j] = _act(o5[n, oy, ox, b, j], act)
            else:
                for c in range(b0 * 16, min(CO, b1 * 16)):
                    out[n, oy, ox, c] = _act(rowbuf[tid, c // 16, c % 16], act)
