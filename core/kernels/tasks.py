"""How the parallel kernels split their work: tasks of (image, row, part of the row)."""

from __future__ import annotations

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from numba import njit


@njit(inline="always", fastmath=True, cache=True, nogil=True)
def row_task(t, splits, rows, per, total):
    """Task `t` of a prange over (image, row, part) with `rows` rows an image and `splits` parts
    a row, each part `per` long out of `total`: (image, row, start, end), [start, end) empty for
    a part past the end."""
    s = t % splits
    r = t // splits
    start = min(total, s * per)
    return r // rows, r % rows, start, min(total, start + per)
