"""The `convserve` command: one entry, a subcommand per part.

Each part keeps its own command-line module with a `register(subparsers)` function that adds
its subcommands and sets `func` (taking the parsed args, returning an exit code). Those modules
import their heavy dependencies (numba, grpc) only inside the command functions, so
`convserve --help` and the client commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from convserve import __version__

COMMAND_MODULES = [
    "convserve.core.cli",  # summary, train, evaluate, visualize
    "convserve.server.cli",  # serve
    "convserve.client.cli",  # classify, health, models
    "convserve.core.interop.cli",  # import, export
    "convserve.ray.cli",  # ray-serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convserve",
        description="Batched image classification served over the Open Inference Protocol (gRPC).",
    )
    parser.add_argument("--version", action="version", version=f"convserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader left (`convserve classify *.png | head`): no traceback; stdout goes to
        # /dev/null so that the interpreter's last flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer the pipe stopped


if __name__ == "__main__":
    raise SystemExit(main())
