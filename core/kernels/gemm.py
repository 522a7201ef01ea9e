"""GEMM rows on the micro-kernels of `ir.py`: `_conv_row` computes a row of outputs (conv
pixels, Winograd tiles or dense batch rows) x a range of output columns, in the fewest and
fullest micro-kernel calls the register file allows. Every output is one in-order chain of
fused multiply-adds whatever the batch size or the block it falls in, so results are
batch-invariant.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.ir import (
    _mk1x1,
    _mk1x2,
    _mk1x2s,
    _mk1x4,
    _mk1x4s,
    _mk2x1,
    _mk2x2,
    _mk2x2s,
    _mk2x4,
    _mk3x1,
    _mk3x2,
    _mk3x4,
    _mk4x1,
    _mk4x2,
    _mk4x4,
    _mk5x1,
    _mk5x2,
    _mk5x4,
    _mk6x1,
    _mk6x2,
    _mk6x4,
    _mk7x1,
    _mk7x2,
    _mk8x1,
    _mk8x2,
    _mk9x1,
    _mk10x1,
    _mk11x1,
    _mk12x1,
    _mkf1x1,
    _mkf1x2,
    _mkf1x4,
    _mkf2x1,
    _mkf2x2,
    _mkf2x4,
    _mkf3x1,
    _mkf3x2,
    _mkf3x4,
    _mkf4x1,
    _mkf4x2,
    _mkf4x4,
    _mkf5x1,
    _mkf5x2,
    _mkf5x4,
    _mkf6x1,
    _mkf6x2,
    _mkf6x4,
    _mkf7x1,
    _mkf7x2,
    _mkf8x1,
    _mkf8x2,
    _mkf9x1,
    _mkf10x1,
    _mkf11x1,
    _mkf12x1,
    _mkw2x1,
    _mkw2x2,
    _mkw2x4,
    _mkw3x1,
    _mkw3x2,
    _mkw3x4,
    _mkw4x1,
    _mkw4x2,
    _mkw4x4,
    _mkw5x1,
    _mkw5x2,
    _mkw5x4,
    _mkw6x1,
    _mkw6x2,
    _mkw6x4,
    _mkw7x1,
    _mkw7x2,
    _mkw8x1,
    _mkw8x2,
    _mkw9x1,
    _mkw10x1,
    _mkw11x1,
    _mkw12x1,
)
from numba import njit

_REGISTERS, _LANES = _runtime.vector_registers()
# The register file in 16-float vectors, the unit of the micro-kernels' accumulators: 32 with
# AVX-512 (32 registers of 16 floats), 8 with AVX2 (16 of 8), 4 with SSE. A block keeps its
# rows x vectors accumulators, a broadcast input and its weight vectors in registers; one
# that does not fit spills its accumulators on every step: on an AMD Zen 3 (AVX2), 6 x 64
# channels ran at 30 GFLOP/s on one core and 6 x 16 at 99, the core's peak.
REGISTER_VECTORS = _REGISTERS * _LANES // 16
WIDE = REGISTER_VECTORS >= 32
# The largest block that fits: rows x vectors of 16 channels (the benchmark's ceiling).
PEAK_BLOCK = (6, 4) if WIDE else (max(1, REGISTER_VECTORS - 2), 1)
# How conv weights are packed (`layers.conv2d`): with AVX-512 as rows of all output channels
# (a block of 64 reads 256 contiguous bytes a row); with fewer registers, where a block is 16
# channels, in strips of 16 channels, each strip's rows contiguous: on an AMD Zen 3 a row of
# 16 pixels x 288 inputs x 64 channels ran at 87 GFLOP/s on one core from strips, 64 from rows
# (a strip's 64 bytes a row 256 bytes apart). The kernels tell the two apart by the shape.
STRIPS = not WIDE


@njit(fastmath=True, cache=True, nogil=True)
def _block_rows(count, hi):
    """Outputs in the first (largest) micro-kernel call of a row of `count` outputs in calls of
    at most `hi`: the fewest calls, as even as can be (`_conv_row`)."""
    calls = (count + hi - 1) // hi
    return (count + calls - 1) // calls


@njit(fastmath=True, cache=True, nogil=True)
def _mk_strips(R, nv, xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, strip):
    """`_mk_call` of 1-2 pixels x 32-64 channels on B in strips of 16 channels, `strip` floats
    apart (a separate function: a `strip` argument in `_mk_call` made its calls slower)."""
    if nv == 4:
        _mk1x4s(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, strip)
    elif R == 2:
        _mk2x2s(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, strip)
    else:
        _mk1x2s(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, strip)


@njit(fastmath=True, cache=True, nogil=True)
def _mk_call(R, nv, xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more):
    """One micro-kernel call: R pixels x nv*16 channels; B from wf[c], rows ldb apart; C rows
    ldc apart; with `more`, adding to the C stored there."""
    if nv == 4:
        if R == 4:
            _mk4x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 5:
            _mk5x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 6:
            _mk6x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 2:
            _mk2x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 3:
            _mk3x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        else:
            _mk1x4(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
    elif nv == 2:
        if R == 5:
            _mk5x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 6:
            _mk6x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 7:
            _mk7x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 8:
            _mk8x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 2:
            _mk2x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 3:
            _mk3x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 4:
            _mk4x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        else:
            _mk1x2(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
    else:
        if R == 5:
            _mk5x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 6:
            _mk6x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 7:
            _mk7x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 8:
            _mk8x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 9:
            _mk9x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 10:
            _mk10x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 11:
            _mk11x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 12:
            _mk12x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 2:
            _mk2x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 3:
            _mk3x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        elif R == 4:
            _mk4x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)
        else:
            _mk1x1(xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more)


@njit(fastmath=True, cache=True, nogil=True)
def _mk_fused(
    R, nv, xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
):
    """`_mk_call` that ends in act(sum + bias[bias_off + j]) (`ir._microkernel`'s
    `epilogue`): the last call of a conv's outputs, storing into the layer's output."""
    if nv == 4:
        if R == 6:
            _mkf6x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 5:
            _mkf5x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 4:
            _mkf4x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 3:
            _mkf3x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 2:
            _mkf2x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        else:
            _mkf1x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
    elif nv == 2:
        if R == 8:
            _mkf8x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 7:
            _mkf7x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 6:
            _mkf6x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 5:
            _mkf5x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 4:
            _mkf4x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 3:
            _mkf3x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 2:
            _mkf2x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        else:
            _mkf1x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
    else:
        if R == 12:
            _mkf12x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 11:
            _mkf11x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 10:
            _mkf10x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 9:
            _mkf9x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 8:
            _mkf8x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 7:
            _mkf7x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 6:
            _mkf6x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 5:
            _mkf5x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 4:
            _mkf4x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 3:
            _mkf3x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        elif R == 2:
            _mkf2x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )
        else:
            _mkf1x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, bias, bias_off, act
            )


@njit(fastmath=True, cache=True, nogil=True)
def _mk_wrapped(
    R, nv, xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
):
    """`_mk_call` of a block of 2 or more pixels that runs over the end of an output row: its
    first pixel at column col0 of rows of row_len pixels, `jump` more input floats at each row
    end (`ir._microkernel`'s `wraps`)."""
    if nv == 4:
        if R == 6:
            _mkw6x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 5:
            _mkw5x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 4:
            _mkw4x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 3:
            _mkw3x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        else:
            _mkw2x4(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
    elif nv == 2:
        if R == 8:
            _mkw8x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 7:
            _mkw7x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 6:
            _mkw6x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 5:
            _mkw5x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 4:
            _mkw4x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 3:
            _mkw3x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        else:
            _mkw2x2(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
    else:
        if R == 12:
            _mkw12x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 11:
            _mkw11x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 10:
            _mkw10x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 9:
            _mkw9x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 8:
            _mkw8x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 7:
            _mkw7x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 6:
            _mkw6x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 5:
            _mkw5x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 4:
            _mkw4x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        elif R == 3:
            _mkw3x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )
        else:
            _mkw2x1(
                xf, o, lda, a_step, kh, seg, wf, c, ldb, tile, t, ldc, more, col0, row_len, jump
            )


@njit(fastmath=True, cache=True, nogil=True)
def _wrapped_call(
    R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more, col0, row_len, jump, strip
):
    """A block of R pixels that runs over a row end (`_conv_row`). B in strips with 2-4
    vectors a call takes only 1-2 pixels (`_block_shape`): those go one pixel a call."""
    if nv > 1 and strip != 16:
        for r in range(R):
            wraps = (col0 + r) // row_len
            _mk_strips(
                1, nv, xf, o + r * lda + wraps * jump, lda, a_step, kh, seg, wf, b, ldb, tile,
                t + r * ldc, ldc, more, strip,
            )  # fmt: skip
    else:
        _mk_wrapped(
            R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more, col0, row_len,
            jump,
        )  # fmt: skip


@njit(fastmath=True, cache=True, nogil=True)
def _block_shape(count, left, narrow, vectors, strips):
    """(vectors of 16 columns, fewest and most rows) of the micro-kernel calls on the next
    columns of a row of `count` outputs, `left` columns to go (a multiple of 16), for a
    register file of `vectors` vectors of 16 floats (REGISTER_VECTORS); `strips`: the weights
    in strips of 16 channels (several vectors a call only for rows of 1-2 outputs).

    With 32 vector registers of 16 floats (AVX-512): blocks of 64 columns x 4-6 rows, then
    32 x 5-8 and 16 x 5-12; with `narrow`, 32 columns from the start. With fewer registers
    (AVX2: 16 of 8 floats) only 16 columns x up to REGISTER_VECTORS - 2 rows keep every
    accumulator in a register, and rows of 1-2 outputs take 64 or 32 columns a call instead:
    more chains of fused multiply-adds in flight than one or two rows of 16 give."""
    if vectors >= 32 and not strips:
        if left >= 64 and not narrow:
            return 4, 4, 6
        if left >= 32:
            return 2, 5, 8
        return 1, 5, 12
    if count == 1 and left >= 64 and not narrow and vectors >= 8:
        return 4, 1, 1
    if count <= 2 and left >= 32 and vectors >= 8:
        return 2, 2, 2
    if vectors >= 32:
        return 1, 5, 12
    hi = max(1, vectors - 2)
    return 1, max(1, hi - 2), hi


@njit(fastmath=True, cache=True, nogil=True)
def _conv_row(
    xf,
    a_off,
    lda,
    a_step,
    kh,
    seg,
    wf,
    b_off,
    ldb,
    tile,
    t_off,
    ldc,
    count,
    width,
    more=0,
    narrow=0,
    vectors=REGISTER_VECTORS,
    strip=16,
    col0=0,
    row_len=None,
    jump=0,
    bias=None,
    act=0,
    bias_at=0,
):
    """tile[t_off + i*ldc + j] = output i < count (its A rows from xf[a_off + i*lda]) for the
    columns j < width (a multiple of 16) of B, which start at wf[b_off], rows ldb apart, each
    16 columns `strip` floats after the 16 before (16: B's rows hold all its columns; else B in
    strips of 16 columns, ldb = 16) (with `more`: added to what the tile holds there,
    continuing its chain of fused multiply-adds).
    For a conv row, output i is a pixel and the columns are output channels. The blocks depend
    on the register file, `vectors` vectors of 16 floats (`_block_shape`; the same results
    whatever the blocks). With AVX-512, columns go in blocks of 64 (4-6
    outputs per call), then 32 (5-8 per call) and 16 (5-12: with one weight vector a call, more
    outputs keep more chains of fused multiply-adds in flight); with `narrow` in blocks of 32
    from the start (7-8 outputs a call read each weight once where 64 columns take 4: half the
    weight traffic per output). A row shorter than a block goes in one call of its length
    (2-3 pixels on 64 columns, 2-4 on 16-32): one pixel per call would leave the
    multiply-adds waiting on their own chains, and read each weight once per pixel.

    With `row_len` the outputs are a run of conv pixels over several output rows of row_len
    pixels: output i at column col0 + i counted on into the next rows, its input `jump` floats
    further at each row end. Blocks then run over row ends (`_mk_wrapped`), so rows shorter
    than a block still fill blocks. (Its default is None, not 0: numba prunes the branches on
    `row_len is None` where it is left out, so the wrapping blocks are compiled only into the
    callers of runs.)

    With `bias` (None, pruned the same way, where left out) the outputs are act(sum +
    bias[bias_at + j]), act 1 ReLU or linear (`_mk_fused`): the tile is then the layer's
    output. Not with `row_len` or B in strips."""
    c = 0
    while c < width:
        nv, lo, hi = _block_shape(count, width - c, narrow, vectors, strip != 16)
        # the fewest calls of at most `hi` outputs, as even as can be (16 outputs: 6 + 5 + 5,
        # not 4 x 4); a short row in one call. Against the fewest recomputed outputs in blocks
        # of one size (16: 4 x 4), the direct and Winograd layers of five bench models took
        # 0.86-1.02x the time, 0.96x in the median (AMD Zen 3, one process, 8 and 32 images)
        calls = 1 if count < lo else (count + hi - 1) // hi
        i = 0
        col = col0  # with `row_len`: output i's column, and the input jumps before it
        jumps = 0
        while i < count:
            R = (count - i + calls - 1) // calls
            calls -= 1
            t = t_off + i * ldc + c
            b = b_off + c // 16 * strip
            o = a_off + i * lda + jumps
            if bias is not None:
                _mk_fused(
                    R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more, bias,
                    bias_at + c, act,
                )  # fmt: skip
            elif row_len is not None and col + R > row_len:
                _wrapped_call(
                    R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more, col,
                    row_len, jump, strip,
                )  # fmt: skip
            elif nv > 1 and strip != 16:
                _mk_strips(
                    R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more, strip
                )
            else:
                _mk_call(R, nv, xf, o, lda, a_step, kh, seg, wf, b, ldb, tile, t, ldc, more)
            i += R
            if row_len is not None:
                col += R
                while col >= row_len:
                    col -= row_len
                    jumps += jump
        c += 16 * nv
