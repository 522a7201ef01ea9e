"""The machine's ceilings as this core's code reaches them, for the benchmark:

- the FP32 multiply-add rate: the largest GEMM micro-kernel whose accumulators fit in the
  vector registers (`gemm.PEAK_BLOCK`: 6 pixels x 64 channels with AVX-512, 6 x 16 with AVX2)
  on data that stays in L1, on every thread at once. No conv or dense layer can
  run faster than this;
- the machine's own FP32 peak: chains of fused multiply-adds on registers alone, no loads or
  stores, on every thread (`fma_peak_gflops`). The micro-kernel's share of it is what its
  loads, loop and stores cost (on an Intel Xeon with AVX-512, run medians 370 of 429 GFLOP/s);
- the read rate of a model's weights: every thread sums its share of a buffer of the weights'
  size, over and over, as forward passes read them (from wherever a buffer of that size stays).
  Once the buffer outgrows L2, this is the rate of the cache or memory behind it, which no
  forward pass beats; within L1 and L2 the loop's adds bound it, and a model's multiply-adds
  then take far longer than its reads anyway.

A forward pass takes at least the longer of its multiply-adds at the first rate and its weights
at the second: a roofline with the weights as the only traffic, the benchmark's "% roofline".

Why not numpy's sgemm: its figure depends on how well the BLAS it links knows the CPU. On an
AMD Zen 5 (full-width AVX-512) numpy's 1024^3 sgemm reached about 200 GFLOP/s on 2 cores
while this loop reached 450 and the conv layers up to 400.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from convserve.core import aligned
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels import ir
from convserve.core.kernels.gemm import PEAK_BLOCK, REGISTER_VECTORS
from numba import njit, prange

PEAK_ROWS, PEAK_COLS = PEAK_BLOCK[0], 16 * PEAK_BLOCK[1]  # the largest block in registers
PEAK_K = 128  # reduction length: 128 x 64 weights (32 KB) and 6 x 128 inputs fit any L1 met
_peak_kernel = getattr(ir, f"_mk{PEAK_BLOCK[0]}x{PEAK_BLOCK[1]}")


@njit(fastmath=True, cache=True, nogil=True)
def _repeat(a, b, c, calls):
    """c = a (PEAK_ROWS x K) @ b (K x PEAK_COLS), `calls` times over (flat arrays)."""
    for _ in range(calls):
        _peak_kernel(a, 0, PEAK_K, 0, 1, PEAK_K, b, 0, PEAK_COLS, c, 0, PEAK_COLS, 0)


@njit(parallel=True, cache=True, nogil=True)
def _repeat_on_every_thread(a, b, c, calls):
    """`_repeat` on each thread's own (a[t], b[t], c[t]): one task per thread."""
    for t in prange(a.shape[0]):
        _repeat(a[t], b[t], c[t], calls)


def peak_operands(threads: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread flat inputs (PEAK_ROWS x K), weights (K x PEAK_COLS) and result, seeded, on
    cache lines as the plans' arrays are (each thread's rows are whole lines)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((threads, PEAK_ROWS * PEAK_K)).astype(np.float32)
    b = rng.standard_normal((threads, PEAK_K * PEAK_COLS)).astype(np.float32)
    c = aligned.zeros((threads, PEAK_ROWS * PEAK_COLS))
    return aligned.on_cache_line(a), aligned.on_cache_line(b), c


def _best_round(run, trial_calls: int, rounds: int, seconds: float) -> tuple[int, float]:
    """`run(calls)` once to compile (or load) and wake the threads, then timed: `calls` set
    from a trial of `trial_calls` so that a round lasts about `seconds`. (calls, the best of
    `rounds` rounds in seconds)."""
    run(1)
    start = time.perf_counter()
    run(trial_calls)
    calls = max(1, int(trial_calls * seconds / max(time.perf_counter() - start, 1e-6)))
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run(calls)
        best = min(best, time.perf_counter() - start)
    return calls, best


def peak_gflops(rounds: int = 5, seconds: float = 0.05) -> float:
    """FP32 GFLOP/s (2 per multiply-add) of the micro-kernel on every thread: the best of
    `rounds` rounds of about `seconds` each."""
    a, b, c = peak_operands(numba.get_num_threads())
    calls, best = _best_round(
        lambda calls: _repeat_on_every_thread(a, b, c, calls), 1000, rounds, seconds
    )
    flops = 2.0 * PEAK_ROWS * PEAK_COLS * PEAK_K * calls * a.shape[0]
    return flops / best / 1e9


# accumulators of 16 floats in the FMA-only loop: enough to cover the multiply-add latency on
# every unit, few enough to stay in registers with its two operands (24 with AVX-512, 6 AVX2)
FMA_CHAINS = max(2, min(24, REGISTER_VECTORS - 2))
_fma_loop = ir._fma_chains(FMA_CHAINS)


@njit(parallel=True, cache=True, nogil=True)
def _fma_on_every_thread(data, steps):
    """`steps` multiply-adds on each of FMA_CHAINS accumulators, on each thread's row of data."""
    for t in prange(data.shape[0]):
        _fma_loop(data[t], steps)


def fma_operands(threads: int) -> np.ndarray:
    """Per-thread rows for `_fma_on_every_thread`: multiplier, addend, then the accumulators;
    x -> 0.999 x + 0.001 keeps every value finite and normal however long it runs."""
    data = np.full((threads, 32 + 16 * FMA_CHAINS), 0.5, np.float32)
    data[:, :16], data[:, 16:32] = np.float32(0.999), np.float32(0.001)
    return data


def fma_peak_gflops(rounds: int = 5, seconds: float = 0.05) -> float:
    """FP32 GFLOP/s of fused multiply-adds alone (no memory traffic) on every thread: the
    machine's peak for this code. The best of `rounds` rounds of about `seconds` each."""
    data = fma_operands(numba.get_num_threads())
    calls, best = _best_round(
        lambda steps: _fma_on_every_thread(data, steps), 10000, rounds, seconds
    )
    return 2.0 * 16 * FMA_CHAINS * calls * data.shape[0] / best / 1e9


@njit(fastmath=True, cache=True, nogil=True)
def _read(a):
    """The sum of a flat array: every float read once (vectorised, a few chains of adds: from
    L1 or L2 the adds bound it, from L3 or memory the reads)."""
    total = np.float32(0)
    for i in range(a.size):
        total += a[i]
    return total


@njit(parallel=True, cache=True, nogil=True)
def _read_on_every_thread(parts, sums, calls):
    """`_read` of each row of `parts` (threads x floats), `calls` times, one task per thread
    (the parallel region's start is paid once, as for the peak)."""
    for t in prange(parts.shape[0]):
        for _ in range(calls):
            sums[t] += _read(parts[t])


def read_gbps(nbytes: int, rounds: int = 5, seconds: float = 0.05) -> float:
    """GB/s at which all threads together read a buffer of `nbytes` (each its contiguous
    share), read repeatedly: the best of `rounds` rounds of about `seconds` each."""
    threads = numba.get_num_threads()
    per_thread = max(16, -(-nbytes // (4 * threads)))
    parts = np.random.default_rng(0).random((threads, per_thread), dtype=np.float32)
    sums = np.zeros(threads, np.float32)
    # the first call also brings the buffer into the caches it fits in
    calls, best = _best_round(
        lambda calls: _read_on_every_thread(parts, sums, calls), 10, rounds, seconds
    )
    return parts.nbytes * calls / best / 1e9
