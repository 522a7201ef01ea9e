"""Numba kernels of the inference core: module-level pure functions on arrays, one file per job.

Every kernel is `@njit(..., fastmath=True, cache=True, nogil=True)` (the Winograd ones without
fastmath, for batch invariance: see `winograd.py`; those that apply activations also with
`error_model="numpy"`, so that tanh's division vectorizes: see `elementwise._act`), takes
C-contiguous float32 arrays of fixed rank and writes into an output buffer it is given.
`convserve.core.runtime` is imported first so that the threading layer and CPU features are
set before numba loads.

Modules: `ir` (LLVM-IR vector micro-kernels), `gemm` (GEMM rows on them), `direct` (direct
convolution, optionally fused with 2x2/2 max pooling), `winograd` (3x3 and 5x5 stride-1
convolution) with `winograd_transforms` (the transform matrices and the IR applying them),
`first_layer` (1-input-channel convolutions fused with pooling), `dense`, `pool` (max/average
pooling), `padding` (the zero-bordered input copy), `elementwise` (activations, bias +
activation stores, preprocessing), `peak` (the micro-kernel's rate in L1: the benchmark's ceiling).

Numba's on-disk cache checks only the source file of the function it compiled, but kernels call
helpers in the other files of this package. `cache_stamp.install()` (run here, before any
kernel module is imported) makes the cache key of every function in this package a hash of all
of the package's sources, so a change to a shared helper invalidates every kernel that uses it.
"""

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels import cache_stamp

cache_stamp.install()
