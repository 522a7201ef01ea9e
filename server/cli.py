"""`convserve serve`: run the gRPC inference server (heavy imports happen inside the command)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from convserve.server.config import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve the model repository over gRPC (Open Inference Protocol)",
        description="Serve every model of a repository <dir>/<model>/<version>/model.safetensors over gRPC "
        "(Open Inference Protocol / Triton), with dynamic batching, health, reflection and "
        "Prometheus metrics. Each flag can also be set by the CONVSERVE_* variable named after it; "
        "a flag wins over the variable.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # numba imports SciPy only to check its version (and for np.linalg, which the core never
    # compiles): keeping it out of the server saves resident memory and a second OpenBLAS
    # thread pool (BENCHMARKS.md). CONVSERVE_ALLOW_SCIPY=1 lets it load.
    if "scipy" not in sys.modules and not os.environ.get("CONVSERVE_ALLOW_SCIPY"):
        sys.modules["scipy"] = None  # makes `import scipy` raise ImportError, which numba handles
    # A server's Numba threads always share the cores with its gRPC threads (and often with its
    # clients): a waiting OpenMP thread that spins for long takes the CPU they need. A short
    # spin costs nothing on a quiet machine and is much faster under competing load
    # (BENCHMARKS.md, "Settings and the figures behind them").
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    from convserve.server.app import serve
    from convserve.server.config import config_from_args

    return serve(config_from_args(args))
