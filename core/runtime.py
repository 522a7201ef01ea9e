"""Numba runtime configuration for the core: import this before numba.

Importing this module (the kernels do it first) sets, unless the user already chose:

- `NUMBA_THREADING_LAYER=omp`: GNU OpenMP, a few microseconds per parallel region; the
  `workqueue` fallback costs 50-90 us per region, which would ruin small batches.
- `NUMBA_CPU_FEATURES=<host features>,-prefer-256-bit` on AVX-512 hosts: without it LLVM only
  emits 256-bit vectors there (conv runs 20-55 % slower).
- GNU OpenMP's own spin count is left alone (about 300,000 spins before a waiting thread sleeps):
  on a quiet or dedicated machine it gives the fastest hand-off between the parallel regions of
  one forward pass (measured: batch 64 about 12,000 img/s against 8,900 with `GOMP_SPINCOUNT=1000`).
  On a busy, shared host set `GOMP_SPINCOUNT=1000` yourself: a waiting thread then stops burning
  the core its descheduled partner needs (under heavy load that took batch 64 from about 2,000
  to 6,000 img/s).

Both are read when numba is imported; if numba was imported earlier, the same values are put
into `numba.config` as long as nothing has been compiled or run in parallel yet.
"""

from __future__ import annotations

import os
import sys

_CONFIGURED: dict[str, str] = {}


def host_cpu_features() -> str:
    """LLVM's feature string for this CPU, with `-prefer-256-bit` added on AVX-512 hosts."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        features += ",-prefer-256-bit"
    return features


def configure() -> dict[str, str]:
    """Set the threading layer and CPU features (idempotent); returns what is in effect."""
    if _CONFIGURED:
        return dict(_CONFIGURED)
    layer = os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    if "NUMBA_CPU_FEATURES" not in os.environ:
        try:
            os.environ["NUMBA_CPU_FEATURES"] = host_cpu_features()
        except Exception:  # pragma: no cover - llvmlite without the host query: keep numba's default
            pass
    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    if "numba" in sys.modules:  # too late for the environment: set the live config instead
        import numba

        numba.config.THREADING_LAYER = layer
        if features and not numba.config.CPU_FEATURES:
            numba.config.CPU_FEATURES = features
    _CONFIGURED.update(threading_layer_requested=layer, cpu_features=features,
                       gomp_spincount=os.environ.get("GOMP_SPINCOUNT", ""))
    return dict(_CONFIGURED)


def threading_layer() -> str:
    """The threading layer numba actually uses (`omp`, `tbb`, `workqueue`), or `not started`."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return "not started"


def describe() -> str:
    """One line for logs: threads, threading layer in use, vector width preference."""
    import numba

    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    width = "512-bit preferred" if "-prefer-256-bit" in features else "default vector width"
    return (f"numba {numba.__version__}: {numba.get_num_threads()} threads, "
            f"threading layer {threading_layer()} (requested {os.environ.get('NUMBA_THREADING_LAYER', '?')}), {width}")


configure()
