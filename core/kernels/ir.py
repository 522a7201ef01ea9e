"""LLVM-IR micro-kernels: numba intrinsics that emit vector IR for the GEMM rows of every conv
and dense kernel.

A micro-kernel (`_mk8x2`, `_mk4x4`, ...) computes 1-12 output pixels x 16-64 output channels,
held as up to 24 accumulators of 16 floats in registers; each step broadcasts one input value
per pixel and multiplies it with 1-4 weight vectors. Plain Numba cannot express this: its
scalar-accumulator kernels either spill the accumulators or need a horizontal sum per output.
Also the small vector helpers (`_vload`, `_vstore`, `_array_data`) other intrinsics build on.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _close_loop(builder, counter, limit, phis, values, latch, header, exit_block, step=1) -> None:
    """The back edge of a counted loop in LLVM IR: counter + `step` and `values` flow from
    block `latch` into `header`'s phis (`phis`, matching `values` row by row); leave for
    `exit_block` once the counter reaches `limit`."""
    following = builder.add(counter, ir.Constant(counter.type, step))
    counter.add_incoming(following, latch)
    for phi_row, value_row in zip(phis, values):
        for phi, value in zip(phi_row, value_row):
            phi.add_incoming(value, latch)
    builder.cbranch(builder.icmp_signed("<", following, limit), header, exit_block)


def _microkernel(
    rows: int,
    vectors: int,
    b_steps: bool = False,
    blocks: int = 1,
    wraps: bool = False,
    narrow_last: int = 0,
    epilogue: bool = False,
):
    """An intrinsic computing a block of `rows` output pixels x `vectors`*16 output channels of a
    convolution straight from the (padded) NHWC input, with no patch copy ("implicit GEMM"):

        mk(a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more)
        C[r, j] = sum over s < segs, k < seg_len of
                  a[a_off + s*a_step + r*lda + k] * b[b_off + (s*seg_len + k)*ldb + j]
        stored at c[c_off + r*ldc + j], j < 16*vectors; with `more` != 0 the sum starts from
        the C already stored there instead of zero (the same chain of fused multiply-adds
        continued, so splitting the segments over several calls changes no bit)

    For a conv, segment s is kernel row ky (a_step = one input row), k runs over (kx, ci), which
    are contiguous in NHWC, and lda = stride * channels steps to the next output pixel. With
    `b_steps`, mk takes `b_step` after `b_off` and B's offset is b_off + s*b_step + k*ldb: the
    transposed form of `conv1_pixels_pool2`, where B is the input image and A the weights. Every
    output is one in-order chain of fused multiply-adds whatever the batch size or the block it
    falls in. All arrays are flat float32; segs, seg_len >= 1; no bounds checks. (`b_steps`
    kernels take no `more`.) With `blocks` > 1, mk takes `b_split` after `more`, and the columns
    come in `blocks` equal groups, each b_split floats after the one before: a dense layer's
    weights are packed in blocks of 64 (or 16) units, and one row over two blocks of 64 (or
    four of 16) keeps eight (four) accumulators busy instead of four (one). With `narrow_last`
    (two blocks), the second block has that many vectors and rows of its own width: mk takes
    `ldb2` after `b_split` (a whole 64-unit block and a layer's narrower last one in one call).

    With `wraps`, mk takes `col0, row_len, jump` after `more`, and the block's pixels may run
    over the ends of output rows: pixel r is at column col0 + r of a row of row_len pixels,
    counted on into the next rows, and its inputs start at a_off + r*lda + q*jump, q the rows
    it wrapped past (jump: one conv row's input step less row_len * lda). A conv whose rows are
    shorter than a block then still fills it: 16 pixels of a 4x4 output in calls of 6, 5 and
    5 instead of four of 4, so each weight is read for more pixels.

    With `epilogue`, mk takes `bias, bias_off, act` after `more` and stores act(C[r, j] +
    bias[bias_off + j]), act 1 ReLU, else linear: a conv's bias and activation applied to the
    accumulators in registers as its last call stores them straight into the layer's output,
    where a pass over a scratch tile would read and write every output once more. The sum then
    the addition, in that order, as the pass does: the same bits."""

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
            more = None
        elif blocks > 1:
            a_arr, a_off, lda, a_step, segs, seg_len, b_arr, b_off, ldb, c_arr, c_off, ldc = args[
                :12
            ]
            more, b_split = args[12], args[13]
            b_step = builder.mul(seg_len, ldb)
        else:
            a_arr, a_off, lda, a_step, segs, seg_len, b_arr, b_off, ldb, c_arr, c_off, ldc = args[
                :12
            ]
            more = args[12]
            b_step = builder.mul(seg_len, ldb)
        biases = _epilogue_bias(context, builder, signature, args, vectors) if epilogue else None
        ap = context.make_array(signature.args[0])(context, builder, a_arr).data
        bp = context.make_array(signature.args[6])(context, builder, b_arr).data
        cp = _array_data(context, builder, signature, args, 10 if more is None else 9)
        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), 16)
        vptr = vec.as_pointer()
        fma = _fma16(builder)
        zero = ir.Constant(vec, [0.0] * 16)
        start = [[zero] * vectors for _ in range(rows)]
        if more is not None:  # C as it is (a valid location: the results go there) or zero
            go_on = builder.icmp_signed("!=", more, ir.Constant(more.type, 0))
            for r in range(rows):
                c_row = builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc))
                for v in range(vectors):
                    old = _vload(builder, cp, builder.add(c_row, ir.Constant(i64, 16 * v)))
                    start[r][v] = builder.select(go_on, old, zero)
        # each vector's (block, place in it); each block's row stride
        if narrow_last:
            first = vectors - narrow_last
            places = [(0, v) for v in range(first)] + [(1, v) for v in range(narrow_last)]
            ldbs = [ldb, args[14]]
        else:
            per_block = vectors // blocks
            places = [(v // per_block, v % per_block) for v in range(vectors)]
            ldbs = [ldb] * blocks
        # each pixel's input offset from the block's first: r * lda, plus a jump per row end
        pixel_offsets = [builder.mul(ir.Constant(i64, r), lda) for r in range(rows)]
        if wraps:
            col0, row_len, jump = args[13:16]
            col, wrapped = col0, ir.Constant(i64, 0)
            for r in range(rows):
                pixel_offsets[r] = builder.add(pixel_offsets[r], builder.mul(wrapped, jump))
                col = builder.add(col, ir.Constant(i64, 1))
                ends = builder.icmp_signed(">=", col, row_len)
                col = builder.select(ends, ir.Constant(i64, 0), col)
                wrapped = builder.add(wrapped, builder.zext(ends, i64))

        def step(a_seg, b_segs, k, accs):
            """`accs` after input k of the segment: one more link of every chain. b_segs: the
            segment's first row in each block (each b_split after the one before)."""
            b_rows = [builder.add(seg, builder.mul(k, stride)) for seg, stride in zip(b_segs, ldbs)]
            bv = [
                _vload(builder, bp, builder.add(b_rows[blk], ir.Constant(i64, 16 * v)))
                for blk, v in places
            ]
            a_k = builder.add(a_seg, k)
            out = []
            for r in range(rows):
                at = builder.add(a_k, pixel_offsets[r])
                splat = _broadcast(builder, ap, at)
                out.append([builder.call(fma, [splat, bv[v], accs[r][v]]) for v in range(vectors)])
            return out

        def merge(incoming):
            """Phis of the accumulators, one per (values, block) that flows in."""
            grid = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
            for values, block in incoming:
                for phi_row, value_row in zip(grid, values):
                    for phi, value in zip(phi_row, value_row):
                        phi.add_incoming(value, block)
            return grid

        # the inputs of a segment two a loop step, then the odd one out: half the loop's own
        # instructions (its counter, pointer and branch) per multiply-add; the same chains
        fn = builder.function
        entry = builder.block
        outer = fn.append_basic_block("mk_segment")
        pairs = fn.append_basic_block("mk_steps")
        odd = fn.append_basic_block("mk_odd")
        last = fn.append_basic_block("mk_last")
        seg_end = fn.append_basic_block("mk_segment_end")
        done = fn.append_basic_block("mk_done")
        zero64 = ir.Constant(i64, 0)
        even = builder.and_(seg_len, ir.Constant(i64, -2))  # the inputs taken two at a time
        builder.branch(outer)

        builder.position_at_end(outer)
        s = builder.phi(i64)
        s.add_incoming(zero64, entry)
        acc_seg = merge([(start, entry)])
        a_seg = builder.add(a_off, builder.mul(s, a_step))
        b_segs = [builder.add(b_off, builder.mul(s, b_step))]
        for stride in ldbs[1:]:  # block j: b_split after block j-1, its own segment step
            start_j = builder.add(b_off, builder.mul(ir.Constant(i64, len(b_segs)), b_split))
            b_segs.append(builder.add(start_j, builder.mul(s, builder.mul(seg_len, stride))))
        builder.cbranch(builder.icmp_signed(">", even, zero64), pairs, odd)

        builder.position_at_end(pairs)
        k = builder.phi(i64)
        k.add_incoming(zero64, outer)
        acc = merge([(acc_seg, outer)])
        half = step(a_seg, b_segs, k, acc)
        new = step(a_seg, b_segs, builder.add(k, ir.Constant(i64, 1)), half)
        _close_loop(builder, k, even, acc, new, pairs, pairs, odd, step=2)

        builder.position_at_end(odd)
        mid = merge([(acc_seg, outer), (new, pairs)])
        builder.cbranch(builder.icmp_signed("<", even, seg_len), last, seg_end)

        builder.position_at_end(last)
        tail = step(a_seg, b_segs, even, mid)
        builder.branch(seg_end)

        builder.position_at_end(seg_end)
        final = merge([(mid, odd), (tail, last)])
        _close_loop(builder, s, segs, acc_seg, final, seg_end, outer, done)

        builder.position_at_end(done)
        if biases is not None:
            relu = builder.icmp_signed("==", args[15], ir.Constant(args[15].type, 1))
            final = [
                [_bias_act(builder, acc, b, relu) for acc, b in zip(row, biases)] for row in final
            ]
        for r in range(rows):
            c_row = builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc))
            for v in range(vectors):
                dst = builder.gep(cp, [builder.add(c_row, ir.Constant(i64, 16 * v))])
                builder.store(final[r][v], builder.bitcast(dst, vptr), align=4)
        return context.get_dummy_value()

    if b_steps:

        @intrinsic
        def mk(
            typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, b_step, ldb, c, c_off, ldc
        ):
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, b_step, ldb, c, c_off, ldc
            ), codegen
    elif narrow_last:

        @intrinsic
        def mk(
            typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more,
            b_split, ldb2,
        ):  # fmt: skip
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more, b_split,
                ldb2,
            ), codegen  # fmt: skip
    elif blocks > 1:

        @intrinsic
        def mk(
            typingctx,
            a,
            a_off,
            lda,
            a_step,
            segs,
            seg_len,
            b,
            b_off,
            ldb,
            c,
            c_off,
            ldc,
            more,
            b_split,
        ):
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more, b_split
            ), codegen
    elif epilogue:

        @intrinsic
        def mk(
            typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more,
            bias, bias_off, act,
        ):  # fmt: skip
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more, bias,
                bias_off, act,
            ), codegen  # fmt: skip
    elif wraps:

        @intrinsic
        def mk(
            typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more,
            col0, row_len, jump,
        ):  # fmt: skip
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more, col0,
                row_len, jump,
            ), codegen  # fmt: skip
    else:

        @intrinsic
        def mk(typingctx, a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more):
            return types.void(
                a, a_off, lda, a_step, segs, seg_len, b, b_off, ldb, c, c_off, ldc, more
            ), codegen

    return mk


_mk1x1 = _microkernel(1, 1)
_mk1x2 = _microkernel(1, 2)
_mk1x3 = _microkernel(1, 3)  # one row over a dense layer's last block of 48 units
_mk1x4 = _microkernel(1, 4)
_mk1x8 = _microkernel(1, 8, blocks=2)
# one row over a whole 64-unit block and a layer's last block of 16, 32 or 48 units
_mk1x5p = _microkernel(1, 5, blocks=2, narrow_last=1)
_mk1x6p = _microkernel(1, 6, blocks=2, narrow_last=2)
_mk1x7p = _microkernel(1, 7, blocks=2, narrow_last=3)
_mk1x4s = _microkernel(1, 4, blocks=4)  # one row over four 16-unit blocks
_mk2x2s = _microkernel(2, 2, blocks=2)  # two rows over two 16-unit blocks
_mk1x2s = _microkernel(1, 2, blocks=2)  # one row over two 16-unit blocks
# 3-8 rows over two 16-unit blocks, 4-6 over four (dense layers in strips, AVX-512)
_mk3x2s = _microkernel(3, 2, blocks=2)
_mk4x2s = _microkernel(4, 2, blocks=2)
_mk5x2s = _microkernel(5, 2, blocks=2)
_mk6x2s = _microkernel(6, 2, blocks=2)
_mk7x2s = _microkernel(7, 2, blocks=2)
_mk8x2s = _microkernel(8, 2, blocks=2)
_mk4x4s = _microkernel(4, 4, blocks=4)
_mk5x4s = _microkernel(5, 4, blocks=4)
_mk6x4s = _microkernel(6, 4, blocks=4)
_mk2x1 = _microkernel(2, 1)
_mk3x1 = _microkernel(3, 1)
_mk4x1 = _microkernel(4, 1)
_mk2x2 = _microkernel(2, 2)
_mk3x2 = _microkernel(3, 2)
_mk4x2 = _microkernel(4, 2)
_mk2x4 = _microkernel(2, 4)
_mk3x4 = _microkernel(3, 4)
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
_mk9x1 = _microkernel(9, 1)
_mk10x1 = _microkernel(10, 1)
_mk11x1 = _microkernel(11, 1)
_mk12x1 = _microkernel(12, 1)
# the same blocks ending in the bias and activation, stored in the output (`epilogue`)
_mkf1x4 = _microkernel(1, 4, epilogue=True)
_mkf2x4 = _microkernel(2, 4, epilogue=True)
_mkf3x4 = _microkernel(3, 4, epilogue=True)
_mkf4x4 = _microkernel(4, 4, epilogue=True)
_mkf5x4 = _microkernel(5, 4, epilogue=True)
_mkf6x4 = _microkernel(6, 4, epilogue=True)
_mkf1x2 = _microkernel(1, 2, epilogue=True)
_mkf2x2 = _microkernel(2, 2, epilogue=True)
_mkf3x2 = _microkernel(3, 2, epilogue=True)
_mkf4x2 = _microkernel(4, 2, epilogue=True)
_mkf5x2 = _microkernel(5, 2, epilogue=True)
_mkf6x2 = _microkernel(6, 2, epilogue=True)
_mkf7x2 = _microkernel(7, 2, epilogue=True)
_mkf8x2 = _microkernel(8, 2, epilogue=True)
_mkf1x1 = _microkernel(1, 1, epilogue=True)
_mkf2x1 = _microkernel(2, 1, epilogue=True)
_mkf3x1 = _microkernel(3, 1, epilogue=True)
_mkf4x1 = _microkernel(4, 1, epilogue=True)
_mkf5x1 = _microkernel(5, 1, epilogue=True)
_mkf6x1 = _microkernel(6, 1, epilogue=True)
_mkf7x1 = _microkernel(7, 1, epilogue=True)
_mkf8x1 = _microkernel(8, 1, epilogue=True)
_mkf9x1 = _microkernel(9, 1, epilogue=True)
_mkf10x1 = _microkernel(10, 1, epilogue=True)
_mkf11x1 = _microkernel(11, 1, epilogue=True)
_mkf12x1 = _microkernel(12, 1, epilogue=True)
# the same blocks over the ends of output rows (`wraps`; one pixel never wraps)
_mkw2x4 = _microkernel(2, 4, wraps=True)
_mkw3x4 = _microkernel(3, 4, wraps=True)
_mkw4x4 = _microkernel(4, 4, wraps=True)
_mkw5x4 = _microkernel(5, 4, wraps=True)
_mkw6x4 = _microkernel(6, 4, wraps=True)
_mkw2x2 = _microkernel(2, 2, wraps=True)
_mkw3x2 = _microkernel(3, 2, wraps=True)
_mkw4x2 = _microkernel(4, 2, wraps=True)
_mkw5x2 = _microkernel(5, 2, wraps=True)
_mkw6x2 = _microkernel(6, 2, wraps=True)
_mkw7x2 = _microkernel(7, 2, wraps=True)
_mkw8x2 = _microkernel(8, 2, wraps=True)
_mkw2x1 = _microkernel(2, 1, wraps=True)
_mkw3x1 = _microkernel(3, 1, wraps=True)
_mkw4x1 = _microkernel(4, 1, wraps=True)
_mkw5x1 = _microkernel(5, 1, wraps=True)
_mkw6x1 = _microkernel(6, 1, wraps=True)
_mkw7x1 = _microkernel(7, 1, wraps=True)
_mkw8x1 = _microkernel(8, 1, wraps=True)
_mkw9x1 = _microkernel(9, 1, wraps=True)
_mkw10x1 = _microkernel(10, 1, wraps=True)
_mkw11x1 = _microkernel(11, 1, wraps=True)
_mkw12x1 = _microkernel(12, 1, wraps=True)
_mkt8x2 = _microkernel(8, 2, b_steps=True)
_mkt6x2 = _microkernel(6, 2, b_steps=True)
_mkt6x1 = _microkernel(6, 1, b_steps=True)  # the same for 16 registers of 8 floats (AVX2)
_mkt4x1 = _microkernel(4, 1, b_steps=True)


def _slider(rows: int, kw: int, sw: int, ci: int):
    """An intrinsic for `rows` consecutive pixels of a conv row x 16 output channels, for a
    kernel `kw` wide at stride `sw` over `ci` input channels (a first layer over RGB pixels),
    ending in bias and activation like `_microkernel`'s `epilogue`:

        mk(a, a_off, a_step, kh, b, b_off, ldb, c, c_off, ldc, bias, act)
        C[r, j] = act(sum over ky < kh, kx < kw, i < ci of
                      a[a_off + ky*a_step + (r*sw + kx)*ci + i] * b[b_off + ((ky*kw + kx)*ci + i)*ldb + j]
                      + bias[j])   stored at c[c_off + r*ldc + j], j < 16; act 1 ReLU, else linear

    With one weight vector per step, `_microkernel` broadcasts an input value for every
    multiply-add (12 rows: 13 loads per 12). Neighbouring windows share input columns, though:
    this kernel keeps a kernel row's kw * ci weight vectors in registers and broadcasts each
    input value of the row once, multiplying it into every pixel whose window holds it (3x3/2
    over 3 channels, 16 pixels: 108 loads per 144). Each output still gets its fused
    multiply-adds in (ky, kx, i) order from zero, then the bias: the same bits as
    `_microkernel`. rows + kw * ci + 1 vectors must fit the register file (AVX-512)."""
    taps = kw * ci

    def codegen(context, builder, signature, args):
        a_off, a_step, kh, b_off, ldb, c_off, ldc, act = (
            args[i] for i in (1, 2, 3, 5, 6, 8, 9, 11)
        )
        ap = _array_data(context, builder, signature, args, 0)
        bp = _array_data(context, builder, signature, args, 4)
        cp = _array_data(context, builder, signature, args, 7)
        biasp = _array_data(context, builder, signature, args, 10)
        i64 = ir.IntType(64)
        fma = _fma16(builder)
        zero = ir.Constant(_V16, [0.0] * 16)
        entry = builder.block
        kernel_row = builder.function.append_basic_block("slide_kernel_row")
        done = builder.function.append_basic_block("slide_done")
        builder.branch(kernel_row)

        builder.position_at_end(kernel_row)
        ky = builder.phi(i64)
        ky.add_incoming(ir.Constant(i64, 0), entry)
        accs = [builder.phi(_V16) for _ in range(rows)]
        for acc in accs:
            acc.add_incoming(zero, entry)
        a_row = builder.add(a_off, builder.mul(ky, a_step))
        b_row = builder.add(b_off, builder.mul(builder.mul(ky, ir.Constant(i64, taps)), ldb))
        weights = [
            _vload(builder, bp, builder.add(b_row, builder.mul(ir.Constant(i64, t), ldb)))
            for t in range(taps)
        ]
        sums = list(accs)
        # input column `col` of the block's rows lies in pixel r's window at kx = col - r*sw;
        # going by columns, then channels, keeps each pixel's own (kx, i) order
        for col in range((rows - 1) * sw + kw):
            users = [(r, col - r * sw) for r in range(rows) if 0 <= col - r * sw < kw]
            for i in range(ci):
                value = _broadcast(builder, ap, builder.add(a_row, ir.Constant(i64, col * ci + i)))
                for r, kx in users:
                    sums[r] = builder.call(fma, [value, weights[kx * ci + i], sums[r]])
        _close_loop(
            builder, ky, kh, [[acc] for acc in accs], [[s] for s in sums], kernel_row,
            kernel_row, done,
        )  # fmt: skip

        builder.position_at_end(done)
        bias = _vload(builder, biasp, ir.Constant(i64, 0))
        relu = builder.icmp_signed("==", act, ir.Constant(act.type, 1))
        for r in range(rows):
            at = builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc))
            _vstore(builder, _bias_act(builder, sums[r], bias, relu), cp, at)
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, a, a_off, a_step, kh, b, b_off, ldb, c, c_off, ldc, bias, act):
        return types.void(a, a_off, a_step, kh, b, b_off, ldb, c, c_off, ldc, bias, act), codegen

    return mk


# RGB first layers of 16 filters: pixels a call of each (kernel width, stride). As many as keep
# every accumulator and the kernel row's weights in registers with the instruction order LLVM
# chooses for each AVX-512 target of `tests/test_kernels_codegen.py`: its Skylake-SP order
# spills from 14, 12, 10, 8 and 6 pixels on (in that order), its Zen 4 one 7x7/2 from 6. On
# an Intel Xeon (Sapphire Rapids order), a 3x3/2 conv over a 128 x 128 image on one thread
# took 30.7-34.1 us with 16 pixels a call, 35.9-37.3 with 10 and 36.6-38.1 with 8 (generic
# micro-kernels: 47-48); on two threads 20.9 us with 16 and with 10 (21-24 in later runs
# with 10, against 27-29).
SLIDE_3S1 = 12
SLIDE_3S2 = 10
SLIDE_5S1 = 8
SLIDE_5S2 = 6
SLIDE_7S2 = 4
_slide3s1 = _slider(SLIDE_3S1, 3, 1, 3)
_slide3s2 = _slider(SLIDE_3S2, 3, 2, 3)
_slide5s1 = _slider(SLIDE_5S1, 5, 1, 3)
_slide5s2 = _slider(SLIDE_5S2, 5, 2, 3)
_slide7s2 = _slider(SLIDE_7S2, 7, 2, 3)


_V16 = ir.VectorType(ir.FloatType(), 16)


def _array_data(context, builder, signature, args, index):
    """Pointer to the data of the intrinsic's array argument `index`."""
    return context.make_array(signature.args[index])(context, builder, args[index]).data


def _vload(builder, ptr, offset):
    """The 16 floats at ptr[offset] (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), _V16.as_pointer()), align=4)


def _broadcast(builder, ptr, offset):
    """ptr[offset] in all 16 lanes."""
    i32 = ir.IntType(32)
    scalar = builder.load(builder.gep(ptr, [offset]), align=4)
    undef = ir.Constant(_V16, ir.Undefined)
    mask = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
    return builder.shuffle_vector(
        builder.insert_element(undef, scalar, ir.Constant(i32, 0)), undef, mask
    )


def _fma16(builder):
    """The declaration of LLVM's fused multiply-add of 16 floats in the builder's module."""
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.fma.v16f32"
    )


def _add_as_written(builder, a, b):
    """a + b, kept in the order written: numba's fastmath pass gives `fast` (which lets LLVM
    reassociate a sum) only to instructions without flags, so this one gets `contract`, which
    changes nothing for an addition of two sums."""
    total = builder.fadd(a, b)
    total.flags.append("contract")
    return total


def _vstore(builder, value, ptr, offset):
    builder.store(value, builder.bitcast(builder.gep(ptr, [offset]), _V16.as_pointer()), align=4)


def _epilogue_bias(context, builder, signature, args, vectors):
    """The bias vectors of an `epilogue` micro-kernel's columns: bias[bias_off + 16v]."""
    bias = _array_data(context, builder, signature, args, 13)
    return [
        _vload(builder, bias, builder.add(args[14], ir.Constant(ir.IntType(64), 16 * v)))
        for v in range(vectors)
    ]


def _bias_act(builder, acc, bias, relu):
    """acc + bias, then max(., 0) where `relu` (an i1): `elementwise._store_row`'s values. The
    addition keeps its place after the sum (`_add_as_written`)."""
    total = _add_as_written(builder, acc, bias)
    zero = ir.Constant(_V16, [0.0] * 16)
    positive = builder.select(builder.fcmp_ordered(">", total, zero), total, zero)
    return builder.select(relu, positive, total)


def _segmented_kernel(rows: int, segments: int, in_turn: bool = False):
    """An intrinsic for `rows` rows x 16 columns whose sums run as `segments` independent
    chains of fused multiply-adds, each over a consecutive part of the inputs (k_len //
    segments of them; the last part also takes the rest), added pairwise at the end:

        mk(a, a_off, lda, k_len, b, b_off, ldb, c, c_off, ldc)
        C[r, j] = (chain 0 + chain 1) + (chain 2 + chain 3)   (segments = 4)
        chain s = sum over k in part s of a[a_off + r*lda + k] * b[b_off + k*ldb + j]
        stored at c[c_off + r*ldc + j], j < 16

    For a dense layer of at most 16 units, whose one row would otherwise wait on a single
    chain as long as its inputs (8,192 inputs: 4 cycles each). The order of the operations
    does not depend on `rows`, so a row's result is the same in any batch.

    The chains advance together (rows * segments in flight), or with `in_turn` one part after
    another (`rows` in flight; the same chains and sums, so the same bits): for several rows
    whose parts are whole multiples of 4 KB (1,024 inputs), whose rows * segments input streams
    all fall in the same L1 sets, more than its ways (on Zen 5, 6 rows of 8,192 inputs: 34.4 us
    together, 10.1 in turn)."""

    def codegen(context, builder, signature, args):
        a_off, lda, k_len, b_off, ldb, c_off, ldc = (args[i] for i in (1, 2, 3, 5, 6, 8, 9))
        ap = _array_data(context, builder, signature, args, 0)
        bp = _array_data(context, builder, signature, args, 4)
        cp = _array_data(context, builder, signature, args, 7)
        i64 = ir.IntType(64)
        fma = _fma16(builder)
        part = builder.sdiv(k_len, ir.Constant(i64, segments))

        def step(kk, accs):
            """accs[r] + a[r, kk] * b[kk] for every row: one more link of each row's chain."""
            bv = _vload(builder, bp, builder.add(b_off, builder.mul(kk, ldb)))
            out = []
            for r in range(rows):
                at = builder.add(builder.add(a_off, builder.mul(ir.Constant(i64, r), lda)), kk)
                out.append(builder.call(fma, [_broadcast(builder, ap, at), bv, accs[r]]))
            return out

        build = _chains_in_turn if in_turn else _chains_together
        chains = build(builder, rows, segments, part, k_len, step)  # [row][segment]
        for r in range(rows):
            row = chains[r]
            while len(row) > 1:  # pairwise: (0 + 1) + (2 + 3)
                row = [_add_as_written(builder, row[i], row[i + 1]) for i in range(0, len(row), 2)]
            _vstore(builder, row[0], cp, builder.add(c_off, builder.mul(ir.Constant(i64, r), ldc)))
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, a, a_off, lda, k_len, b, b_off, ldb, c, c_off, ldc):
        return types.void(a, a_off, lda, k_len, b, b_off, ldb, c, c_off, ldc), codegen

    return mk


def _chains_together(builder, rows, segments, part, k_len, step):
    """`_segmented_kernel`'s chains, all advancing in one loop over k < part (then the last
    part's rest): the rows' sums per segment, [row][segment]."""
    i64 = ir.IntType(64)
    zero = ir.Constant(_V16, [0.0] * 16)
    rest = builder.mul(part, ir.Constant(i64, segments))  # the last part goes on from here
    fn = builder.function
    entry = builder.block
    main = fn.append_basic_block("seg_main")
    mid = fn.append_basic_block("seg_mid")
    tail = fn.append_basic_block("seg_tail")
    done = fn.append_basic_block("seg_done")
    builder.cbranch(builder.icmp_signed(">", part, ir.Constant(i64, 0)), main, mid)

    builder.position_at_end(main)  # k < part, every segment
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    acc = [[builder.phi(_V16) for _ in range(segments)] for _ in range(rows)]
    for r in range(rows):
        for s in range(segments):
            acc[r][s].add_incoming(zero, entry)
    new = [[None] * segments for _ in range(rows)]
    for s in range(segments):
        kk = builder.add(builder.mul(part, ir.Constant(i64, s)), k)
        column = step(kk, [acc[r][s] for r in range(rows)])
        for r in range(rows):
            new[r][s] = column[r]
    _close_loop(builder, k, part, acc, new, main, main, mid)

    builder.position_at_end(mid)
    held = [[builder.phi(_V16) for _ in range(segments)] for _ in range(rows)]
    for r in range(rows):
        for s in range(segments):
            held[r][s].add_incoming(zero, entry)
            held[r][s].add_incoming(new[r][s], main)
    builder.cbranch(builder.icmp_signed("<", rest, k_len), tail, done)

    builder.position_at_end(tail)  # the inputs past segments * part: the last chain goes on
    k2 = builder.phi(i64)
    k2.add_incoming(ir.Constant(i64, 0), mid)
    last = [builder.phi(_V16) for _ in range(rows)]
    for r in range(rows):
        last[r].add_incoming(held[r][segments - 1], mid)
    moved = step(builder.add(rest, k2), last)
    _close_loop(
        builder,
        k2,
        builder.sub(k_len, rest),
        [[v] for v in last],
        [[v] for v in moved],
        tail,
        tail,
        done,
    )

    builder.position_at_end(done)
    finals = [builder.phi(_V16) for _ in range(rows)]  # phis first in a block
    for r in range(rows):
        finals[r].add_incoming(held[r][segments - 1], mid)
        finals[r].add_incoming(moved[r], tail)
    return [[held[r][s] for s in range(segments - 1)] + [finals[r]] for r in range(rows)]


def _chains_in_turn(builder, rows, segments, part, k_len, step):
    """`_segmented_kernel`'s chains, one part after another: a loop per segment over its
    inputs (the last up to k_len). The rows' sums per segment, [row][segment]."""
    i64 = ir.IntType(64)
    zero = ir.Constant(_V16, [0.0] * 16)
    fn = builder.function
    sums = [[] for _ in range(rows)]
    for s in range(segments):
        start = builder.mul(part, ir.Constant(i64, s))
        stop = k_len if s == segments - 1 else builder.mul(part, ir.Constant(i64, s + 1))
        before = builder.block
        loop = fn.append_basic_block(f"turn_{s}")
        after = fn.append_basic_block(f"turn_{s}_done")
        builder.cbranch(builder.icmp_signed("<", start, stop), loop, after)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(start, before)
        acc = [builder.phi(_V16) for _ in range(rows)]
        for r in range(rows):
            acc[r].add_incoming(zero, before)
        new = step(k, acc)
        _close_loop(builder, k, stop, [acc], [new], loop, loop, after)

        builder.position_at_end(after)
        for r in range(rows):
            total = builder.phi(_V16)
            total.add_incoming(zero, before)
            total.add_incoming(new[r], loop)
            sums[r].append(total)
    return sums


SEGMENTS = 4  # chains per output of the 16-unit dense kernels
_mks1 = _segmented_kernel(1, SEGMENTS)
_mks2 = _segmented_kernel(2, SEGMENTS)
_mks3 = _segmented_kernel(3, SEGMENTS)
_mks4 = _segmented_kernel(4, SEGMENTS)
_mks5 = _segmented_kernel(5, SEGMENTS)
_mks6 = _segmented_kernel(6, SEGMENTS)
_mkt2 = _segmented_kernel(2, SEGMENTS, in_turn=True)
_mkt3 = _segmented_kernel(3, SEGMENTS, in_turn=True)
_mkt4 = _segmented_kernel(4, SEGMENTS, in_turn=True)
_mkt5 = _segmented_kernel(5, SEGMENTS, in_turn=True)
_mkt6 = _segmented_kernel(6, SEGMENTS, in_turn=True)


def _fma_chains(chains: int):
    """An intrinsic for the machine's FP32 multiply-add peak (`peak.fma_peak_gflops`), with no
    memory traffic in its loop:

        fma(data, steps): acc[i] = acc[i] * data[0:16] + data[16:32], `steps` times over, for
        `chains` independent accumulators of 16 floats starting from data[32 + 16*i] (and
        stored back there)

    Every link of a chain depends on the one before, so `chains` must cover the multiply-add
    latency times the units that run them (4 x 2 on the CPUs met); they stay in registers."""

    def codegen(context, builder, signature, args):
        p = _array_data(context, builder, signature, args, 0)
        steps = args[1]
        i64 = ir.IntType(64)
        fma = _fma16(builder)
        scale = _vload(builder, p, ir.Constant(i64, 0))
        shift = _vload(builder, p, ir.Constant(i64, 16))
        start = [_vload(builder, p, ir.Constant(i64, 32 + 16 * i)) for i in range(chains)]
        entry = builder.block
        loop = builder.function.append_basic_block("fma_step")
        done = builder.function.append_basic_block("fma_done")
        builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), entry)
        acc = [builder.phi(_V16) for _ in range(chains)]
        for phi, value in zip(acc, start):
            phi.add_incoming(value, entry)
        new = [builder.call(fma, [a, scale, shift]) for a in acc]
        _close_loop(builder, k, steps, [acc], [new], loop, loop, done)

        builder.position_at_end(done)
        final = [builder.phi(_V16) for _ in range(chains)]  # phis first, then the stores
        for i, phi in enumerate(final):
            phi.add_incoming(start[i], entry)
            phi.add_incoming(new[i], loop)
        for i, phi in enumerate(final):
            _vstore(builder, phi, p, ir.Constant(i64, 32 + 16 * i))
        return context.get_dummy_value()

    @intrinsic
    def fma(typingctx, data, steps):
        return types.void(data, steps), codegen

    return fma
