"""Pooling kernels (NHWC, float32): max and average over a window, any stride and padding.

Padding cells are ignored: max takes the maximum of the real cells, average divides by the
number of real cells (Keras/TF `same` semantics, ONNX `count_include_pad=0`).
"""

from __future__ import annotations

import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def pool2d(x, out, ph, pw, sh, sw, pt, pl, average):
    """out[n, oy, ox, c] = max (or mean) of x over the window's real cells. Tasks: (image, row)."""
    N, H, W, C = x.shape
    OH, OW = out.shape[1], out.shape[2]
    for t in prange(N * OH):
        n = t // OH
        oy = t % OH
        y0 = oy * sh - pt
        ya = max(y0, 0)
        yb = min(y0 + ph, H)
        for ox in range(OW):
            x0 = ox * sw - pl
            xa = max(x0, 0)
            xb = min(x0 + pw, W)
            orow = out[n, oy, ox]
            first = x[n, ya, xa]
            for c in range(C):
                orow[c] = first[c]
            for yy in range(ya, yb):
                for xx in range(xa, xb):
                    if yy == ya and xx == xa:
                        continue
                    row = x[n, yy, xx]
                    if average:
                        for c in range(C):
                            orow[c] += row[c]
                    else:
                        for c in range(C):
                            v = row[c]
                            orow[c] = v if v > orow[c] else orow[c]
            if average:
                inv = np.float32(1.0) / np.float32((yb - ya) * (xb - xa))
                for c in range(C):
                    orow[c] *= inv
