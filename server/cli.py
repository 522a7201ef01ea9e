"""`convserve serve`: run the gRPC inference server (heavy imports happen inside the command)."""

from __future__ import annotations

import argparse
import os


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
    # The core leaves GNU OpenMP's spin count alone (see convserve.core.runtime); a server sets a
    # short one unless the user chose: its numba threads always share the cores with its gRPC
    # threads (and often with its clients), and a waiting OpenMP thread that spins for long takes
    # the CPU they need (figures: BENCHMARKS.md, "Settings and the figures behind them").
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    from convserve.server.app import serve
    from convserve.server.config import config_from_args

    return serve(config_from_args(args))
