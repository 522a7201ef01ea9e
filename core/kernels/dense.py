"""Fully connected layers, activations and preprocessing (float32).

Dense weights are packed once as `wt[UNp, K]` (one row per unit, units rounded up to 4 with
zero rows). Every batch uses the "4 samples x 4 units" micro-kernel (16 scalar accumulators
over the contiguous K axis), smaller ones repeating their last row, so results do not depend
on the batch size.

Activation codes: 0 linear, 1 relu, 2 tanh, 3 sigmoid, 4 softmax (over the last axis).
Keep helpers in this file: numba's cache only tracks the kernel's own source file.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)

import numpy as np
from numba import njit, prange

_Z = np.float32(0.0)
_ONE = np.float32(1.0)


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
def _dot4x4(x, r0, r1, r2, r3, wt, u):
    """16 dot products: rows r0..r3 of x times rows u..u+3 of wt. Plain 2-D indexing (a row
    view costs an atomic reference-count update that both threads would fight over)."""
    a00 = a01 = a02 = a03 = _Z
    a10 = a11 = a12 = a13 = _Z
    a20 = a21 = a22 = a23 = _Z
    a30 = a31 = a32 = a33 = _Z
    for j in range(x.shape[1]):
        p0 = x[r0, j]
        p1 = x[r1, j]
        p2 = x[r2, j]
        p3 = x[r3, j]
        v0 = wt[u, j]
        v1 = wt[u + 1, j]
        v2 = wt[u + 2, j]
        v3 = wt[u + 3, j]
        a00 += p0 * v0
        a01 += p0 * v1
        a02 += p0 * v2
        a03 += p0 * v3
        a10 += p1 * v0
        a11 += p1 * v1
        a12 += p1 * v2
        a13 += p1 * v3
        a20 += p2 * v0
        a21 += p2 * v1
        a22 += p2 * v2
        a23 += p2 * v3
        a30 += p3 * v0
        a31 += p3 * v1
        a32 += p3 * v2
        a33 += p3 * v3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(fastmath=True, cache=True, nogil=True)
def _dense_rows(x, wt, bias, out, r_lo, r_hi, u_lo, u_hi, act):
    """out[r_lo:r_hi, u_lo:u_hi] = act(x @ wt.T + bias), u_lo a multiple of 4. Units past
    out.shape[1] are computed on zero rows and dropped. Every row goes through the same 4x4
    micro-kernel whatever the batch size (missing rows repeat the last one), so a row's result
    is bit-identical alone and in any batch."""
    U = out.shape[1]
    last = r_hi - 1
    for r in range(r_lo, r_hi, 4):
        r1 = min(r + 1, last)
        r2 = min(r + 2, last)
        r3 = min(r + 3, last)
        for u in range(u_lo, u_hi, 4):
            a = _dot4x4(x, r, r1, r2, r3, wt, u)
            for i in range(4):
                if r + i <= last:
                    for v in range(4):
                        if u + v < U:
                            out[r + i, u + v] = _act(a[4 * i + v] + bias[u + v], act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def dense(x, wt, bias, out, act, splits):
    """out = act(x @ W + b). x: (N, K); wt: (UNp, K), UNp a multiple of 4; out: (N, U).

    Tasks: (group of 4 rows, unit split); softmax needs whole rows, so pass splits=1 with it.
    """
    N = x.shape[0]
    UNp = wt.shape[0]
    U = out.shape[1]
    step = 4
    ngroups = (UNp + step - 1) // step
    per = (ngroups + splits - 1) // splits
    rgroups = (N + 3) // 4
    inner = 0 if act == 4 else act
    for t in prange(rgroups * splits):
        s = t % splits
        rg = t // splits
        r_lo = rg * 4
        r_hi = min(N, r_lo + 4)
        u_lo = s * per * step
        u_hi = min(UNp, u_lo + per * step)
        _dense_rows(x, wt, bias, out, r_lo, r_hi, u_lo, u_hi, inner)
        if act == 4:
            for r in range(r_lo, r_hi):
                _softmax_row(out[r, :U])


@njit(fastmath=True, cache=True, nogil=True)
def _dense_group(x, wt, bias, out, r_lo, r_hi, act):
    """Rows r_lo..r_hi-1 (one row group) of a whole dense layer, softmax (4) included."""
    _dense_rows(x, wt, bias, out, r_lo, r_hi, 0, wt.shape[0], 0 if act == 4 else act)
    if act == 4:
        for r in range(r_lo, r_hi):
            _softmax_row(out[r])


@njit(fastmath=True, cache=True, nogil=True)
def dense_serial(x, wt, bias, out, act):
    """`dense` on the calling thread only, for layers too small to pay for a parallel region
    (the same micro-kernel calls, so the same results)."""
    N = x.shape[0]
    for r_lo in range(0, N, 4):
        _dense_group(x, wt, bias, out, r_lo, min(N, r_lo + 4), act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def dense2(x, wt1, b1, h, act1, wt2, b2, out, act2):
    """Two dense layers in one parallel region, one task per row group (small batches).

    h: (N, U1) scratch for the hidden layer; out: (N, U2).
    """
    N = x.shape[0]
    for rg in prange((N + 3) // 4):
        r_lo = rg * 4
        r_hi = min(N, r_lo + 4)
        _dense_group(x, wt1, b1, h, r_lo, r_hi, act1)
        _dense_group(h, wt2, b2, out, r_lo, r_hi, act2)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def activate(x, act):
    """In place: x = act(x) on a 2-D array; softmax (4) works on each row."""
    for r in prange(x.shape[0]):
        row = x[r]
        if act == 4:
            _softmax_row(row)
        elif act == 1:
            for j in range(row.size):
                v = row[j]
                row[j] = v if v > _Z else _Z
        else:
            for j in range(row.size):
                row[j] = _act(row[j], act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def preprocess(x, scale, shift, out):
    """out = x * scale + shift per channel; x, out: (N, H, W, C)."""
    N, H, W, C = x.shape
    for t in prange(N * H):
        n = t // H
        y = t % H
        for i in range(W):
            src = x[n, y, i]
            dst = out[n, y, i]
            for c in range(C):
                dst[c] = src[c] * scale[c] + shift[c]
