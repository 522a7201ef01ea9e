"""Numba kernels of the inference core: module-level pure functions on arrays.

Every kernel is `@njit(parallel=True, fastmath=True, cache=True, nogil=True)`, takes C-contiguous
float32 arrays of fixed rank and writes into an output buffer it is given. `convserve.core.runtime`
is imported first so that the threading layer and CPU features are set before numba loads.

Modules: `conv` (the vector micro-kernels and everything built on them: direct and Winograd
convolutions fused with bias, activation and 2x2 max pooling, and dense layers), `pool`
(max/average pooling), `dense` (standalone activations, preprocessing).
"""

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
