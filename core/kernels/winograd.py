"""Winograd convolution (NHWC, float32) for stride-1 layers: F(2x2, 3x3), F(4x4, 3x3) and
F(2x2, 5x5). Per m x m block of outputs (a tile) and channel pair, alpha*alpha products
(alpha = m + r - 1) instead of m*m*r*r: 16 instead of 36 (F(2x2, 3x3)), 36 instead of 144
(F(4x4, 3x3)), 36 instead of 100 (F(2x2, 5x5)). The input and output transforms are IR emitted
from their matrices (`winograd_transforms`): 16 channels at a time, one by one for the input's
last channels; the products are GEMMs on the micro-kernels (`gemm._conv_row`). A fused 2x2/2
max or average pool takes (m/2 x m/2) pooled outputs from each tile. A stride-2 conv with a
kernel of 4-6 a side runs as a 3x3 stride-1 one over its input's four 2x2 phases, and a
stride-1 kernel of another size (2x2, 4x4, 5x5, 7x7, ...) as a sum of 3x3 ones over shifted inputs:
the input's views (`views`), read in place.
"""

from __future__ import annotations

import numba
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.elementwise import _QUARTER, _act
from convserve.core.kernels.gemm import _conv_row
from convserve.core.kernels.tasks import row_task
from convserve.core.kernels.winograd_transforms import (
    F2X2_3X3,
    F2X2_5X5,
    F4X4_3X3,
    input_transform,
    output_transform,
)
from numba import njit, prange

# the input transform depends on the points only: 6x6 tiles share one
assert F4X4_3X3.bt == F2X2_5X5.bt
_IN4 = input_transform(F2X2_3X3, 16)
_IN4_ONE = input_transform(F2X2_3X3, 1)
_IN6 = input_transform(F2X2_5X5, 16)
_IN6_ONE = input_transform(F2X2_5X5, 1)
_OUT_F23 = output_transform(F2X2_3X3)
_OUT_F25 = output_transform(F2X2_5X5)
_OUT_F43 = output_transform(F4X4_3X3)
EDGE_FLOATS = 16 * 4 * 4  # an m x m tile of 16 channels, m <= 4

# No fastmath in this module's functions (the GEMMs, `gemm._conv_row`, have it): numba's fastmath
# marks every float operation of a function, the transforms' IR included, and LLVM may then
# compute an output differently in the versions of a loop it picks at run time (by whether two
# arrays overlap), so its last bit depended on the buffers' addresses, and so on the batch
# (found by tests/test_kernels_winograd.py; main's F(2x2, 3x3) kernel had it too).


@njit(inline="always", error_model="numpy", cache=True, nogil=True)
def _output_block(alpha, size, mf, m, step, bias, co, of, o, ldx, ldy, pool, relu):
    """The output transform of 16 channels of one tile (`output_transform`) for tile side
    `alpha` and output side `size`."""
    if size == 4:
        _OUT_F43(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)
    elif alpha == 6:
        _OUT_F25(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)
    else:
        _OUT_F23(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)


@njit(error_model="numpy", cache=True, nogil=True)
def _wino_input(xf, base, row, C, TW, vf, alpha, size, first, step, views):
    """Input transform of one row of tiles of side `alpha` (4 or 6), `size` outputs apart, as
    tiles first..first+TW-1 in `vf`: for tile tx (the alpha x alpha input pixels from column
    size*tx of the rows starting at xf[base], `row` floats apart, C channels) and channel c,
    vf[p*step + (first + tx)*CI + c] = (B^T d B)[p]: 16 channels at a time, then one by one.
    `views` = (gh, gw, shift, down): a tile reads gh x gw views of the input (CI = gh*gw*C),
    view (a, b) from `shift`*a rows and `shift`*b pixels further, every `down`-th pixel of
    every `down`-th row; its channels are the tile's channels (a*gw + b)*C + c. One view (1,
    1, 0, 1) is the plain input. A stride-2 conv over the input's 2x2 phases: (2, 2, 1, 2).
    A stride-1 kernel split in 3x3 blocks (`conv_wino`): (gh, gw, 3, 1). The views are read
    in place, not copied."""
    gh, gw, shift, down = views
    vec_end = C // 16 * 16
    for tx in range(TW):
        for g in range(gh * gw):
            o = base + down * size * tx * C + (g // gw) * shift * row + (g % gw) * shift * C
            q = ((first + tx) * gh * gw + g) * C
            for c in range(0, vec_end, 16):
                if alpha == 6:
                    _IN6(xf, o + c, down * C, down * row, vf, q + c, step)
                else:
                    _IN4(xf, o + c, down * C, down * row, vf, q + c, step)
            for c in range(vec_end, C):
                if alpha == 6:
                    _IN6_ONE(xf, o + c, down * C, down * row, vf, q + c, step)
                else:
                    _IN4_ONE(xf, o + c, down * C, down * row, vf, q + c, step)


@njit(error_model="numpy", cache=True, nogil=True)
def _edge_outputs(edge, size, act, of, o, row, CO, width, rows, cols, pool, average):
    """The valid outputs of a tile of `size` x `size` outputs of 16 channels held in `edge`
    (Y + bias, rows 16*size floats apart): activated, pooled over 2x2 windows with `pool`
    (max, or the mean of activated values with `average`) and written for `rows` x `cols`
    (pooled) outputs and `width` channels at of[o + y*row + x*CO + j]."""
    if not (pool and not average):  # a max pool activates its maximum only
        for j in range(16 * size * size):
            edge[j] = _act(edge[j], act)
    for y in range(rows):
        for x in range(cols):
            at = o + y * row + x * CO
            if not pool:
                e = 16 * (y * size + x)
                for j in range(width):
                    of[at + j] = edge[e + j]
                continue
            e = 32 * (y * size + x)  # the window's top left: Y[2y][2x]
            d = 16 * size  # the next row of Y
            if average:
                for j in range(width):
                    pair = (edge[e + j] + edge[e + 16 + j]) + (
                        edge[e + d + j] + edge[e + d + 16 + j]
                    )
                    of[at + j] = pair * _QUARTER
            else:
                for j in range(width):
                    top = max(
                        max(edge[e + j], edge[e + 16 + j]),
                        max(edge[e + d + j], edge[e + d + 16 + j]),
                    )
                    of[at + j] = _act(top, act)


@njit(error_model="numpy", cache=True, nogil=True)
def _wino_output(
    mf, TW, COp, c0, c1, bias, act, of, o_row, row, CO, pool, average, rows, cols, edge, alpha,
    size, first, step
):  # fmt: skip
    """Output transform of one row of tiles, tiles first..first+TW-1 in `mf`, plus bias and
    activation: tile tx's m x m outputs Y = A^T M A (m = `size`),
    M[p] = mf[p*step + (first + tx)*COp + co]. A tile covers `per` output rows
    and columns (m, or m/2 pooled ones with `pool`: the max of each 2x2 window, with `average`
    the mean of its four activated values); this row of tiles has `rows` valid output rows and
    the output `cols` columns, written at of[o_row + y*row + (per*tx + x)*CO + co]. Always 16
    channels at a time (the products have COp columns): straight into `of` for a whole tile of
    16 real channels with ReLU or no activation and no average pool, else through `edge` (m*m*16
    floats) and `_edge_outputs`."""
    hi = min(c1, CO)
    per = size // 2 if pool else size
    for tx in range(TW):
        q = (first + tx) * COp
        o = o_row + per * tx * CO
        width_px = min(per, cols - per * tx)
        direct = act <= 1 and rows == per and width_px == per and not (pool and average)
        for start in range(c0, hi, 16):
            m = q + start
            if direct and start + 16 <= hi:
                _output_block(
                    alpha, size, mf, m, step, bias, start, of, o + start, CO, row, pool, act
                )
                continue
            _output_block(alpha, size, mf, m, step, bias, start, edge, 0, 16, 16 * size, False, 0)
            width = min(16, hi - start)
            _edge_outputs(
                edge, size, act, of, o + start, row, CO, width, rows, width_px, pool, average
            )


@njit(parallel=True, error_model="numpy", cache=True, nogil=True)
def conv_wino(x, u, bias, tiles, out, act, pool, average, splits, size, at, band, views, turn):
    """Stride-1 conv + bias + activation (+ 2x2/2 max pool when `pool`, average pool when also
    `average`) by Winograd's F(m x m, r x r): m = `size` (2 or 4), alpha = m + r - 1 from the
    products in `u` (16: F(2x2, 3x3); 36: F(2x2, 5x5), or F(4x4, 3x3) with size 4).

    x: padded, preprocessed input (N, Hp, Wp, CI) holding every alpha x alpha tile, tiles m
    apart; u: (alpha*alpha, CI, COp) the transformed kernel G g G^T, COp a multiple of 16 (or each
    product's in strips of 16 channels, (alpha*alpha, COp/16 * CI, 16): `gemm.STRIPS`). The
    (OH, OW) outputs, pooled or not, go to out (N, Hb, Wb, CO) from row y0, column x0:
    at = (y0, x0, OH, OW). A tile gives m x m outputs or (m/2 x m/2) pooled ones.
    Tasks: (`band` consecutive rows of tiles of the batch, the images' rows one after another,
    range of output channels), `splits` ranges per band; each runs the input transform of its
    R = band * TW tiles, alpha*alpha GEMMs (R x CI) @ (CI x channels) with the conv
    micro-kernels, and the output transform. Several rows of tiles a task, of several images
    where an image has few, give the GEMMs more rows: each weight read then serves more tiles.
    tiles: (threads, >= alpha*alpha * (band*TW * (CI + COp) + 32) + EDGE_FLOATS) floats: the
    transformed tiles, the products and an edge tile.
    The transforms are additions and multiplications by constants, and results do not depend
    on the batch size or the band (every product is one chain over CI whatever its block).

    `views` = (gh, gw, shift, down) (`_wino_input`): a tile's CI = gh*gw*C channels are
    gh x gw views of x, `u` the kernel over them. (1, 1, 0, 1): x itself. (2, 2, 1, 2): a
    stride-2 conv over x's four 2x2 phases (`layers.conv2d.view_kernel`): each tile reads
    every other pixel of every other row, so x holds 2 * alpha x 2 * alpha pixels per tile,
    tiles 2m apart. (gh, gw, 3, 1): a stride-1 kernel of up to 3*gh x 3*gw in 3x3 blocks,
    block (a, b) over x shifted by 3a rows and 3b columns (`layers.conv2d.split_views`).

    On an odd `turn[0]` the products go from the last (the caller counts its runs there), so
    the product weights read last in the run before come first while they are likeliest
    still in cache (`dense.dense`). Each product is its own GEMM: the same results."""
    N, Hp, Wp, C = x.shape
    CI = views[0] * views[1] * C
    down = views[3]  # input rows and columns a tile row and column steps over
    products = u.shape[0]
    COp = u.size // (products * CI)
    ldb = u.shape[2]  # COp, or 16 in strips of 16 channels
    strip = 16 if ldb == COp else 16 * CI
    alpha = 6 if products == 36 else 4
    Hb, Wb, CO = out.shape[1], out.shape[2], out.shape[3]
    y0, x0, OH, OW = at
    per = size // 2 if pool else size  # output rows and columns a tile gives
    TH = (OH + per - 1) // per
    TW = (OW + per - 1) // per
    rows_all = N * TH  # rows of tiles in the batch
    bands = (rows_all + band - 1) // band
    part = ((COp // 16 + splits - 1) // splits) * 16
    xf = x.reshape(x.size)
    uf = u.reshape(u.size)
    of = out.reshape(out.size)
    # consecutive products' tiles one cache line further apart than R*CI (R*COp) floats: 16
    # tiles of 64 channels would put the 36 products of a tile exactly 4 KB apart, all in the
    # same L1 sets (one task on an AMD Zen 3: output transform 18.41 us against 2.11)
    vstep = band * TW * CI + 16
    mstep = band * TW * COp + 16
    vsize = products * vstep
    msize = products * mstep
    usize = CI * COp
    row_out = Wb * CO
    reverse = turn[0] & 1
    for t in prange(bands * splits):
        _, tb, c0, c1 = row_task(t, splits, bands, part, COp)
        if c0 < c1:
            buf = tiles[numba.get_thread_id()]
            vf = buf[:vsize]
            mf = buf[vsize : vsize + msize]
            edge = buf[vsize + msize : vsize + msize + EDGE_FLOATS]
            g0 = tb * band  # the band's first row of tiles in the batch
            nr = min(band, rows_all - g0)
            R = nr * TW
            for r in range(nr):
                n, ty = (g0 + r) // TH, (g0 + r) % TH
                base = (n * Hp + down * size * ty) * Wp * C
                _wino_input(xf, base, Wp * C, C, TW, vf, alpha, size, r * TW, vstep, views)
            for q in range(products):
                p = products - 1 - q if reverse else q
                _conv_row(
                    vf,
                    p * vstep,
                    CI,
                    0,
                    1,
                    CI,
                    uf,
                    p * usize + c0 // 16 * strip,
                    ldb,
                    mf,
                    p * mstep + c0,
                    COp,
                    R,
                    c1 - c0,
                    strip=strip,
                )
            for r in range(nr):
                n, ty = (g0 + r) // TH, (g0 + r) % TH
                rows = min(per, OH - per * ty)  # fewer at the bottom edge
                o_row = ((n * Hb + y0 + per * ty) * Wb + x0) * CO
                _wino_output(
                    mf, TW, COp, c0, c1, bias, act, of, o_row, row_out, CO, pool, average, rows,
                    OW, edge, alpha, size, r * TW, mstep,
                )  # fmt: skip
