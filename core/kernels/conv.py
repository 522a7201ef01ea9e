"""Convolution kernels (NHWC, float32), optionally fused with 2x2/2 max pooling.

Weights are packed once by the plan:
- GEMM form `wk[K, COp]`: row k is tap k in (ky, kx, ci) order for every filter, K = kh*kw*ci,
  `COp` = filters rounded up to 16 (zero columns);
- for the 1-input-channel 3x3 first layer, channel blocks `wb` (see `conv1_k3_pool2`).

`conv` and `conv_pool2` read a 'valid' input: the plan first copies a padded layer's input into a
zero-bordered buffer (`pad_input`, which also applies the model's preprocessing `x * scale +
shift` for a first layer). Then there is no patch copy at all ("implicit GEMM"): in NHWC the
(kx, ci) part of a pixel's receptive field is contiguous, so the micro-kernel walks kernel rows
as segments straight in the input. The micro-kernels (`_mk8x2`, `_mk4x4`, ...) are numba
intrinsics that emit LLVM vector IR: 4 or 8 output pixels x 16-64 output channels, held as up to
16 accumulators of 16 floats in registers; each step broadcasts one input value per pixel and
multiplies it with 1-4 weight vectors. Plain Numba cannot express this: its scalar-accumulator
kernels either spill the accumulators or need a horizontal sum per output (measured 1.4-1.5x
slower on conv2 of the reference model, plus the patch copy).

Fused pooling computes the two conv rows of a pooled row and keeps the max of each 2x2 window;
max pooling commutes with the per-channel bias and with every monotonic activation, so bias and
activation run once per pooled value. Each output is one in-order fused multiply-add chain over
its taps whatever the batch size, so results are batch-invariant.

Activation codes: 0 linear, 1 relu, 2 tanh, 3 sigmoid (softmax is applied by a separate kernel).
Keep helpers in this file: numba's cache only tracks the kernel's own source file.
"""

from __future__ import annotations

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_Z = np.float32(0.0)
DENSE_ROWS = 8  # batch rows per dense task: one 8-row or two 4-row micro-kernel calls
_ONE = np.float32(1.0)


def _close_loop(builder, counter, limit, phis, values, latch, header, exit_block) -> None:
    """The back edge of a counted loop in LLVM IR: counter + 1 and `values` flow from block
    `latch` into `header`'s phis (`phis`, matching `values` row by row); leave for `exit_block`
    once the counter reaches `limit`."""
    following = builder.add(counter, ir.Constant(counter.type, 1))
    counter.add_incoming(following, latch)
    for phi_row, value_row in zip(phis, values):
        for phi, value in zip(phi_row, value_row):
            phi.add_incoming(value, latch)
    builder.cbranch(builder.icmp_signed("<", following, limit), header, exit_block)


def _microkernel(rows: int, vectors: int, b_steps: bool = False):
    """An intrinsic computing a block of `rows` output pixels x `vectors`*16 output channels of a
    convolution straight from the (padded) NHWC input, with no patch copy ("implicit GEMM"):

        mk(a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc)
        C[r, j] = sum over s < segs, k < seg_len of
                  a[a_off + s*a_step + r*lda + k] * b[b_off + (s*seg_len + k)*ldb + j]
        stored at c[c_off + r*ldc + j], j < 16*vectors

    For a conv, segment s is kernel row ky (a_step = one input row), k runs over (kx, ci), which
    are contiguous in NHWC, and lda = stride * channels steps to the next output pixel. With
    `b_steps`, mk takes `b_step` after `b_off` and B's offset is b_off + s*b_step + k*ldb: the
    transposed form of `conv1_pixels_pool2`, where B is the input image and A the weights. Every
    output is one in-order chain of fused multiply-adds whatever the batch size or the block it
    falls in. All arrays are flat float32; segs, seg_len >= 1; no bounds checks."""

    def codegen(context, builder, signature, args):
        if b_steps:
            (
                a_arr,
                a_off,
                lda,
                a_step,
                segs,
                seg_len,
                b_arr,
                b_off,
                b_step,
                ldb,
                c_arr,
                c_off,
                ldc,
            ) = args
        else:
            a_arr, a_off, lda, a_step, segs, seg_len, b_arr, b_off, ldb, c_arr, c_off, ldc = args
            b_step = builder.mul(seg_len, ldb)
        ap = context.make_array(signature.args[0])(context, builder, a_arr).data
        bp = context.make_array(signature.args[6])(context, builder, b_arr).data
        cp = context.make_array(signature.args[-3])(context, builder, c_arr).data
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), 16)
        vptr = vec.as_pointer()
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32"
        )
        zero = ir.Constant(vec, [0.0] * 16)
        undef = ir.Constant(vec, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
        fn = builder.function
        entry = builder.block
        outer = fn.append_basic_block("mk_segment")
        inner = fn.append_basic_block("mk_step")
        seg_end = fn.append_basic_block("mk_segment_end")
        done = fn.append_basic_block("mk_done")
        builder.branch(outer)

        builder.position_at_end(outer)
        s = builder.phi(i64)
        s.add_incoming(ir.Constant(i64, 0), entry)
        acc_seg = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
        for row in acc_seg:
            for phi in row:
                phi.add_incoming(zero, entry)
        a_seg = builder.add(a_off, builder.mul(s, a_step))
        b_seg = builder.add(b_off, builder.mul(s, b_step))
        builder.branch(inner)

        builder.position_at_end(inner)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), outer)
        acc = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
        for r in range(rows):
            for v in range(vectors):
                acc[r][v].add_incoming(acc_seg[r][v], outer)
        b_row = builder.add(b_seg, builder.mul(k, ldb))
        bv = [
            builder.load(
                builder.bitcast(
                    builder.gep(bp, [builder.add(b_row, ir.Constant(i64, 16 * v))]), vptr
                ),
                align=4,
            )
            for v in range(vectors)
        ]
        a_k = builder.add(a_seg, k)
        new = []
        for r in range(rows):
            scalar = builder.load(
                builder.gep(ap, [builder.add(a_k, builder.mul(ir.Constant(i64, r), lda))]), align=4
            )
            splat = builder.shuffle_vector(
                builder.insert_element(undef, scalar, ir.Constant(i32, 0)), undef, splat_mask
            )
            new.append([builder.call(fma, [splat, bv[v], acc[r][v]]) for v in range(vectors)])
        _close_loop(builder, k, seg_len, acc, new, inner, inner, seg_end)

        builder.position_at_end(seg_end)
        _close_loop(builder, s, segs, acc_seg, new, seg_end, outer, done)

        builder.position_at_end(done)
        for r in range(rows):
            c_row = builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc))
            for v in range(vectors):
                dst = builder.gep(cp, [builder.add(c_row, ir.Constant(i64, 16 * v))])
                builder.store(new[r][v], builder.bitcast(dst, vptr), align=4)
        return context.get_dummy_value()

    if b_steps:

        @intrinsic
        def mk(
            typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, b_step, ldb, c, c_off, ldc
        ):
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, b_step, ldb, c, c_off, ldc
            ), codegen
    else:

        @intrinsic
        def mk(typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc):
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc
            ), codegen

    return mk


_mk1x1 = _microkernel(1, 1)
_mk1x2 = _microkernel(1, 2)
_mk1x4 = _microkernel(1, 4)
_mk4x4 = _microkernel(4, 4)
_mk5x4 = _microkernel(5, 4)
_mk6x4 = _microkernel(6, 4)
_mk5x2 = _microkernel(5, 2)
_mk6x2 = _microkernel(6, 2)
_mk7x2 = _microkernel(7, 2)
_mk8x2 = _microkernel(8, 2)
_mk5x1 = _microkernel(5, 1)
_mk6x1 = _microkernel(6, 1)
_mk7x1 = _microkernel(7, 1)
_mk8x1 = _microkernel(8, 1)
_mkt8x2 = _microkernel(8, 2, b_steps=True)
_mkt6x2 = _microkernel(6, 2, b_steps=True)


_V16 = ir.VectorType(ir.FloatType(), 16)


def _array_data(context, builder, signature, args, index):
    """Pointer to the data of the intrinsic's array argument `index`."""
    return context.make_array(signature.args[index])(context, builder, args[index]).data


def _vload(builder, ptr, offset):
    """The 16 floats at ptr[offset] (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), _V16.as_pointer()), align=4)


def _vstore(builder, value, ptr, offset):
    builder.store(value, builder.bitcast(builder.gep(ptr, [offset]), _V16.as_pointer()), align=4)


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
def _block_rows(count, lo, hi):
    """Pixels per micro-kernel call for a row of `count` pixels, between lo and hi: the fewest
    wasted pixels (the last block is shifted back to end at the row's end, recomputing some),
    then the largest block."""
    best = hi
    waste = (count + hi - 1) // hi * hi - count
    for r in range(hi - 1, lo - 1, -1):
        w = (count + r - 1) // r * r - count
        if w < waste:
            best = r
            waste = w
    return best


@njit(fastmath=True, cache=True, nogil=True)
def _mk_call(R, nv, xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc):
    """One micro-kernel call: R pixels x nv*16 channels; B from wf[c], rows ldb apart; C rows ldc apart."""
    if nv == 4:
        if R == 4:
            _mk4x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 5:
            _mk5x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 6:
            _mk6x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        else:
            _mk1x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
    elif nv == 2:
        if R == 5:
            _mk5x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 6:
            _mk6x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 7:
            _mk7x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 8:
            _mk8x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        else:
            _mk1x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
    else:
        if R == 5:
            _mk5x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 6:
            _mk6x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 7:
            _mk7x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        elif R == 8:
            _mk8x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)
        else:
            _mk1x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc)


@njit(fastmath=True, cache=True, nogil=True)
def _conv_row(xf, a_off, lda, a_step, kh, seg, wf, b_off, ldb, tile, t_off, ldc, count, width):
    """tile[t_off + i*ldc + j] = output i < count (its A rows from xf[a_off + i*lda]) for the
    columns j < width (a multiple of 16) of B, which start at wf[b_off], rows ldb apart. For a
    conv row, output i is a pixel and the columns are output channels. Columns go in blocks of
    64 (4-6 outputs per call), then 32 and 16 (5-8 per call); rows shorter than a block go one
    by one."""
    c = 0
    while c < width:
        nv = 4 if width - c >= 64 else (2 if width - c >= 32 else 1)
        lo, hi = (4, 6) if nv == 4 else (5, 8)
        if count < lo:
            for i in range(count):
                _mk_call(
                    1,
                    nv,
                    xf,
                    a_off + i * lda,
                    lda,
                    a_step,
                    kh,
                    seg,
                    wf,
                    b_off + c,
                    ldb,
                    tile,
                    t_off + i * ldc + c,
                    ldc,
                )
        else:
            R = _block_rows(count, lo, hi)
            i = 0
            while i < count:
                i = min(i, count - R)
                _mk_call(
                    R,
                    nv,
                    xf,
                    a_off + i * lda,
                    lda,
                    a_step,
                    kh,
                    seg,
                    wf,
                    b_off + c,
                    ldb,
                    tile,
                    t_off + i * ldc + c,
                    ldc,
                )
                i += R
        c += 16 * nv


@njit(fastmath=True, cache=True, nogil=True)
def _store_pooled(tile, i0, i1, COp, bias, of, o, CO, act):
    """of[o + co] = act(max of a 2x2 window + bias[co]) for co < CO, the window's conv outputs at
    tile rows i0, i0 + COp (upper conv row) and i1, i1 + COp (lower). Unsigned flat indices:
    numba's negative-index check on a signed computed index keeps loops like this one scalar."""
    a = np.uint64(i0)
    b = np.uint64(i0 + COp)
    c = np.uint64(i1)
    d = np.uint64(i1 + COp)
    oo = np.uint64(o)
    if act == 1:
        for co in range(CO):
            u = np.uint64(co)
            m = max(max(tile[a + u], tile[b + u]), max(tile[c + u], tile[d + u])) + bias[co]
            of[oo + u] = m if m > _Z else _Z
    else:
        for co in range(CO):
            u = np.uint64(co)
            of[oo + u] = _act(
                max(max(tile[a + u], tile[b + u]), max(tile[c + u], tile[d + u])) + bias[co], act
            )


@njit(fastmath=True, cache=True, nogil=True)
def _store_row(tile, t, bias, of, o, lo, hi, act):
    """of[o + j] = act(tile[t + j] + bias[j]) for lo <= j < hi (unsigned indices, as above)."""
    tt = np.uint64(t)
    oo = np.uint64(o)
    if act == 1:
        for j in range(lo, hi):
            u = np.uint64(j)
            v = tile[tt + u] + bias[j]
            of[oo + u] = v if v > _Z else _Z
    else:
        for j in range(lo, hi):
            u = np.uint64(j)
            of[oo + u] = _act(tile[tt + u] + bias[j], act)


@njit(fastmath=True, cache=True, nogil=True)
def _pad_rows(x, scale, shift, pre, out, pt, pl, t0, t1):
    """Rows t0..t1-1 of (image, input row) of `pad_input`."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    Hp, Wp = out.shape[1], out.shape[2]
    x0 = max(0, -pl)
    x1 = min(W, Wp - pl)
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for t in range(t0, t1):
        n = t // H
        y = t % H
        oy = y + pt
        if oy < 0 or oy >= Hp:
            continue
        # views indexed from 0: numba's negative-index check on a computed flat index would
        # stop the loop from vectorizing
        src = xf[((n * H + y) * W + x0) * C : ((n * H + y) * W + x1) * C]
        dst = of[((n * Hp + oy) * Wp + x0 + pl) * C : ((n * Hp + oy) * Wp + x1 + pl) * C]
        if pre == 0:
            for j in range(src.size):
                dst[j] = src[j]
        else:
            for j in range(src.size):
                dst[j] = src[j] * scale[j] + shift[j]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def pad_input(x, scale, shift, pre, out, pt, pl):
    """out[:, pt:pt+H, pl:pl+W, :] = x (times scale plus shift per channel when pre), clipped to
    out; the border of out is left as it is (zeros from its allocation). scale and shift hold
    the per-channel values repeated along a row (W*C values), so each row is one contiguous run."""
    rows = x.shape[0] * x.shape[1]
    per = max(1, x.shape[1] // 2)  # half an image per task
    for g in prange((rows + per - 1) // per):
        _pad_rows(x, scale, shift, pre, out, pt, pl, g * per, min(rows, g * per + per))


@njit(fastmath=True, cache=True, nogil=True)
def pad_input_serial(x, scale, shift, pre, out, pt, pl):
    """`pad_input` on the calling thread, for inputs too small to pay for a parallel region."""
    _pad_rows(x, scale, shift, pre, out, pt, pl, 0, x.shape[0] * x.shape[1])


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv_pool2(x, wk, bias, tiles, out, kh, kw, sh, sw, act, splits):
    """Valid conv + bias + activation + 2x2/2 max pool (floor) on an already padded and
    preprocessed input. wk: (kh*kw*CI, COp) flat-packed, COp a multiple of 16. out: (N, PH, PW, CO).

    Tasks: (image, pooled row, range of pooled columns), `splits` ranges per row.
    tiles: (threads, >= 4 * PW * COp) floats: the task's two conv rows.
    """
    N, H, W, CI = x.shape
    COp = wk.shape[1]
    PH, PW, CO = out.shape[1], out.shape[2], out.shape[3]
    per = (PW + splits - 1) // splits
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    seg = kw * CI
    for t in prange(N * PH * splits):
        s = t % splits
        r = t // splits
        py = r % PH
        n = r // PH
        px0 = min(PW, s * per)
        nw = min(PW, px0 + per) - px0
        tile = tiles[numba.get_thread_id()]
        L = 2 * nw
        for dy in range(2):
            a_off = ((n * H + (2 * py + dy) * sh) * W + 2 * px0 * sw) * CI
            _conv_row(
                xf, a_off, sw * CI, W * CI, kh, seg, wf, 0, COp, tile, dy * L * COp, COp, L, COp
            )
        for w in range(nw):
            _store_pooled(
                tile,
                2 * w * COp,
                (L + 2 * w) * COp,
                COp,
                bias,
                of,
                ((n * PH + py) * PW + px0 + w) * CO,
                CO,
                act,
            )


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv(x, wk, bias, tiles, out, kh, kw, sh, sw, act, splits):
    """Valid conv + bias + activation on an already padded and preprocessed input.
    out: (N, OH, OW, CO). Tasks: (image, output row, range of columns), `splits` per row.
    tiles: (threads, >= OW * COp) floats.
    """
    N, H, W, CI = x.shape
    COp = wk.shape[1]
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    per = (OW + splits - 1) // splits
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    of = out.reshape(out.size)
    seg = kw * CI
    for t in prange(N * OH * splits):
        s = t % splits
        r = t // splits
        oy = r % OH
        n = r // OH
        ox0 = min(OW, s * per)
        cnt = min(OW, ox0 + per) - ox0
        tile = tiles[numba.get_thread_id()]
        _conv_row(
            xf,
            ((n * H + oy * sh) * W + ox0 * sw) * CI,
            sw * CI,
            W * CI,
            kh,
            seg,
            wf,
            0,
            COp,
            tile,
            0,
            COp,
            cnt,
            COp,
        )
        for i in range(cnt):
            _store_row(tile, i * COp, bias, of, ((n * OH + oy) * OW + ox0 + i) * CO, 0, CO, act)


@njit(fastmath=True, cache=True, nogil=True)
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


@njit(fastmath=True, cache=True, nogil=True)
def _wino_output(mf, TW, COp, c0, c1, bias, act, of, o_row, row, CO, pool, rows, cols):
    """Winograd output transform of one row of tiles, plus bias and activation: tile tx's 2x2
    outputs Y = A^T M A, M[p] = mf[(p*TW + tx)*COp + co]. With `pool`, writes max(Y) (one pooled
    pixel per tile) at of[o_row + tx*CO + co]; else Y's `rows` rows (1 or 2) and the columns
    below `cols` at of[o_row + y*row + (2*tx + x)*CO + co]."""
    step = TW * COp
    hi = min(c1, CO)
    for tx in range(TW):
        q = tx * COp
        o = o_row + (tx if pool else 2 * tx) * CO
        two = 2 * tx + 1 < cols
        start = c0
        if pool or (two and rows == 2):  # whole vectors of 16 channels
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
            if pool:
                of[o + co] = _act(max(max(y00, y01), max(y10, y11)) + b, act)
            else:
                of[o + co] = _act(y00 + b, act)
                if two:
                    of[o + CO + co] = _act(y01 + b, act)
                if rows == 2:
                    of[o + row + co] = _act(y10 + b, act)
                    if two:
                        of[o + row + CO + co] = _act(y11 + b, act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv_wino(x, u, bias, tiles, out, act, pool, splits):
    """3x3 stride-1 conv + bias + activation (+ 2x2/2 max pool when `pool`) by Winograd's
    F(2x2, 3x3): per 2x2 block of outputs, 16 products per channel pair instead of 36.

    x: padded, preprocessed input (N, Hp, Wp, CI) holding every 4x4 tile; u: (16, CI, COp) the
    transformed kernel G g G^T, COp a multiple of 16. out: (N, OH, OW, CO), pooled or not; a
    pooled pixel is exactly one tile. Tasks: (image, row of tiles, range of output channels),
    `splits` ranges per row; each runs the input transform of its row of tiles, 16 GEMMs
    (tiles x CI) @ (CI x channels) with the conv micro-kernels, and the output transform.
    tiles: (threads, >= 16 * TW * (CI + COp)) floats for the transformed tiles and products.
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
    usize = CI * COp
    row_out = OW * CO
    for t in prange(N * TH * splits):
        s = t % splits
        r = t // splits
        ty = r % TH
        n = r // TH
        c0 = min(COp, s * per)
        c1 = min(COp, c0 + per)
        if c0 < c1:
            buf = tiles[numba.get_thread_id()]
            vf = buf[:vsize]
            mf = buf[vsize:]
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
            if pool:
                _wino_output(
                    mf,
                    TW,
                    COp,
                    c0,
                    c1,
                    bias,
                    act,
                    of,
                    (n * OH + ty) * row_out,
                    row_out,
                    CO,
                    True,
                    1,
                    OW,
                )
            else:
                _wino_output(
                    mf,
                    TW,
                    COp,
                    c0,
                    c1,
                    bias,
                    act,
                    of,
                    (n * OH + 2 * ty) * row_out,
                    row_out,
                    CO,
                    False,
                    min(2, OH - 2 * ty),
                    OW,
                )


@njit(fastmath=True, cache=True, nogil=True)
def _softmax_row(row):
    m = row[0]
    for j in range(1, row.size):
        m = row[j] if row[j] > m else m
    s = _Z
    for j in range(row.size):
        e = np.exp(row[j] - m)
        row[j] = e
        s += e
    inv = _ONE / s
    for j in range(row.size):
        row[j] *= inv


@njit(fastmath=True, cache=True, nogil=True)
def _dense_block(xf, wf, bias, tile, out, r0, r1, c0, c1, act):
    """out[r0:r1, c0:c1] = act(x @ W + b) for units c0..c1-1 (c0 a multiple of 64; units past
    out.shape[1] are computed on zero columns and dropped): the conv micro-kernels with one
    segment of K taps, a batch row as a pixel. Softmax (4) needs c0 = 0 and c1 = Up."""
    K = xf.size // out.shape[0]
    Up = wf.size // K
    U = out.shape[1]
    # weight block of units c..c+w-1: K rows of w contiguous floats from wf[c*K]
    for c in range(c0, c1, 64):
        w = min(64, Up - c)
        _conv_row(xf, r0 * K, K, 0, 1, K, wf, c * K, w, tile, c, Up, r1 - r0, w)
    of = out.reshape(out.size)
    for i in range(r1 - r0):
        _store_row(tile, i * Up, bias, of, (r0 + i) * U, c0, min(c1, U), 0 if act == 4 else act)
        if act == 4:
            _softmax_row(out[r0 + i])


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def dense(x, wk, bias, tiles, out, act, splits):
    """out = act(x @ W + b). x: (N, K) C-contiguous; wk: the weights in blocks of 64 units (the
    last block narrower), each K rows of its units, contiguous (see `_pack_dense` in inference.py), Up the
    units rounded up to 16 (zero columns); out: (N, U). A block streams from memory in order,
    which matters at batch 1, where every weight is read once per call. Tasks: (group of
    DENSE_ROWS rows, range of 64-unit blocks), `splits` ranges per group (softmax needs whole
    rows: splits=1). tiles: (threads, >= DENSE_ROWS*Up).
    Every output is one in-order chain of fused multiply-adds over K, whatever the batch size
    or the block it falls in, so a row's result is bit-identical alone and in any batch."""
    N = x.shape[0]
    Up = wk.size // x.shape[1]
    per = ((Up + 64 * splits - 1) // (64 * splits)) * 64
    groups = (N + DENSE_ROWS - 1) // DENSE_ROWS
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    for t in prange(groups * splits):
        s = t % splits
        g = t // splits
        c0 = min(Up, s * per)
        c1 = min(Up, c0 + per)
        if c0 < c1:
            r0 = g * DENSE_ROWS
            _dense_block(
                xf,
                wf,
                bias,
                tiles[numba.get_thread_id()],
                out,
                r0,
                min(N, r0 + DENSE_ROWS),
                c0,
                c1,
                act,
            )


@njit(fastmath=True, cache=True, nogil=True)
def dense_serial(x, wk, bias, tiles, out, act):
    """`dense` on the calling thread only, for layers too small to pay for a parallel region
    (the same micro-kernel calls, so the same results)."""
    N = x.shape[0]
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    tile = tiles[0]
    for r0 in range(0, N, DENSE_ROWS):
        _dense_block(
            xf, wf, bias, tile, out, r0, min(N, r0 + DENSE_ROWS), 0, wk.size // x.shape[1], act
        )


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def conv1_pixels_pool2(x, wt, bias, tiles, out, kh, kw, act):
    """1-input-channel, stride-1 conv with at most 8 filters + bias + activation + 2x2/2 max pool,
    with output pixels in the vector lanes (filters in the lanes would leave most of them empty):
    the transposed micro-kernel multiplies 8 (or, for at most 6 filters, 6) broadcast weights by
    32 consecutive input pixels.

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
            if CO <= 6:
                _mkt6x2(
                    wf,
                    0,
                    taps,
                    kw,
                    kh,
                    kw,
                    xf,
                    (n * Hp + 2 * py + dy) * Wp + x0,
                    Wp,
                    1,
                    tile,
                    dy * 256,
                    32,
                )
            else:
                _mkt8x2(
                    wf,
                    0,
                    taps,
                    kw,
                    kh,
                    kw,
                    xf,
                    (n * Hp + 2 * py + dy) * Wp + x0,
                    Wp,
                    1,
                    tile,
                    dy * 256,
                    32,
                )
        for px in range(16 * blk, min(PW, 16 * blk + 16)):
            j = np.uint64(2 * px - x0)
            o = np.uint64(((n * PH + py) * PW + px) * CO)
            for co in range(CO):
                i = np.uint64(co * 32) + j
                m = max(max(tile[i], tile[i + 1]), max(tile[i + 256], tile[i + 257]))
                of[o + np.uint64(co)] = _act(m + bias[co], act)


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
                v00, v01, v02, v03 = (
                    xf[o] * sc + sf,
                    xf[o + 1] * sc + sf,
                    xf[o + 2] * sc + sf,
                    xf[o + 3] * sc + sf,
                )
                v10, v11, v12, v13 = (
                    xf[o1] * sc + sf,
                    xf[o1 + 1] * sc + sf,
                    xf[o1 + 2] * sc + sf,
                    xf[o1 + 3] * sc + sf,
                )
                v20, v21, v22, v23 = (
                    xf[o2] * sc + sf,
                    xf[o2 + 1] * sc + sf,
                    xf[o2 + 2] * sc + sf,
                    xf[o2 + 3] * sc + sf,
                )
                v30, v31, v32, v33 = (
                    xf[o3] * sc + sf,
                    xf[o3 + 1] * sc + sf,
                    xf[o3 + 2] * sc + sf,
                    xf[o3 + 3] * sc + sf,
                )
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
