"""`convserve serve`: run the gRPC inference server (heavy imports happen inside the command)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from convserve.server.config import add_arguments

    parser = subparsers.add_parser(
        "serve", help="serve the model repository over gRPC (Open Inference Protocol)",
        description="Serve every model of a repository <dir>/<model>/<version>/model.safetensors over gRPC "
                    "(Open Inference Protocol / Triton), with dynamic batching, health, reflection and "
                    "Prometheus metrics. Each flag can also be set by the CONVSERVE_* variable named after it; "
                    "a flag wins over the variable.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from convserve.server.app import serve
    from convserve.server.config import config_from_args

    return serve(config_from_args(args))
