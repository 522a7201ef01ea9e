"""Standalone activations and preprocessing (float32).

The dense layers themselves run on the convolution micro-kernels, in `conv.py` (`dense`,
`dense_serial`): a dense layer is a 1x1 convolution over a batch of 1-pixel images.

Activation codes: 0 linear, 1 relu, 2 tanh, 3 sigmoid, 4 softmax (over the last axis).
Keep helpers in this file: numba's cache only tracks the kernel's own source file.
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
