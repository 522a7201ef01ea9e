"""Dense layers (float32): `out = act(x @ W + b)` on the micro-kernels, a batch row as a pixel
of a 1x1 convolution. Weights are packed by the plan (`layers.dense`) in blocks of 64 units.
"""

from __future__ import annotations

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.atomics import atomic_add, atomic_load, atomic_swap, spin_pause
from convserve.core.kernels.elementwise import _softmax_rows, _store_curved, _store_row
from convserve.core.kernels.gemm import REGISTER_VECTORS, WIDE, _conv_row
from convserve.core.kernels.ir import (
    SEGMENTS,
    _mk1x1,
    _mk1x2,
    _mk1x3,
    _mk1x4,
    _mk1x4s,
    _mk1x5p,
    _mk1x6p,
    _mk1x7p,
    _mk1x8,
    _mk2x2s,
    _mk3x2s,
    _mk4x2s,
    _mk4x4s,
    _mk5x2s,
    _mk5x4s,
    _mk6x2s,
    _mk6x4s,
    _mk7x2s,
    _mk8x2s,
    _mks1,
    _mks2,
    _mks3,
    _mks4,
    _mks5,
    _mks6,
    _mkt2,
    _mkt3,
    _mkt4,
    _mkt5,
    _mkt6,
)
from numba import njit, prange

# Most batch rows per dense task: they share each pass over a block of weights. A model of
# dense layers only runs up to this many rows at once (`inference.ROWS_CHUNK`).
MAX_TASK_ROWS = 256
# Inputs (weight rows) per pass over a 64-unit block in the `passes` variant: each micro-kernel
# call of a task's rows then reads at most this many rows of 64 weights (32 KB), which stay in
# L1 while every row of the task passes over them (a single row reads each weight once: no
# passes then). Every output stays one in-order chain of fused multiply-adds (a pass adds to
# what the previous one stored), so results do not change. 128 ran fastest of 64, 128, 192, 256
# and no passes on an Intel Xeon; on AMD Zen 5 one pass ran 5-13 % faster from 4 rows on
# (BENCHMARKS.md, "Dense weight passes"), so the planner times both (`layers.dense`).
K_CHUNK = 128
# Most rows a task takes through a block in passes when its input rows are 4 KB apart (K a
# multiple of 1,024): every row's part of a pass then falls in the same 8 L1 sets, and over
# more rows they evict the pass's weights. On an Intel Xeon, wide_dense with its 1,024 -> 512
# layer in passes took 0.98-0.99x the time with that layer in one pass at 8-64 rows a task,
# 1.01x at 128 and 1.04x at 256 (one process, interleaved).
ALIASED_PASS_ROWS = 64
SIX = 6  # rows per micro-kernel call on 64 units (the widest block with all its accumulators)
# Most bytes of inputs a task's rows take through all its units before the next rows (at least
# 12 rows): 256 rows of 784 inputs (784 KB) did not stay in a 512 KB L2 while 16-unit weight
# strips passed over them. In groups of 36-42 rows (128 KB), wide_dense's and the tanh MLP's
# first two layers at 256 rows took 0.88-1.02x the time in four runs, medians 0.94-1.00x per
# layer; 64 and 96 KB ran alike (AMD Zen 3, one process per run, old and new interleaved).
ROW_BLOCK_BYTES = 128 * 1024
# Most rows of a task whose parts (`dense`) are ranges of whole 16 units with all the rows, in
# blocks of 64 with AVX-512, rather than runs of (block, SIX rows) cells. mlp_tanh's 784 -> 300
# layer on an Intel Xeon, two threads: at 8 rows 16.4-17.0 us against 18.2 (the cells gave the
# threads 2 1/2 blocks each, the one with the last block of 44 units the slower); at 12 rows
# (two calls of 6 rows per block either way) no faster.
FEW_ROWS = 8
# Most units per batch row of a layer whose tasks split the rows rather than the units. Split by
# rows, each thread reads all the weights (K x units) but only its rows of the input, which the
# layer before left in its own cache when it split by rows too; split by units, each thread
# reads half the weights and all the input, half of it from the other core's cache. With a
# byte from the other core counted twice, rows win at up to 2 units a row. On an Intel Xeon,
# two threads, four alternating processes each: mlp_tanh (784 -> 300 -> 100 -> 10; its 100
# units split by rows from 64 rows, its 300 from 160) at 64 / 128 / 256 rows took 145-148 /
# 273-280 / 520-524 us against 150-158 / 292-301 / 559-573 by units; wide_dense (1,024 and 512
# units) at 256 rows 2,264-2,273 against 2,325-2,368 us; the conv models' dense heads
# 0.97-1.01x.
UNITS_PER_ROW = 2


def dense_tasks(n: int, blocks: int, threads: int, whole_rows: bool) -> tuple[int, int]:
    """(rows per task, ranges of 64-unit blocks per task's rows) for `dense` on n rows and
    `blocks` blocks: at least one task per thread, by ranges of units where the layer has more
    than UNITS_PER_ROW units (rounded up to 64) a row (each thread then reads only its share of
    the weights), else by groups of rows. `whole_rows` (softmax): no ranges."""
    groups = -(-n // MAX_TASK_ROWS)
    ways = 1
    by_rows = whole_rows or 64 * blocks <= UNITS_PER_ROW * n
    while not by_rows and groups * ways < threads and ways * 2 <= blocks:
        ways *= 2
    if groups * ways < threads:
        groups = min(threads, -(-n // SIX))
    per = -(-n // groups)
    return (min(MAX_TASK_ROWS, -(-per // SIX) * SIX) if per > SIX else per), ways


def tile_floats() -> int:
    """Per-thread scratch of `dense`: one 64-unit block of a task's outputs."""
    return MAX_TASK_ROWS * 64


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _store_units(tile, bias, of, o, U, n, count, act):
    """of[o + i*U + j] = act(tile[i*64 + j] + bias[j]) for n rows i and j < count: the stores
    of every path but the one for at most 16 units. tanh and sigmoid by `_store_curved`, so
    that a row's values are the same bits whichever path and part of a block it went through
    (`_one_row` splits blocks between threads); one loop of rows each way (a call in the
    loop of the others slowed them: wide_dense at 8 images, 124-136 us against 119-120)."""
    if act == 2 or act == 3:
        _store_curved(tile, 64, bias, of, o, U, n, count, act)
    else:
        for i in range(n):
            _store_row(tile, i * 64, bias, of, o + i * U, 0, count, act)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _segmented_rows(xf, a_off, K, wf, tile, count, ldb, vectors=REGISTER_VECTORS):
    """tile[i*64 + j] = row i's sums (from xf[a_off + i*K]) for 16 units of wf (K rows, ldb
    floats apart: a row of fewer units reads on into the next one, and the lanes past them are
    dropped by the caller), i < count <= SIX, each as `ir.SEGMENTS` chains added at the end.
    The parts one after another (`ir._mkt2`...; the same bits) for 2 rows or more when the
    count x SEGMENTS chains together and the SEGMENTS weight vectors the rows share would not
    fit in `vectors` registers of 16 floats (`gemm.REGISTER_VECTORS`; 8 with AVX2: on an AMD
    Zen 3, 3 rows of 4,000 inputs took 5.8 us in turn, 8.5 together; 2 rows of 128-8,192
    inputs, whose 8 chains filled AVX2's registers and spilled, 0.66-1.05x the time in turn,
    0.83x typically), or, from 4 rows, when the parts are a multiple of 4 KB (an L1 way: their
    input streams would share the same sets)."""
    part = K // SEGMENTS
    crowded = (count + 1) * SEGMENTS > vectors
    aliased = count >= 4 and part > 0 and part % 1024 == 0
    if count >= 2 and (crowded or aliased):
        if count == 6:
            _mkt6(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
        elif count == 5:
            _mkt5(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
        elif count == 4:
            _mkt4(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
        elif count == 3:
            _mkt3(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
        else:
            _mkt2(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    elif count == 6:
        _mks6(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    elif count == 5:
        _mks5(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    elif count == 4:
        _mks4(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    elif count == 3:
        _mks3(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    elif count == 2:
        _mks2(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)
    else:
        _mks1(xf, a_off, K, K, wf, 0, ldb, tile, 0, 64)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _strips_call(R, nv, xf, a, K, wf, b, tile, t):
    """One micro-kernel call of R rows (K inputs apart, from xf[a]) x nv strips of 16 units
    (2: R = 3-8; 4: R = 4-6) over K inputs, the strips' rows from wf[b], 16 floats apart and
    each strip 16*K floats after the one before; the sums at tile[t + i*64]."""
    s = 16 * K
    if nv == 4:
        if R == 6:
            _mk6x4s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
        elif R == 5:
            _mk5x4s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
        else:
            _mk4x4s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    elif R == 8:
        _mk8x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    elif R == 7:
        _mk7x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    elif R == 6:
        _mk6x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    elif R == 5:
        _mk5x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    elif R == 4:
        _mk4x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)
    else:
        _mk3x2s(xf, a, K, 0, 1, K, wf, b, 16, tile, t, 64, 0, s)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _strip_groups(xf, wf, bias, tile, of, r0, n, K, U, c0, c1, act, reverse):
    """`_strip_rows` for 3 rows or more with AVX-512's 32 registers, all K inputs in one pass.
    Up to 8 rows: all of them in one call per pair of strips (16 accumulators), so each weight
    is read once a run. In blocks of 64 units, 7-8 rows take two calls a block, and the second
    finds the weights in cache only after the first has streamed them in: on an Intel Xeon,
    784 x 1,024 units at 8 rows on one thread, weights from L3, took 119 us in pairs of strips
    (114 us at one row) against 172 us in blocks of 64 (in passes; 166 us with the second call
    prefetching the next pass); wide_dense at 8 images, two threads: 100-102 us against 122-126
    us. More rows: four strips 4-6 rows a call (24 accumulators), 0.99-1.05x the time of blocks
    of 64 in one pass at 64 and 256 rows in wide_dense and the tanh MLP (passes of K_CHUNK
    inputs took 1.05-1.07x the time of one pass; pairs of strips 1.07-1.15x; four strips 4 rows
    a call 1.09-1.13x); the 2-3 strips left go as a pair and a single strip."""
    few = n <= 8
    wide = 2 if few else 4  # strips per group
    strips = (c1 - c0 + 15) // 16
    fulls = strips // wide
    pair = 1 if strips - fulls * wide >= 2 else 0
    single = (strips - fulls * wide - 2 * pair) & 1
    groups = fulls + pair + single
    for j in range(groups):
        g = groups - 1 - j if reverse else j
        nv = wide if g < fulls else (2 if g < fulls + pair else 1)
        c = c0 + 16 * (wide * min(g, fulls) + (2 if g > fulls and pair else 0))
        if nv == 1:
            _conv_row(xf, r0 * K, K, 0, 1, K, wf, c * K, 16, tile, 0, 64, n, 16)
        else:
            top = 8 if nv == 2 else 6  # rows a call: 16 or 24 accumulators
            calls = (n + top - 1) // top
            i = 0
            while i < n:  # the fewest calls, as even as can be
                R = (n - i + calls - 1) // calls
                calls -= 1
                _strips_call(R, nv, xf, (r0 + i) * K, K, wf, c * K, tile, i * 64)
                i += R
        last = min(c + 16 * nv, U)
        _store_units(tile, bias[c:], of, r0 * U + c, U, n, last - c, 0 if act == 4 else act)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _strip_rows(xf, wf, bias, tile, of, r0, n, K, U, c0, c1, act, reverse):
    """`_dense_block` on weights in blocks of 16 units (`strips`), all K inputs in one pass: per
    block, the rows go through it 4-6 a call (16 columns: AVX2's largest block that keeps its
    accumulators in registers), reading one contiguous stream of weights; one row takes four
    blocks a call and two rows two (`ir._mk1x4s`, `ir._mk2x2s`), for more chains in flight. On
    an AMD Zen 3 (AVX2), one thread's 252 rows x 784 inputs x 512 units ran at 94 GFLOP/s in
    blocks of 16 and 78 in blocks of 64 (their 16-unit parts read 256 bytes apart).
    `reverse`: the same calls, last first (`dense`). With AVX-512, 3 rows or more:
    `_strip_groups`."""
    if WIDE and n >= 3:
        _strip_groups(xf, wf, bias, tile, of, r0, n, K, U, c0, c1, act, reverse)
        return
    wide = 64 if n == 1 else (32 if n == 2 else 16)  # units of the calls before the 16s
    firsts = (c1 - c0) // wide if wide > 16 else 0
    calls = firsts + (c1 - c0 - firsts * wide + 15) // 16
    for j in range(calls):
        k = calls - 1 - j if reverse else j
        c = c0 + k * wide if k < firsts else c0 + firsts * wide + (k - firsts) * 16
        w = wide if k < firsts else 16
        if w == 64:
            _mk1x4s(xf, r0 * K, K, 0, 1, K, wf, c * K, 16, tile, 0, 64, 0, 16 * K)
        elif w == 32:
            _mk2x2s(xf, r0 * K, K, 0, 1, K, wf, c * K, 16, tile, 0, 64, 0, 16 * K)
        else:
            # all K inputs in one pass, also for 7-12 rows (two calls a block): passes of 256
            # inputs, whose weights the second call would find in L1, took 1.02-1.11x the time
            # in wide_dense's and vgg_cifar's dense layers at 7-12 rows on two threads (Zen 3)
            _conv_row(xf, r0 * K, K, 0, 1, K, wf, c * K, 16, tile, 0, 64, n, 16)
        last = min(c + w, U)
        _store_units(tile, bias[c:], of, r0 * U + c, U, n, last - c, 0 if act == 4 else act)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _dense_rows(xf, wf, bias, tile, out, r0, r1, c0, c1, act, k_pass, block, reverse):
    """`_dense_block` on rows r0..r1-1; with weights in strips of 16 units (`block` 16), in
    groups of rows whose inputs take at most ROW_BLOCK_BYTES (at least 12 rows, a multiple of
    SIX, as even as can be), each group through all units c0..c1-1 before the next: the group's
    inputs then stay in L2 while every strip passes over them. The same sums in the same order,
    so the same bits. (In blocks of 64 units, groups made wide_dense's layers 1.01-1.06x slower
    on a Zen 3, where that layout is not the default: not there; nor with AVX-512, whose
    `_strip_groups` go over all rows per group of strips, as blocks of 64 do.)"""
    K = xf.size // out.shape[0]
    n = r1 - r0
    if block != 16 or WIDE:
        _dense_block(xf, wf, bias, tile, out, r0, r1, c0, c1, act, k_pass, block, reverse)
        return
    most = max(2 * SIX, ROW_BLOCK_BYTES // (4 * K) // SIX * SIX)
    groups = (n + most - 1) // most
    even = (n + groups - 1) // groups
    per = (even + SIX - 1) // SIX * SIX
    for q in range(r0, r1, per):
        q1 = min(r1, q + per)
        _dense_block(xf, wf, bias, tile, out, q, q1, c0, c1, act, k_pass, block, reverse)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _one_row(xf, wf, bias, tile, of, r, K, U, u0, u1, act, reverse):
    """Row r's units u0..u1-1 (multiples of 16) on weights in blocks of 64, with AVX-512: each
    block's part in one call of all its vectors (a last block of 48 units in one pass, not
    a pass of 32 and one of 16: one row's chains of fused multiply-adds wait on themselves,
    so each pass takes at least K of their latencies), and two whole blocks a call (eight
    chains in flight, two weight streams; on Zen 5, 784 x 1024 units: 19.7 us instead of
    22.3; 400 x 128 on one thread: 1.60 instead of 2.47), or a whole block and the layer's
    narrower last one (`ir._mk1x7p`...: 100 units as 64 + 48 in one pass; 1.69 us a call
    instead of 1.77 at 300 inputs, Intel Xeon). Starting and ending at any 16, a part of a
    block reads its units' columns of the block's rows. `reverse`: the last block first
    (`dense`). mlp_tanh at one image on an Intel Xeon, its 784 -> 300 layer on two
    threads: 128 and 176 units, the last 48 in two passes, before; the forward pass took
    12.9-13.2 us against 13.9-14.4."""
    Up = bias.size
    b0 = u0 // 64
    steps = (u1 + 63) // 64 - b0
    j = 0
    while j < steps:
        b = b0 + (steps - 1 - j if reverse else j)
        w = min(64, Up - 64 * b)  # block b: K rows of w units from wf[64 * b * K]
        c = max(u0, 64 * b)
        width = min(u1, 64 * b + w) - c
        lo = min(b, b - 1 if reverse else b + 1)  # the lower of block b and the next one
        top = min(64, Up - 64 * lo - 64)  # the upper one's units (narrower when it is the last)
        if j + 1 < steps and u0 <= 64 * lo and 64 * lo + 64 + top <= u1:  # both in the part
            c = 64 * lo
            if top == 64:
                _mk1x8(xf, r * K, K, 0, 1, K, wf, c * K, 64, tile, 0, 128, 0, 64 * K)
            elif top == 48:
                _mk1x7p(xf, r * K, K, 0, 1, K, wf, c * K, 64, tile, 0, 128, 0, 64 * K, 48)
            elif top == 32:
                _mk1x6p(xf, r * K, K, 0, 1, K, wf, c * K, 64, tile, 0, 128, 0, 64 * K, 32)
            else:
                _mk1x5p(xf, r * K, K, 0, 1, K, wf, c * K, 64, tile, 0, 128, 0, 64 * K, 16)
            width = 64 + top
            j += 2
        else:
            off = 64 * b * K + c - 64 * b
            if width == 64:
                _mk1x4(xf, r * K, K, 0, 1, K, wf, off, w, tile, 0, 64, 0)
            elif width == 48:
                _mk1x3(xf, r * K, K, 0, 1, K, wf, off, w, tile, 0, 64, 0)
            elif width == 32:
                _mk1x2(xf, r * K, K, 0, 1, K, wf, off, w, tile, 0, 64, 0)
            else:
                _mk1x1(xf, r * K, K, 0, 1, K, wf, off, w, tile, 0, 64, 0)
            j += 1
        _store_units(tile, bias[c:], of, r * U + c, U, 1, min(width, U - c), act)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _dense_block(xf, wf, bias, tile, out, r0, r1, c0, c1, act, k_pass, block, reverse):
    """out[r0:r1, c0:c1] = act(x @ W + b) for units c0..c1-1 (c0 a multiple of 16; units past
    out.shape[1] are computed on zero columns and dropped; a part of a block reads its units'
    columns of the block's rows). Weights in blocks of 64 units: per
    block, per pass of `k_pass` inputs (0: one pass), the conv micro-kernels with a batch row as
    a pixel, SIX rows a call (the last 1-9 rows in one call or two; a single row over two blocks
    a call); with `reverse`, the same calls, the last block first (`dense`). In blocks of 16
    (`block`): `_strip_rows`. At most 16 units (Up = 16; the K rows
    of U units back to back): `_segmented_rows`. Softmax (4) needs c0 = 0, c1 = Up and is left
    to the caller."""
    K = xf.size // out.shape[0]
    Up = bias.size
    U = out.shape[1]
    n = r1 - r0
    six = n // SIX * SIX
    # Rows per call: SIX, then the 1-5 left in one call, whose fewer accumulators wait more on
    # their chains of fused multiply-adds. With 2 or 3 left, the last SIX + 2-3 rows go as
    # 4 + 4 or 5 + 4 instead (on Zen 5, 784 x 1024 units at 8 rows: 38 us instead of 43 with
    # the 2 rows one by one, and 36.5 against 38.0 with them in one call; splitting every batch
    # evenly into 4-6 rows a call made 256 rows 8 % slower).
    bulk = six - SIX if six > 0 and 2 <= n - six <= 3 else six
    left = n - bulk
    first = left - 4 if left > SIX else left  # rows of the first call after the bulk
    aliased = K % 1024 == 0 and n > ALIASED_PASS_ROWS  # rows 4 KB apart: see there
    chunk = K if n == 1 or k_pass == 0 or aliased else k_pass
    of = out.reshape(out.size)
    if Up == 16:  # at most 16 units: each output's sum as SEGMENTS chains (`ir._mks1`...)
        for i in range(0, n, SIX):
            _segmented_rows(xf, (r0 + i) * K, K, wf, tile[i * 64 :], min(SIX, n - i), U)
        for i in range(n):
            _store_row(tile, i * 64, bias, of, (r0 + i) * U, 0, U, 0 if act == 4 else act)
        return
    if block == 16:
        _strip_rows(xf, wf, bias, tile, of, r0, n, K, U, c0, c1, act, reverse)
        return
    if WIDE and n == 1:  # (eight accumulators of 16 floats fill AVX2's whole register file)
        _one_row(xf, wf, bias, tile, of, r0, K, U, c0, c1, 0 if act == 4 else act, reverse)
        return
    b0 = c0 // 64
    steps = (c1 + 63) // 64 - b0
    for j in range(steps):
        blk = b0 + (steps - 1 - j if reverse else j)
        w = min(64, Up - 64 * blk)  # block blk: K rows of w units from wf[64 * blk * K]
        c = max(c0, 64 * blk)  # its units c..c+width-1 here
        width = min(c1, 64 * blk + w) - c
        for k0 in range(0, K, chunk):
            kc = min(chunk, K - k0)
            more = 1 if k0 > 0 else 0
            b = 64 * blk * K + k0 * w + c - 64 * blk
            if WIDE and 7 <= n <= 8:  # one call per 32 units: each weight read once, not twice
                _conv_row(xf, r0 * K + k0, K, 0, 1, kc, wf, b, w, tile, 0, 64, n, width, more, 1)
                continue
            if bulk > 0:
                _conv_row(xf, r0 * K + k0, K, 0, 1, kc, wf, b, w, tile, 0, 64, bulk, width, more)
            if left > 0:
                a = (r0 + bulk) * K + k0
                _conv_row(xf, a, K, 0, 1, kc, wf, b, w, tile, bulk * 64, 64, first, width, more)
            if left > first:  # the 4 after a first call of 4 or 5
                a = (r0 + bulk + first) * K + k0
                t = (bulk + first) * 64
                _conv_row(xf, a, K, 0, 1, kc, wf, b, w, tile, t, 64, 4, width, more)
        last = min(c + width, U)
        _store_units(tile, bias[c:], of, r0 * U + c, U, n, last - c, 0 if act == 4 else act)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _dense_task(xf, wf, bias, tile, out, act, rows, splits, k_pass, block, reverse, t):
    """Task t of `dense` (see there): part t % splits of the work of the group of `rows` rows
    t // splits, with the scratch `tile` of the thread that runs it."""
    N = out.shape[0]
    Up = bias.size
    unit = 16 if block == 16 and not WIDE else 64
    width = (Up + unit - 1) // unit  # blocks
    s = t % splits
    r0 = t // splits * rows
    r1 = min(N, r0 + rows)
    slots = (r1 - r0 + SIX - 1) // SIX
    lo = s * width * slots // splits  # this part's run of (block, slot) cells
    hi = (s + 1) * width * slots // splits
    if r1 - r0 <= FEW_ROWS and WIDE and block == 64:  # parts of whole 16s
        u0 = -(-s * (Up // 16) // splits) * 16  # the first parts the larger
        u1 = -(-(s + 1) * (Up // 16) // splits) * 16
        if u0 < u1:
            _dense_block(xf, wf, bias, tile, out, r0, r1, u0, u1, act, k_pass, block, reverse)
        lo = hi  # no (block, slot) cells for the loop below; the softmax after it still runs
    while lo < hi:
        b = lo // slots
        first = lo - b * slots
        if first == 0 and hi >= (b + 1) * slots:  # whole blocks, as many as the run holds
            end = hi // slots
            c1 = min(Up, end * unit)
            c0 = b * unit
            _dense_rows(xf, wf, bias, tile, out, r0, r1, c0, c1, act, k_pass, block, reverse)
            lo = end * slots
        else:  # some rows of block b
            last = min(slots, hi - b * slots)
            q0 = r0 + first * SIX
            q1 = min(r1, r0 + last * SIX)
            c1 = min(Up, b * unit + unit)
            c0 = b * unit
            _dense_rows(xf, wf, bias, tile, out, q0, q1, c0, c1, act, k_pass, block, reverse)
            lo = b * slots + last
    if act == 4:
        _softmax_rows(out, r0, r1)


def dense(x, wk, bias, tiles, out, act, rows, splits, k_pass, block, turn) -> None:
    """out = act(x @ W + b), in passes of `k_pass` inputs (0: one pass; see
    K_CHUNK). On an odd `turn[0]` each task goes through its blocks of weights from the last
    (the caller counts its runs there): the blocks it read last in the run before are the
    likeliest still in cache. A layer's or a model's weights larger than the cache thrash it
    when read in the same order every run, as a cyclic stream evicts each block just before
    its next use; wide_dense's 5 MB of weights at one image on an Intel Xeon (2 MB L2 a core)
    took 66 us a run in alternating order, 80 us in one order.
    x: (N, K) C-contiguous; wk: the weights in blocks of `block` (64 or 16) units (the
    last block narrower), each K rows of its units, contiguous, Up the units rounded up to 16
    (zero columns; at most 16 units: the K rows of U units back to back, 16 - U zeros after;
    `layers.dense.pack_dense`); bias: Up floats; out: (N, U). Tasks: (group of `rows` rows,
    part of its work), `splits` parts per group (`dense_tasks`; softmax needs whole rows:
    splits=1).
    A group's work is its blocks x its rows in slots of SIX, block by block; each part takes an
    equal run of it: whole blocks, and where a run starts or ends inside a block, some of that
    block's rows. So 19 strips of 16 units (300 units) go as 9.5 and 9.5, not 10 and 9 (with
    AVX-512, strips are split as blocks of 64 units are, in groups of four strips, so that no
    part is left single strips: `_strip_groups`). With AVX-512, a task of at most FEW_ROWS
    rows in blocks of 64 splits at any 16 units instead, each part with all the rows:
    mlp_tanh's 300 units (304 packed) at one row go as 160 and 144, not as 2 and 3 blocks of
    64 (`_one_row`).
    tiles: (threads, >= rows*64).
    Every output is one in-order chain of fused multiply-adds over K (four, added at the end,
    for at most 16 units), whatever the batch size or the task it falls in, so a row's result is
    bit-identical alone and in any batch.
    One layer on every numba thread: `dense_chain` with a table of one row (as
    `layers.dense.DenseStep` emits it), so that one parallel dense kernel is compiled."""
    row = chain_row(x.shape[0], out.shape[1], wk.size, bias.size, act, k_pass, block, rows, splits)
    table = np.array([row], np.int64)
    counters = np.zeros(1 + row[_TASKS], np.int64)
    parts = numba.get_num_threads()
    dense_chain(x, wk, bias, NO_SCRATCH, out, table, tiles, counters, parts, turn)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def dense_serial(x, wk, bias, tiles, out, act, k_pass, block, turn):
    """`dense` on the calling thread only, for layers too small to pay for a parallel region
    (the same micro-kernel calls, so the same results)."""
    N = x.shape[0]
    reverse = turn[0] & 1
    Up = bias.size
    xf = x.reshape(x.size)
    wf = wk.reshape(wk.size)
    # A literal 0 would compile every function below a second time, for a constant c0
    c0 = np.int64(0)
    for r0 in range(0, N, MAX_TASK_ROWS):
        r1 = min(N, r0 + MAX_TASK_ROWS)
        _dense_rows(xf, wf, bias, tiles[0], out, r0, r1, c0, Up, act, k_pass, block, reverse)
        if act == 4:
            _softmax_rows(out, r0, r1)


# The columns of `dense_chain`'s table, one row per layer: its units; where its
# packed weights and bias start in the chain's arrays, and how many floats they take; its
# activation, `k_pass` and `block` (as `dense` takes them); its tasks as `dense` splits them
# (a layer `dense_serial` would run: groups of MAX_TASK_ROWS rows, one part each, the same
# calls), their count, and where their claim flags start in the counters; where its output
# starts in the scratch of activations.
CHAIN_COLUMNS = (
    "units",
    "weights_at",
    "weights",
    "bias_at",
    "bias",
    "act",
    "k_pass",
    "block",
    "rows",
    "splits",
    "tasks",
    "claims_at",
    "output_at",
)
(
    _UNITS,
    _WEIGHTS_AT,
    _WEIGHTS,
    _BIAS_AT,
    _BIAS,
    _ACT,
    _K_PASS,
    _BLOCK,
    _ROWS,
    _SPLITS,
    _TASKS,
    _CLAIMS_AT,
    _OUTPUT_AT,
) = range(len(CHAIN_COLUMNS))
NO_SCRATCH = np.zeros(16, np.float32)  # the scratch of a chain of one layer, which needs none


def chain_row(
    n: int,
    units: int,
    weights: int,
    bias: int,
    act: int,
    k_pass: int,
    block: int,
    rows: int,
    splits: int,
    weights_at: int = 0,
    bias_at: int = 0,
    claims_at: int = 1,
    output_at: int = 0,
) -> list[int]:
    """A layer's row of `dense_chain`'s table (CHAIN_COLUMNS) at n rows: `rows` to a group of
    rows, `splits` parts a group, a task each; the defaults place a chain of this layer alone."""
    tasks = -(-n // rows) * splits
    columns = {
        "units": units,
        "weights_at": weights_at,
        "weights": weights,
        "bias_at": bias_at,
        "bias": bias,
        "act": act,
        "k_pass": k_pass,
        "block": block,
        "rows": rows,
        "splits": splits,
        "tasks": tasks,
        "claims_at": claims_at,
        "output_at": output_at,
    }
    return [columns[name] for name in CHAIN_COLUMNS]


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _chain_part(part, parts, x, wk, bias, acts, out, table, tiles, counters, reverse):
    """Part `part` of `parts` of `dense_chain`, layer by layer: the tasks `dense` would give
    this part first, then any task no part has claimed yet; then it waits until every task of
    the layer is done (counters[layer]) before the next layer reads its output. A part that
    finds every task claimed only waits, so no part waits on work that no running thread will
    do, whether the parts run side by side or one after another on fewer threads."""
    N = x.shape[0]
    layers = table.shape[0]
    src = x.reshape(x.size)
    for layer in range(layers):
        row = table[layer]
        w0, b0 = row[_WEIGHTS_AT], row[_BIAS_AT]
        wf = wk[w0 : w0 + row[_WEIGHTS]]
        b = bias[b0 : b0 + row[_BIAS]]
        if layer == layers - 1:
            dst = out
        else:
            o = row[_OUTPUT_AT]
            dst = acts[o : o + N * row[_UNITS]].reshape((N, row[_UNITS]))
        act, k_pass, block, rows, splits = (
            row[_ACT],
            row[_K_PASS],
            row[_BLOCK],
            row[_ROWS],
            row[_SPLITS],
        )
        tasks, claims = row[_TASKS], row[_CLAIMS_AT]
        first = part * tasks // parts
        for j in range(tasks):
            t = (first + j) % tasks
            if atomic_swap(counters, claims + t, 1) == 0:
                tile = tiles[numba.get_thread_id()]
                _dense_task(src, wf, b, tile, dst, act, rows, splits, k_pass, block, reverse, t)
                atomic_add(counters, layer, 1)
        if layer < layers - 1:
            while atomic_load(counters, layer) < tasks:
                spin_pause()
            src = dst.reshape(dst.size)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def dense_chain(x, wk, bias, acts, out, table, tiles, counters, parts, turn):
    """Consecutive dense layers in one parallel region, each as `dense` (or `dense_serial`)
    would compute it, so with the same bits: a parallel region and a kernel call from Python
    cost microseconds, which at a few rows is much of a layer's time (mlp_tanh's three layers
    on an Intel Xeon, one process, interleaved: 0.90-0.94x the time of three kernels at 8
    images, 0.91-0.97x at one, 0.97-0.99x at 64 and 256).
    x: the first layer's input (N, K) C-contiguous; wk, bias: every layer's packed
    weights and bias (`layers.dense.pack_dense`) one after another; acts: scratch for the
    layers' outputs but the last; out: (N, units of the last); table: a row per layer
    (CHAIN_COLUMNS); counters: int64, a done count per layer, then the claim flags of every
    layer's tasks (all set to 0 here); parts: as many as numba's threads (the program's
    count: numba's own count read here would keep this kernel out of numba's disk cache);
    tiles and turn as `dense` takes them."""
    for i in range(counters.size):
        counters[i] = 0
    reverse = turn[0] & 1
    for part in prange(parts):
        # an int64 as the parallel loop's own typing passes it (its index is unsigned there):
        # otherwise numba compiles `_chain_part` and all below it twice (12 s more)
        _chain_part(np.int64(part), parts, x, wk, bias, acts, out, table, tiles, counters, reverse)
