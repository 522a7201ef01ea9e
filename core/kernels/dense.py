"""Dense layers (float32): `out = act(x @ W + b)` on the micro-kernels, a batch row as a pixel
of a 1x1 convolution. Weights are packed by the plan (`layers.dense`) in blocks of 64 units.
"""

from __future__ import annotations

import numba
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _softmax_row, _store_row
from convserve.core.kernels.gemm import _conv_row
from numba import njit, prange

DENSE_ROWS = 32  # batch rows per dense task: they share each stripe of weights (see below)
# Weight bytes a stripe of units may take: the stripe stays in a core's L2 cache (1-2 MB on
# today's x86 server cores) while every row of the task passes over it. One 64-unit block of a
# large layer (8,192 inputs: 2 MB) would stream from L3 once per few rows and make a batch
# memory-bound.
STRIPE_BYTES = 1 << 20
# Inputs (weight rows) per pass over a stripe: each micro-kernel call of a task's rows then reads
# at most this many rows of w weights, which stay in L1 for the next call instead of streaming
# from L2 every time (a single row reads each weight once: no chunks then). Every output stays
# one in-order chain of fused multiply-adds (a pass adds to what the previous one stored), so
# results do not change. 128 ran fastest of 64, 128, 192, 256 and no passes (BENCHMARKS.md,
# "Dense weight passes").
K_CHUNK = 128


@njit(fastmath=True, cache=True, nogil=True)
def _stripe(K, w):
    """Units per weight stripe of a w-unit block (w a multiple of 16): 64, 32 or 16, the widest
    whose K rows fit STRIPE_BYTES (16 at least)."""
    s = min(64, w)
    while s > 16 and K * s * 4 > STRIPE_BYTES:
        s //= 2
    return s


@njit(fastmath=True, cache=True, nogil=True)
def _dense_block(xf, wf, bias, tile, out, r0, r1, c0, c1, act):
    """out[r0:r1, c0:c1] = act(x @ W + b) for units c0..c1-1 (c0 a multiple of 64; units past
    out.shape[1] are computed on zero columns and dropped): the conv micro-kernels with one
    segment of K taps, a batch row as a pixel, all rows over one stripe of units at a time.
    Softmax (4) needs c0 = 0 and c1 = Up."""
    K = xf.size // out.shape[0]
    Up = wf.size // K
    U = out.shape[1]
    # weight block of units c..c+w-1: K rows of w contiguous floats from wf[c*K]
    for c in range(c0, c1, 64):
        w = min(64, Up - c)
        stripe = _stripe(K, w)
        for s in range(0, w, stripe):
            width = min(stripe, w - s)
            chunk = K if r1 - r0 == 1 else K_CHUNK
            for k0 in range(0, K, chunk):
                _conv_row(
                    xf,
                    r0 * K + k0,
                    K,
                    0,
                    1,
                    min(chunk, K - k0),
                    wf,
                    c * K + k0 * w + s,
                    w,
                    tile,
                    c + s,
                    Up,
                    r1 - r0,
                    width,
                    1 if k0 > 0 else 0,
                )
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
