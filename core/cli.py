"""Core subcommands: `convserve summary` (and `convserve train`, from the trainer;
`convserve evaluate` and `convserve visualize`, from report_cli)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = subparsers.add_parser(
        "summary", help="print a model file's layers, shapes and parameter counts"
    )
    summary.add_argument("model_file", metavar="MODEL_FILE", help="a convserve/1 .safetensors file")
    summary.set_defaults(func=run_summary)

    from convserve.core.training import cli as training_cli

    training_cli.register(subparsers)

    from convserve.core import report_cli

    report_cli.register(subparsers)


def run_summary(args: argparse.Namespace) -> int:
    from convserve.core.architecture import parse_architecture
    from convserve.core.errors import ModelError
    from convserve.core.limits import check_limits
    from convserve.core.model import check_weights, summarize
    from convserve.core.modelfile import one_line, read_model_file

    try:
        document, tensors = read_model_file(args.model_file)
        try:
            arch = parse_architecture(document)
            check_limits(arch)  # the server's default limits: a model it would refuse fails here
            check_weights(arch, tensors)
        except (ModelError, RecursionError) as exc:
            raise ModelError(one_line(f"model file {args.model_file}: {exc}")) from None
    except ModelError as exc:
        print(f"convserve summary: {exc}", file=sys.stderr)
        return 1
    print(summarize(arch))
    print(describe_source(args.model_file))
    return 0


def describe_source(path: str) -> str:
    """`Source: ...` from the file's metadata `source` (set by `convserve import`)."""
    import json

    from convserve.core.errors import ModelError
    from convserve.core.modelfile import one_line, read_model_metadata

    try:
        raw = read_model_metadata(path).get("source")
    except ModelError:
        return "Source: unknown (unreadable metadata)"
    if raw is None:
        return "Source: convserve (not imported)"
    try:
        source = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):  # not JSON: a hand-written note, shown as it is
        source = None
    if not isinstance(source, dict):
        return one_line(f"Source: {raw}", 200)
    return f"Source: {source.get('file', '?')} ({source.get('format', '?')}), imported {source.get('date', '?')}"
