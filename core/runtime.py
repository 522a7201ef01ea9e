"""Numba runtime configuration for the core: import this before numba.

Importing this module (the kernels do it first) sets, unless the user already chose:

- `NUMBA_THREADING_LAYER=omp`: GNU OpenMP, a few microseconds per parallel region; the
  `workqueue` fallback costs tens of microseconds per region, which would ruin small batches.
- `NUMBA_CPU_FEATURES=<host features>,-prefer-256-bit` on AVX-512 hosts: without it LLVM only
  emits 256-bit vectors there, and the conv kernels run markedly slower.

Both are read when numba is imported; if numba was imported earlier, the same values are put
into `numba.config` as long as nothing has been compiled or run in parallel yet.

GNU OpenMP's spin count (how long a waiting thread spins before it sleeps) is left alone: with
the cores otherwise idle its default, about 300,000 spins, hands off between the parallel
regions of one forward pass at least as fast as a short spin, and on some machines markedly
faster. Where the cores are shared, a spinning thread burns the core a descheduled partner
needs; set `GOMP_SPINCOUNT=1000` there. `convserve serve` does that itself unless the variable
is set, because a server's numba threads always share the cores with its gRPC threads (figures:
BENCHMARKS.md, "Settings and the figures behind them").
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


def vector_registers() -> tuple[int, int]:
    """(vector registers, float32 lanes in each) of the CPU numba compiles for: (32, 16) with
    AVX-512, (16, 8) with AVX or AVX2, else (16, 4) (SSE). Read from the features in effect
    (`NUMBA_CPU_FEATURES`, set by `configure` to the host's), or the host's own; a CPU named
    with `NUMBA_CPU_NAME` but no features is taken as the baseline (SSE)."""
    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    if not features and not os.environ.get("NUMBA_CPU_NAME"):
        try:
            features = host_cpu_features()
        except Exception:  # pragma: no cover - llvmlite without the host query
            features = ""
    flags = set(features.split(","))
    if "+avx512f" in flags:
        return 32, 16
    if "+avx" in flags or "+avx2" in flags:
        return 16, 8
    return 16, 4


def configure() -> dict[str, str]:
    """Set the threading layer and CPU features (idempotent); returns what is in effect."""
    if _CONFIGURED:
        return dict(_CONFIGURED)
    layer = os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    if "NUMBA_CPU_FEATURES" not in os.environ:
        try:
            os.environ["NUMBA_CPU_FEATURES"] = host_cpu_features()
        except (
            Exception
        ):  # pragma: no cover - llvmlite without the host query: keep numba's default
            pass
    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    if "numba" in sys.modules:  # too late for the environment: set the live config instead
        import numba

        numba.config.THREADING_LAYER = layer
        if features and not numba.config.CPU_FEATURES:
            numba.config.CPU_FEATURES = features
    _CONFIGURED.update(
        threading_layer_requested=layer,
        cpu_features=features,
        gomp_spincount=os.environ.get("GOMP_SPINCOUNT", ""),
    )
    return dict(_CONFIGURED)


def threading_layer() -> str:
    """The threading layer numba actually uses (`omp`, `tbb`, `workqueue`), or `not started`."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return "not started"


def describe() -> str:
    """One line for logs: threads, threading layer in use, vector width preference, the vector
    register file the kernels' blocks are sized for."""
    import numba

    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    width = "512-bit preferred" if "-prefer-256-bit" in features else "default vector width"
    registers, lanes = vector_registers()
    return (
        f"numba {numba.__version__}: {numba.get_num_threads()} threads, "
        f"threading layer {threading_layer()} (requested {os.environ.get('NUMBA_THREADING_LAYER', '?')}), {width}, "
        f"{registers} vector registers of {lanes} floats"
    )


def resident_mb() -> float:
    """This process's resident set size in MB (VmRSS; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def release_compiler_pages(libraries: tuple[str, ...] = ("libllvmlite",)) -> int:
    """Drop the resident pages of the LLVM library's read-only, unmodified file mappings (its
    machine code, about 50 MB), and return freed heap memory to the system (glibc's
    `malloc_trim`; compiling kernels leaves much of it): once every kernel is compiled or loaded
    from the cache, serving
    never runs LLVM, and a page that is needed later (a model loaded afterwards) faults back in
    from the page cache. Only mappings without write permission and with no privately modified
    page are touched, so nothing is lost. Linux only; returns the bytes of address range
    advised (0 elsewhere, or when anything fails)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madv_dontneed = 4
        released = 0
        current: tuple[int, int, str, str] | None = None
        candidates: list[tuple[int, int]] = []

        def consider(entry: tuple[int, int, str, str] | None, dirty: int) -> None:
            if (
                entry
                and "w" not in entry[2]
                and dirty == 0
                and any(lib in entry[3] for lib in libraries)
            ):
                candidates.append((entry[0], entry[1]))

        dirty = 0
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    consider(current, dirty)
                    start, end = (int(v, 16) for v in head[0].split("-"))
                    current, dirty = (start, end, head[1], head[5] if len(head) > 5 else ""), 0
                elif head[0] == "Private_Dirty:":
                    dirty = int(head[1])
            consider(current, dirty)
        for start, end in candidates:
            if libc.madvise(start, end - start, madv_dontneed) == 0:
                released += end - start
        if hasattr(libc, "malloc_trim"):  # glibc: hand the compiler's freed heap back to the system
            libc.malloc_trim(0)
        return released
    except Exception:  # pragma: no cover - a hint only: never fail the caller
        return 0


configure()
