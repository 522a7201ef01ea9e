"""The padding copy: a conv layer's input into a zero-bordered buffer, so the conv kernels read
a 'valid' input; for a first layer it also applies the model's preprocessing `x * scale + shift`.
"""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from numba import njit, prange


@njit(fastmath=True, cache=True, nogil=True)
def _pad_rows(x, scale, shift, pre, out, pt, pl, t0, t1):
    """Rows t0..t1-1 of (image, input row) of `pad_input`."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    Hp, Wp = out.shape[1], out.shape[2]
    x0 = max(0, -pl)
    x1 = min(W, Wp - pl)
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for t in range(t0, t1):
        n = t // H
        y = t % H
        oy = y + pt
        if oy < 0 or oy >= Hp:
            continue
        # views indexed from 0: numba's negative-index check on a computed flat index would
        # stop the loop from vectorizing
        src = xf[((n * H + y) * W + x0) * C : ((n * H + y) * W + x1) * C]
        dst = of[((n * Hp + oy) * Wp + x0 + pl) * C : ((n * Hp + oy) * Wp + x1 + pl) * C]
        if pre == 0:
            for j in range(src.size):
                dst[j] = src[j]
        else:
            for j in range(src.size):
                dst[j] = src[j] * scale[j] + shift[j]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def pad_input(x, scale, shift, pre, out, pt, pl):
    """out[:, pt:pt+H, pl:pl+W, :] = x (times scale plus shift per channel when pre), clipped to
    out; the border of out is left as it is (zeros from its allocation). scale and shift hold
    the per-channel values repeated along a row (W*C values), so each row is one contiguous run."""
    rows = x.shape[0] * x.shape[1]
    per = max(1, x.shape[1] // 2)  # half an image per task
    for g in prange((rows + per - 1) // per):
        _pad_rows(x, scale, shift, pre, out, pt, pl, g * per, min(rows, g * per + per))


@njit(fastmath=True, cache=True, nogil=True)
def pad_input_serial(x, scale, shift, pre, out, pt, pl):
    """`pad_input` on the calling thread, for inputs too small to pay for a parallel region."""
    _pad_rows(x, scale, shift, pre, out, pt, pl, 0, x.shape[0] * x.shape[1])
