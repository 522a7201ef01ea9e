"""Arrays that start on a cache line.

numpy aligns its allocations to 16 bytes, so an array starts on a cache line only by chance;
otherwise every 64-byte vector an AVX-512 micro-kernel loads from it straddles two lines, and
costs two loads. The
packed weights, the per-thread scratch and the activation buffers of `InferencePlan` come from
here (their rows are whole multiples of 16 floats, so every block the kernels load is aligned
too). On an Intel Xeon (AVX-512), the 6 x 64 micro-kernel on L1-resident data ran at 192-195
GFLOP/s on one thread with its weights on a cache line and at 178-180 with them 16 or 32 bytes
off; where an array lands also varied from one process to the next.
"""

from __future__ import annotations

import numpy as np

CACHE_LINE = 64  # bytes


def empty(shape: int | tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialized C-contiguous array whose first element starts on a cache line."""
    dtype = np.dtype(dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start : start + nbytes].view(dtype).reshape(dims)


def zeros(shape: int | tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """`empty`, filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def on_cache_line(array: np.ndarray) -> np.ndarray:
    """`array` itself when it is C-contiguous and starts on a cache line, else such a copy."""
    if array.flags.c_contiguous and array.ctypes.data % CACHE_LINE == 0:
        return array
    out = empty(array.shape, array.dtype)
    out[...] = array
    return out
