"""The machine's FP32 multiply-add rate as this core's code reaches it: the largest GEMM
micro-kernel (6 pixels x 64 channels, `ir._mk6x4`) on data that stays in L1, on every thread
at once. No conv or dense layer can run faster than this, so the benchmark prints it next to
each model's achieved GFLOP/s as the ceiling.

Why not numpy's sgemm: its figure depends on how well the BLAS it links knows the CPU. On an
AMD Zen 5 (full-width AVX-512) numpy's 1024^3 sgemm reached about 200 GFLOP/s on 2 cores
while this loop reached 450 and the conv layers up to 400.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.ir import _mk6x4
from numba import njit, prange

PEAK_ROWS, PEAK_COLS = 6, 64  # the micro-kernel's block
PEAK_K = 128  # reduction length: 128 x 64 weights (32 KB) and 6 x 128 inputs fit any L1 met


@njit(fastmath=True, cache=True, nogil=True)
def _repeat(a, b, c, calls):
    """c = a (6 x K) @ b (K x 64), `calls` times over (flat arrays)."""
    for _ in range(calls):
        _mk6x4(a, 0, PEAK_K, 0, 1, PEAK_K, b, 0, PEAK_COLS, c, 0, PEAK_COLS, 0)


@njit(parallel=True, cache=True, nogil=True)
def _repeat_on_every_thread(a, b, c, calls):
    """`_repeat` on each thread's own (a[t], b[t], c[t]): one task per thread."""
    for t in prange(a.shape[0]):
        _repeat(a[t], b[t], c[t], calls)


def peak_operands(threads: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread flat inputs (6 x K), weights (K x 64) and result (6 x 64), seeded."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((threads, PEAK_ROWS * PEAK_K)).astype(np.float32)
    b = rng.standard_normal((threads, PEAK_K * PEAK_COLS)).astype(np.float32)
    return a, b, np.zeros((threads, PEAK_ROWS * PEAK_COLS), np.float32)


def peak_gflops(rounds: int = 5, seconds: float = 0.05) -> float:
    """FP32 GFLOP/s (2 per multiply-add) of the micro-kernel on every thread: the best of
    `rounds` rounds of about `seconds` each."""
    a, b, c = peak_operands(numba.get_num_threads())
    _repeat_on_every_thread(a, b, c, 1)  # compile or load, wake the threads
    calls = 1000
    start = time.perf_counter()
    _repeat_on_every_thread(a, b, c, calls)
    calls = max(1, int(calls * seconds / max(time.perf_counter() - start, 1e-6)))
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        _repeat_on_every_thread(a, b, c, calls)
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * PEAK_ROWS * PEAK_COLS * PEAK_K * calls * a.shape[0]
    return flops / best / 1e9
