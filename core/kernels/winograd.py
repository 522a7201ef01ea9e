"""Winograd convolution (NHWC, float32) for stride-1 layers, F(2x2, 3x3) and F(2x2, 5x5): per
2x2 block of outputs, 16 products per channel pair instead of 36 (3x3), 36 instead of 100 (5x5).
The input and output transforms are IR emitted from their matrices (`winograd_transforms`): 16
channels at a time, one by one for the input's last channels; the products are GEMMs on the
micro-kernels (`gemm._conv_row`). A fused 2x2/2 max or average pool is exactly one tile.
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
    input_transform,
    output_transform,
)
from numba import njit, prange

_IN4 = input_transform(F2X2_3X3, 16)
_IN4_ONE = input_transform(F2X2_3X3, 1)
_IN6 = input_transform(F2X2_5X5, 16)
_IN6_ONE = input_transform(F2X2_5X5, 1)
_OUT4 = output_transform(F2X2_3X3)
_OUT6 = output_transform(F2X2_5X5)


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _output_block(alpha, mf, m, step, bias, co, of, o, ldx, ldy, pool, relu):
    """The output transform of 16 channels of one tile (`output_transform`) for tile side
    `alpha`."""
    if alpha == 6:
        _OUT6(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)
    else:
        _OUT4(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _wino_input(xf, base, row, CI, TW, vf, alpha):
    """Input transform of one row of tiles of side `alpha` (4: F(2x2, 3x3), 6: F(2x2, 5x5)):
    for tile tx (the alpha x alpha input pixels from column 2*tx of the rows starting at
    xf[base], `row` floats apart) and channel c, vf[(p*TW + tx)*CI + c] = (B^T d B)[p]: 16
    channels at a time, then one by one."""
    step = TW * CI
    vec_end = CI // 16 * 16
    for tx in range(TW):
        o = base + 2 * tx * CI
        q = tx * CI
        for c in range(0, vec_end, 16):
            if alpha == 6:
                _IN6(xf, o + c, CI, row, vf, q + c, step)
            else:
                _IN4(xf, o + c, CI, row, vf, q + c, step)
        for c in range(vec_end, CI):
            if alpha == 6:
                _IN6_ONE(xf, o + c, CI, row, vf, q + c, step)
            else:
                _IN4_ONE(xf, o + c, CI, row, vf, q + c, step)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _wino_output(
    mf, TW, COp, c0, c1, bias, act, of, o_row, row, CO, pool, average, rows, cols, edge, alpha
):
    """Output transform of one row of tiles, plus bias and activation: tile tx's 2x2 outputs
    Y = A^T M A, M[p] = mf[(p*TW + tx)*COp + co]. With `pool`, writes max(Y) (one pooled pixel
    per tile; with `average` the mean of the four activated values) at of[o_row + tx*CO + co];
    else Y's `rows` rows (1 or 2) and the columns below `cols` at
    of[o_row + y*row + (2*tx + x)*CO + co]. Always 16 channels at a time (the products have COp
    columns): straight into `of` for a max-pooled or whole tile of 16 real channels, else
    through `edge` (64 floats), from which the valid outputs are activated and copied."""
    step = TW * COp
    hi = min(c1, CO)
    for tx in range(TW):
        q = tx * COp
        o = o_row + (tx if pool else 2 * tx) * CO
        two = 2 * tx + 1 < cols
        # straight into `of`: a max-pooled or whole tile with ReLU or no activation
        direct = act <= 1 and ((pool and not average) or (two and rows == 2))
        for start in range(c0, hi, 16):
            m = q + start
            if direct and start + 16 <= hi:
                _output_block(alpha, mf, m, step, bias, start, of, o + start, CO, row, pool, act)
                continue
            _output_block(alpha, mf, m, step, bias, start, edge, 0, 16, 32, False, 0)
            if not (pool and not average):  # a max pool activates its maximum only
                for j in range(64):  # whole vectors: this loop vectorizes
                    edge[j] = _act(edge[j], act)
            width = min(16, hi - start)
            if pool and average:
                for j in range(width):
                    pair = (edge[j] + edge[16 + j]) + (edge[32 + j] + edge[48 + j])
                    of[o + start + j] = pair * _QUARTER
            elif pool:
                for j in range(width):
                    top = max(max(edge[j], edge[16 + j]), max(edge[32 + j], edge[48 + j]))
                    of[o + start + j] = _act(top, act)
            else:
                for y in range(rows):
                    for x in range(2 if two else 1):
                        at = o + y * row + x * CO + start
                        for j in range(width):
                            of[at + j] = edge[32 * y + 16 * x + j]


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def conv_wino(x, u, bias, tiles, out, act, pool, average, splits):
    """Stride-1 conv + bias + activation (+ 2x2/2 max pool when `pool`, average pool when also
    `average`) by Winograd's F(2x2, 3x3) or F(2x2, 5x5) (`u` holds 16 or 36 products).

    x: padded, preprocessed input (N, Hp, Wp, CI) holding every alpha x alpha tile (alpha = 4
    or 6); u: (alpha*alpha, CI, COp) the transformed kernel G g G^T, COp a multiple of 16. out:
    (N, OH, OW, CO), pooled or not; a pooled pixel is exactly one tile. Tasks: (image, row of
    tiles, range of output channels), `splits` ranges per row; each runs the input transform of
    its row of tiles, alpha*alpha GEMMs (tiles x CI) @ (CI x channels) with the conv
    micro-kernels, and the output transform.
    tiles: (threads, >= alpha*alpha * TW * (CI + COp) + 64) floats: the transformed tiles, the
    products and an edge tile.
    The transforms are additions and multiplications by constants, and results do not depend
    on the batch size."""
    N, Hp, Wp, CI = x.shape
    COp = u.shape[2]
    products = u.shape[0]
    alpha = 6 if products == 36 else 4
    OH, OW, CO = out.shape[1], out.shape[2], out.shape[3]
    TH = OH if pool else (OH + 1) // 2
    TW = OW if pool else (OW + 1) // 2
    per = ((COp // 16 + splits - 1) // splits) * 16
    xf = x.reshape(x.size)
    uf = u.reshape(u.size)
    of = out.reshape(out.size)
    vsize = products * TW * CI
    msize = products * TW * COp
    usize = CI * COp
    row_out = OW * CO
    for t in prange(N * TH * splits):
        n, ty, c0, c1 = row_task(t, splits, TH, per, COp)
        if c0 < c1:
            buf = tiles[numba.get_thread_id()]
            vf = buf[:vsize]
            mf = buf[vsize : vsize + msize]
            edge = buf[vsize + msize : vsize + msize + 64]
            _wino_input(xf, (n * Hp + 2 * ty) * Wp * CI, Wp * CI, CI, TW, vf, alpha)
            for p in range(products):
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
            rows = 1 if pool else min(2, OH - 2 * ty)  # one at an odd bottom edge
            o_row = (n * OH + (ty if pool else 2 * ty)) * row_out
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
                pool,
                average,
                rows,
                OW,
                edge,
                alpha,
            )
