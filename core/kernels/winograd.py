"""Winograd F(2x2, 3x3) convolution (NHWC, float32) for 3x3 stride-1 layers: per 2x2 block of
outputs, 16 products per channel pair instead of 36. The input and output transforms are
vector intrinsics (16 channels at a time) with scalar tails; the 16 products are GEMMs on the
micro-kernels (`gemm._conv_row`). A fused 2x2/2 max or average pool is exactly one tile.
"""

from __future__ import annotations

import numba
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _QUARTER, _act
from convserve.core.kernels.gemm import _conv_row
from convserve.core.kernels.ir import _V16, _array_data, _vload, _vstore
from convserve.core.kernels.tasks import row_task
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def _wino_in16(typingctx, xf, p0, ci, row, vf, v, step):
    """16 channels of one tile's Winograd input transform: d[i][j] is the vector at
    xf[p0 + i*row + j*ci]; stores (B^T d B)[4i + j] at vf[v + (4i + j)*step]."""

    def codegen(context, builder, signature, args):
        xp = _array_data(context, builder, signature, args, 0)
        vp = _array_data(context, builder, signature, args, 4)
        _, p0_, ci_, row_, _, v_, step_ = args
        d = [
            [
                _vload(
                    builder,
                    xp,
                    builder.add(
                        p0_,
                        builder.add(
                            builder.mul(ir.Constant(row_.type, i), row_),
                            builder.mul(ir.Constant(ci_.type, j), ci_),
                        ),
                    ),
                )
                for j in range(4)
            ]
            for i in range(4)
        ]
        t = [
            [builder.fsub(d[0][j], d[2][j]) for j in range(4)],
            [builder.fadd(d[1][j], d[2][j]) for j in range(4)],
            [builder.fsub(d[2][j], d[1][j]) for j in range(4)],
            [builder.fsub(d[1][j], d[3][j]) for j in range(4)],
        ]
        for i in range(4):
            out = (
                builder.fsub(t[i][0], t[i][2]),
                builder.fadd(t[i][1], t[i][2]),
                builder.fsub(t[i][2], t[i][1]),
                builder.fsub(t[i][1], t[i][3]),
            )
            for j in range(4):
                off = builder.add(v_, builder.mul(ir.Constant(step_.type, 4 * i + j), step_))
                _vstore(builder, out[j], vp, off)
        return context.get_dummy_value()

    return types.void(xf, p0, ci, row, vf, v, step), codegen


def _wino_out_kernel(pool: bool, relu: bool):
    """An intrinsic for 16 channels of one tile's Winograd output transform plus bias and (with
    `relu`) ReLU: M[4i + j] is the vector at mf[m + (4i + j)*step], Y = A^T M A (2x2).

        mk(mf, m, step, bias, co, of, o, ldx, ldy)
        pool: of[o] = max(Y) + bias[co]      else: of[o + y*ldy + x*ldx] = Y[y][x] + bias[co]"""

    def codegen(context, builder, signature, args):
        mp = _array_data(context, builder, signature, args, 0)
        bp = _array_data(context, builder, signature, args, 3)
        op = _array_data(context, builder, signature, args, 5)
        _, m_, step_, _, co_, _, o_, ldx_, ldy_ = args
        mv = [
            _vload(builder, mp, builder.add(m_, builder.mul(ir.Constant(step_.type, k), step_)))
            for k in range(16)
        ]
        s0 = [builder.fadd(builder.fadd(mv[j], mv[4 + j]), mv[8 + j]) for j in range(4)]
        s1 = [builder.fsub(builder.fsub(mv[4 + j], mv[8 + j]), mv[12 + j]) for j in range(4)]
        y = [
            [
                builder.fadd(builder.fadd(s[0], s[1]), s[2]),
                builder.fsub(builder.fsub(s[1], s[2]), s[3]),
            ]
            for s in (s0, s1)
        ]
        b = _vload(builder, bp, co_)
        zero = ir.Constant(_V16, [0.0] * 16)

        def vmax(a, c):
            return builder.select(builder.fcmp_ordered(">", a, c), a, c)

        def finish(value):
            value = builder.fadd(value, b)
            return vmax(value, zero) if relu else value

        if pool:
            _vstore(builder, finish(vmax(vmax(y[0][0], y[0][1]), vmax(y[1][0], y[1][1]))), op, o_)
        else:
            for i in range(2):
                for j in range(2):
                    off = builder.add(
                        o_,
                        builder.add(
                            builder.mul(ir.Constant(ldy_.type, i), ldy_),
                            builder.mul(ir.Constant(ldx_.type, j), ldx_),
                        ),
                    )
                    _vstore(builder, finish(y[i][j]), op, off)
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, mf, m, step, bias, co, of, o, ldx, ldy):
        return types.void(mf, m, step, bias, co, of, o, ldx, ldy), codegen

    return mk


_wino_out_pool = _wino_out_kernel(True, False)
_wino_out_pool_relu = _wino_out_kernel(True, True)
_wino_out_full = _wino_out_kernel(False, False)
_wino_out_full_relu = _wino_out_kernel(False, True)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _wino_input(xf, base, row, CI, TW, vf):
    """Winograd F(2x2, 3x3) input transform of one row of tiles: for tile tx (the 4x4 input
    pixels from column 2*tx of the four input rows starting at xf[base], `row` floats apart)
    and channel c, vf[(p*TW + tx)*CI + c] = (B^T d B)[p], p = 4*i + j: 16 channels at a time,
    then one by one."""
    step = TW * CI
    vec_end = CI // 16 * 16
    for tx in range(TW):
        o = base + 2 * tx * CI
        q = tx * CI
        for c in range(0, vec_end, 16):
            _wino_in16(xf, o + c, CI, row, vf, q + c, step)
        for c in range(vec_end, CI):
            p0 = o + c
            p1 = p0 + row
            p2 = p1 + row
            p3 = p2 + row
            # B^T d: combine the rows
            t00 = xf[p0] - xf[p2]
            t01 = xf[p0 + CI] - xf[p2 + CI]
            t02 = xf[p0 + 2 * CI] - xf[p2 + 2 * CI]
            t03 = xf[p0 + 3 * CI] - xf[p2 + 3 * CI]
            t10 = xf[p1] + xf[p2]
            t11 = xf[p1 + CI] + xf[p2 + CI]
            t12 = xf[p1 + 2 * CI] + xf[p2 + 2 * CI]
            t13 = xf[p1 + 3 * CI] + xf[p2 + 3 * CI]
            t20 = xf[p2] - xf[p1]
            t21 = xf[p2 + CI] - xf[p1 + CI]
            t22 = xf[p2 + 2 * CI] - xf[p1 + 2 * CI]
            t23 = xf[p2 + 3 * CI] - xf[p1 + 3 * CI]
            t30 = xf[p1] - xf[p3]
            t31 = xf[p1 + CI] - xf[p3 + CI]
            t32 = xf[p1 + 2 * CI] - xf[p3 + 2 * CI]
            t33 = xf[p1 + 3 * CI] - xf[p3 + 3 * CI]
            # (B^T d) B: combine the columns
            v = q + c
            vf[v] = t00 - t02
            vf[v + step] = t01 + t02
            vf[v + 2 * step] = t02 - t01
            vf[v + 3 * step] = t01 - t03
            vf[v + 4 * step] = t10 - t12
            vf[v + 5 * step] = t11 + t12
            vf[v + 6 * step] = t12 - t11
            vf[v + 7 * step] = t11 - t13
            vf[v + 8 * step] = t20 - t22
            vf[v + 9 * step] = t21 + t22
            vf[v + 10 * step] = t22 - t21
            vf[v + 11 * step] = t21 - t23
            vf[v + 12 * step] = t30 - t32
            vf[v + 13 * step] = t31 + t32
            vf[v + 14 * step] = t32 - t31
            vf[v + 15 * step] = t31 - t33


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _wino_output(
    mf, TW, COp, c0, c1, bias, act, of, o_row, row, CO, pool, average, rows, cols, edge
):
    """Winograd output transform of one row of tiles, plus bias and activation: tile tx's 2x2
    outputs Y = A^T M A, M[p] = mf[(p*TW + tx)*COp + co]. With `pool`, writes max(Y) (one pooled
    pixel per tile; with `average` the mean of the four activated values) at
    of[o_row + tx*CO + co]; else Y's `rows` rows (1 or 2) and the columns below `cols` at
    of[o_row + y*row + (2*tx + x)*CO + co]. An edge tile, partly outside the output, goes
    through `edge` (64 floats): whole vectors there too, then its valid outputs are copied."""
    step = TW * COp
    hi = min(c1, CO)
    for tx in range(TW):
        q = tx * COp
        o = o_row + (tx if pool else 2 * tx) * CO
        two = 2 * tx + 1 < cols
        start = c0
        full = two and rows == 2
        # whole vectors of 16 channels (an average pool takes the loop below, which vectorizes)
        if not pool and not full:
            while start + 16 <= hi:
                m = q + start
                if act == 1:
                    _wino_out_full_relu(mf, m, step, bias, start, edge, 0, 16, 32)
                else:
                    _wino_out_full(mf, m, step, bias, start, edge, 0, 16, 32)
                for y in range(rows):
                    for x in range(2 if two else 1):
                        for j in range(16):
                            of[o + y * row + x * CO + start + j] = _act(
                                edge[32 * y + 16 * x + j], act
                            )
                start += 16
        elif (pool and not average) or full:
            while start + 16 <= hi:
                m = q + start
                if pool and act == 1:
                    _wino_out_pool_relu(mf, m, step, bias, start, of, o + start, CO, row)
                elif pool:
                    _wino_out_pool(mf, m, step, bias, start, of, o + start, CO, row)
                elif act == 1:
                    _wino_out_full_relu(mf, m, step, bias, start, of, o + start, CO, row)
                else:
                    _wino_out_full(mf, m, step, bias, start, of, o + start, CO, row)
                if act > 1:
                    for j in range(start, start + 16):
                        of[o + j] = _act(of[o + j], act)
                        if not pool:
                            of[o + CO + j] = _act(of[o + CO + j], act)
                            of[o + row + j] = _act(of[o + row + j], act)
                            of[o + row + CO + j] = _act(of[o + row + CO + j], act)
                start += 16
        for co in range(start, hi):
            m = q + co
            s00 = mf[m] + mf[m + 4 * step] + mf[m + 8 * step]
            s01 = mf[m + step] + mf[m + 5 * step] + mf[m + 9 * step]
            s02 = mf[m + 2 * step] + mf[m + 6 * step] + mf[m + 10 * step]
            s03 = mf[m + 3 * step] + mf[m + 7 * step] + mf[m + 11 * step]
            s10 = mf[m + 4 * step] - mf[m + 8 * step] - mf[m + 12 * step]
            s11 = mf[m + 5 * step] - mf[m + 9 * step] - mf[m + 13 * step]
            s12 = mf[m + 6 * step] - mf[m + 10 * step] - mf[m + 14 * step]
            s13 = mf[m + 7 * step] - mf[m + 11 * step] - mf[m + 15 * step]
            y00 = s00 + s01 + s02
            y01 = s01 - s02 - s03
            y10 = s10 + s11 + s12
            y11 = s11 - s12 - s13
            b = bias[co]
            if pool and average:
                s = _act(y00 + b, act) + _act(y01 + b, act)
                s += _act(y10 + b, act) + _act(y11 + b, act)
                of[o + co] = s * _QUARTER
            elif pool:
                of[o + co] = _act(max(max(y00, y01), max(y10, y11)) + b, act)
            else:
                of[o + co] = _act(y00 + b, act)
                if two:
                    of[o + CO + co] = _act(y01 + b, act)
                if rows == 2:
                    of[o + row + co] = _act(y10 + b, act)
                    if two:
                        of[o + row + CO + co] = _act(y11 + b, act)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_wino(x, u, bias, tiles, out, act, pool, average, splits):
    """3x3 stride-1 conv + bias + activation (+ 2x2/2 max pool when `pool`, average pool when
    also `average`) by Winograd's
    F(2x2, 3x3): per 2x2 block of outputs, 16 products per channel pair instead of 36.

    x: padded, preprocessed input (N, Hp, Wp, CI) holding every 4x4 tile; u: (16, CI, COp) the
    transformed kernel G g G^T, COp a multiple of 16. out: (N, OH, OW, CO), pooled or not; a
    pooled pixel is exactly one tile. Tasks: (image, row of tiles, range of output channels),
    `splits` ranges per row; each runs the input transform of its row of tiles, 16 GEMMs
    (tiles x CI) @ (CI x channels) with the conv micro-kernels, and the output transform.
    tiles: (threads, >= 16 * TW * (CI + COp) + 64) floats: the transformed tiles, the products
    and an edge tile.
    The transforms are additions only, and results do not depend on the batch size."""
    N, Hp, Wp, CI = x.shape
    COp = u.shape[2]
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    TH = OH if pool else (OH + 1) // 2
    TW = OW if pool else (OW + 1) // 2
    per = ((COp // 16 + splits - 1) // splits) * 16
    xf = x.reshape(x.size)
    uf = u.reshape(u.size)
    of = out.reshape(out.size)
    vsize = 16 * TW * CI
    msize = 16 * TW * COp
    usize = CI * COp
    row_out = OW * CO
    for t in prange(N * TH * splits):
        n, ty, c0, c1 = row_task(t, splits, TH, per, COp)
        if c0 < c1:
            buf = tiles[numba.get_thread_id()]
            vf = buf[:vsize]
            mf = buf[vsize : vsize + msize]
            edge = buf[vsize + msize : vsize + msize + 64]
            _wino_input(xf, (n * Hp + 2 * ty) * Wp * CI, Wp * CI, CI, TW, vf)
            for p in range(16):
                _conv_row(
                    vf,
                    p * TW * CI,
                    CI,
                    0,
                    1,
                    CI,
                    uf,
                    p * usize + c0,
                    COp,
                    mf,
                    p * TW * COp + c0,
                    COp,
                    TW,
                    c1 - c0,
                )
            # constant flags: under fastmath the code LLVM makes of the inlined transform, and so
            # its last-bit rounding, depends on them (results stay bit-identical this way)
            if pool and average:
                o_row = (n * OH + ty) * row_out
                _wino_output(
                    mf, TW, COp, c0, c1, bias, act, of, o_row, row_out, CO, True, True, 1, OW, edge
                )
            elif pool:
                o_row = (n * OH + ty) * row_out
                _wino_output(
                    mf, TW, COp, c0, c1, bias, act, of, o_row, row_out, CO, True, False, 1, OW, edge
                )
            else:
                o_row = (n * OH + 2 * ty) * row_out
                rows = min(2, OH - 2 * ty)  # one at an odd bottom edge
                _wino_output(
                    mf,
                    TW,
                    COp,
                    c0,
                    c1,
                    bias,
                    act,
                    of,
                    o_row,
                    row_out,
                    CO,
                    False,
                    False,
                    rows,
                    OW,
                    edge,
                )
