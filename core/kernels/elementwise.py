"""Elementwise kernels (float32): activations, the bias + activation stores that end the conv
and dense kernels, preprocessing and the finiteness scan.

Activation codes are `convserve.core.activations.CODES` (softmax works on the last axis).
"""

from __future__ import annotations

import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
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


@njit(cache=True, nogil=True)
def all_finite_f32(bits):
    """True when no float32 (given as its uint32 bit patterns) is NaN or infinite: an integer
    max over the exponent fields, which vectorizes (a float test would need strict IEEE
    semantics, which do not)."""
    exponent = np.uint32(0x7F800000)
    top = np.uint32(0)
    for i in range(bits.size):
        e = bits[i] & exponent
        top = e if e > top else top
    return top != exponent


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
