"""Winograd transforms F(m x m, r x r) from their interpolation points, and the LLVM IR that
applies them.

`toom_cook(m, r, points)` builds the exact matrices (fractions) A^T (m x a), G (a x r) and
B^T (a x a), a = m + r - 1, from a - 1 finite points and the point at infinity: the output of a
correlation of an a x a input tile d with an r x r kernel g is Y = A^T [(G g G^T) * (B^T d B)] A.
The kernel side G g G^T is computed in float64 when the weights are packed; the input and output
sides are emitted as IR at codegen time from B^T and A^T (`input_transform`,
`output_transform`), so every tile size comes from its matrices, not from hand-written code.

Rows of B^T are scaled to primitive integer vectors (their factors move into G), and rows for a
pair of points +p and -p share their even and odd parts, as a hand-written transform would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.ir import _array_data
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

Matrix = tuple[tuple[Fraction, ...], ...]


def _inverse(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square matrix (Gauss-Jordan on fractions)."""
    n = len(rows)
    work = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(rows)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if work[r][c] != 0)
        work[c], work[pivot] = work[pivot], work[c]
        work[c] = [v / work[c][c] for v in work[c]]
        for r in range(n):
            if r != c and work[r][c] != 0:
                factor = work[r][c]
                work[r] = [a - factor * b for a, b in zip(work[r], work[c])]
    return [row[n:] for row in work]


def _evaluation(points: list[Fraction], degree: int) -> list[list[Fraction]]:
    """Rows evaluating a polynomial of `degree` coefficients at each point, then its leading
    coefficient (the point at infinity)."""
    rows = [[p**j for j in range(degree)] for p in points]
    return rows + [[Fraction(0)] * (degree - 1) + [Fraction(1)]]


@dataclass(frozen=True)
class Transform:
    """F(m x m, r x r): A^T (m x alpha), G (alpha x r), B^T (alpha x alpha), exact."""

    m: int
    r: int
    at: Matrix
    g: Matrix
    bt: Matrix

    @property
    def alpha(self) -> int:
        """The input tile's side, m + r - 1."""
        return self.m + self.r - 1

    def kernel(self, kernel: np.ndarray) -> np.ndarray:
        """G g G^T of a (r, r, CI, CO) kernel in float64, as (alpha*alpha, CI, CO)."""
        g = np.array(self.g, np.float64)
        u = np.einsum("ia,abcd,jb->ijcd", g, kernel.astype(np.float64), g)
        return u.reshape(self.alpha * self.alpha, *kernel.shape[2:])


def toom_cook(m: int, r: int, points: tuple[Fraction | int, ...]) -> Transform:
    """The transform of F(m, r) (and so F(m x m, r x r)) interpolating at `points` (m + r - 2
    distinct finite values) and infinity. Correlation is the transpose of the polynomial
    product h*g evaluated at the points: y = E_h^T diag(E_g g) V^-T d, V evaluating the product."""
    alpha = m + r - 1
    pts = [Fraction(p) for p in points]
    if len(pts) != alpha - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m}, {r}) needs {alpha - 1} distinct finite points")
    inverse = _inverse(_evaluation(pts, alpha))
    at = [list(column) for column in zip(*_evaluation(pts, m))]
    g = _evaluation(pts, r)
    bt = [list(column) for column in zip(*inverse)]
    for i, row in enumerate(bt):  # a primitive integer row of B^T; the factor moves into G
        denominator = math.lcm(*(v.denominator for v in row))
        factor = Fraction(denominator, math.gcd(*(int(v * denominator) for v in row)))
        bt[i] = [v * factor for v in row]
        g[i] = [v / factor for v in g[i]]
    return Transform(m, r, *(tuple(tuple(row) for row in matrix) for matrix in (at, g, bt)))


# 0, +-1, +-2 and infinity: small integers in B^T and A^T, a float32 error of a few 1e-6
# relative to the output's scale on 5x5 kernels (the +-1/2 set is no better).
F2X2_3X3 = toom_cook(2, 3, (0, 1, -1))
F2X2_5X5 = toom_cook(2, 5, (0, 1, -1, 2, -2))
# the same points, so the same input transform as F(2x2, 5x5); a few 1e-6 too
F4X4_3X3 = toom_cook(4, 3, (0, 1, -1, 2, -2))


# -- IR ------------------------------------------------------------------------------------------
def _value_type(width: int) -> ir.Type:
    return ir.VectorType(ir.FloatType(), width) if width > 1 else ir.FloatType()


def _constant(width: int, value: Fraction) -> ir.Constant:
    return ir.Constant(_value_type(width), [float(value)] * width if width > 1 else float(value))


def _load(builder, ptr, offset, width: int):
    """`width` floats at ptr[offset] (unaligned)."""
    address = builder.bitcast(builder.gep(ptr, [offset]), _value_type(width).as_pointer())
    return builder.load(address, align=4)


def _store(builder, value, ptr, offset, width: int) -> None:
    address = builder.bitcast(builder.gep(ptr, [offset]), _value_type(width).as_pointer())
    builder.store(value, address, align=4)


def _dot(builder, coefficients, values, width: int):
    """sum_j coefficients[j] * values[j] over the non-zero coefficients: additions and
    subtractions for +-1, fused multiply-adds for the others (in a fixed order)."""
    fma = None
    total = None
    terms = [(c, v) for c, v in zip(coefficients, values) if c != 0]
    terms.sort(key=lambda term: term[0] != 1)  # start from a +1 term: no negation needed
    for c, v in terms:
        if total is None:
            if c == 1:
                total = v
            elif c == -1:
                total = builder.fsub(_constant(width, Fraction(0)), v)
            else:
                total = builder.fmul(_constant(width, c), v)
        elif c == 1:
            total = builder.fadd(total, v)
        elif c == -1:
            total = builder.fsub(total, v)
        else:
            if fma is None:
                kind = _value_type(width)
                name = f"llvm.fma.{'v16f32' if width > 1 else 'f32'}"
                fma = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(kind, [kind, kind, kind]), name
                )
            total = builder.call(fma, [_constant(width, c), v, total])
    return total if total is not None else _constant(width, Fraction(0))


def _apply(builder, matrix: Matrix, values, width: int) -> list:
    """matrix @ values (a list of IR values). Two rows that differ only in the sign of their odd
    (or even) entries, as the rows of +p and -p do, are computed as even part +- odd part."""
    out: list = [None] * len(matrix)
    for i, row in enumerate(matrix):
        if out[i] is not None:
            continue
        twin = next(
            (
                k
                for k in range(i + 1, len(matrix))
                if out[k] is None
                and any(c != 0 for c in row[1::2])
                and any(c != 0 for c in row[0::2])
                and all(
                    a == (b if j % 2 == 0 else -b) for j, (a, b) in enumerate(zip(matrix[k], row))
                )
            ),
            None,
        )
        if twin is None:
            out[i] = _dot(builder, row, values, width)
            continue
        even = _dot(builder, [c if j % 2 == 0 else 0 for j, c in enumerate(row)], values, width)
        odd = _dot(builder, [c if j % 2 else 0 for j, c in enumerate(row)], values, width)
        out[i], out[twin] = builder.fadd(even, odd), builder.fsub(even, odd)
    return out


def _index(builder, base, *terms):
    """base + sum of constant * value over (constant, value) terms, as IR."""
    for k, value in terms:
        base = builder.add(base, builder.mul(ir.Constant(value.type, k), value))
    return base


def input_transform(transform: Transform, width: int):
    """An intrinsic for `width` channels (16 or 1) of one tile's input transform:

    it(xf, p0, ci, row, vf, v, step)
    d[i][j] = the channels at xf[p0 + i*row + j*ci], i, j < alpha;
    stores (B^T d B)[alpha*i + j] at vf[v + (alpha*i + j)*step]"""
    bt, n = transform.bt, transform.alpha

    def codegen(context, builder, signature, args):
        xp = _array_data(context, builder, signature, args, 0)
        vp = _array_data(context, builder, signature, args, 4)
        _, p0, ci, row, _, v, step = args
        d = [
            [_load(builder, xp, _index(builder, p0, (i, row), (j, ci)), width) for j in range(n)]
            for i in range(n)
        ]
        columns = [_apply(builder, bt, [d[i][j] for i in range(n)], width) for j in range(n)]
        for i in range(n):  # row i of B^T d, times B
            for j, value in enumerate(
                _apply(builder, bt, [columns[k][i] for k in range(n)], width)
            ):
                _store(builder, value, vp, _index(builder, v, (n * i + j, step)), width)
        return context.get_dummy_value()

    @intrinsic
    def transform_input(typingctx, xf, p0, ci, row, vf, v, step):
        return types.void(xf, p0, ci, row, vf, v, step), codegen

    return transform_input


def output_transform(transform: Transform):
    """An intrinsic for 16 channels of one tile's output transform, bias and (with `relu` != 0)
    ReLU:

        ot(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu)
        M[alpha*i + j] = the channels at mf[m + (alpha*i + j)*step], Y = A^T M A + bias[co] (m x m)
        pool != 0: of[o + y*ldy + x*ldx] = max of Y's 2x2 window (y, x), y, x < m/2
        else:      of[o + y*ldy + x*ldx] = Y[y][x]
    (max then bias, so ReLU after it equals the max of the activated values)."""
    at, n, size = transform.at, transform.alpha, transform.m

    def codegen(context, builder, signature, args):
        mp = _array_data(context, builder, signature, args, 0)
        bp = _array_data(context, builder, signature, args, 3)
        op = _array_data(context, builder, signature, args, 5)
        _, m, step, _, co, _, o, ldx, ldy, pool, relu = args
        mv = [
            [_load(builder, mp, _index(builder, m, (n * i + j, step)), 16) for j in range(n)]
            for i in range(n)
        ]
        columns = [_apply(builder, at, [mv[i][j] for i in range(n)], 16) for j in range(n)]
        # row i of A^T M, times A
        y = [_apply(builder, at, [columns[j][i] for j in range(n)], 16) for i in range(size)]
        bias = _load(builder, bp, co, 16)
        zero = _constant(16, Fraction(0))
        clamp = builder.icmp_signed("!=", relu, ir.Constant(relu.type, 0))

        def vmax(a, c):
            return builder.select(builder.fcmp_ordered(">", a, c), a, c)

        def finish(value, i, j):
            value = builder.fadd(value, bias)
            value = builder.select(clamp, vmax(value, zero), value)
            _store(builder, value, op, _index(builder, o, (i, ldy), (j, ldx)), 16)

        with builder.if_else(builder.icmp_signed("!=", pool, ir.Constant(pool.type, 0))) as (
            pooled,
            full,
        ):
            with pooled:
                for i in range(size // 2):
                    for j in range(size // 2):
                        a, b = y[2 * i], y[2 * i + 1]
                        top = vmax(vmax(a[2 * j], a[2 * j + 1]), vmax(b[2 * j], b[2 * j + 1]))
                        finish(top, i, j)
            with full:
                for i in range(size):
                    for j in range(size):
                        finish(y[i][j], i, j)
        return context.get_dummy_value()

    @intrinsic
    def transform_output(typingctx, mf, m, step, bias, co, of, o, ldx, ldy, pool, relu):
        return types.void(mf, m, step, bias, co, of, o, ldx, ldy, pool, relu), codegen

    return transform_output
