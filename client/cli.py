"""Client subcommands: `convserve classify`, `convserve health`, `convserve models`.

Heavy imports (numpy, the client) happen inside the command functions; `health` imports only
grpc and the standard health messages, so the Docker HEALTHCHECK stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


SECURITY_FLAGS = (
    (
        "--tls-ca-file",
        "FILE",
        "PEM CA that signed the server's certificate (default with TLS: the system's CAs)",
    ),
    ("--tls-cert-file", "FILE", "client certificate (PEM) for mutual TLS"),
    ("--tls-key-file", "FILE", "its private key (PEM)"),
    (
        "--token",
        "TOKEN",
        "bearer token (default: $CONVSERVE_TOKEN, which is better: other local users can see command lines)",
    ),
)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca-file, --tls-cert-file, --tls-key-file and --token (TLS is on when a file is given)."""
    group = parser.add_argument_group("security (TLS is on as soon as one --tls-* file is given)")
    for flag, metavar, text in SECURITY_FLAGS:
        group.add_argument(flag, metavar=metavar, default=None, help=text)


def security_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's keyword arguments for the security flags."""
    return {
        "tls_ca_file": args.tls_ca_file,
        "tls_cert_file": args.tls_cert_file,
        "tls_key_file": args.tls_key_file,
        "token": args.token,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    target_help = (
        "server address host:port, several comma-separated, or dns:///name:port "
        "(default: $CONVSERVE_TARGET or localhost:8001)"
    )

    classify = subparsers.add_parser(
        "classify",
        help="classify image files with a running server",
        description="Classify images (PNG, JPEG, ...) and print a table of file, label, score.",
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    classify.add_argument("--target", default=None, help=target_help)
    classify.add_argument(
        "--model", default=None, help="model name (may be left out when the server has one model)"
    )
    classify.add_argument("--version", default="", help="model version (default: the latest ready)")
    classify.add_argument(
        "--top-k", type=int, default=1, help="classes to show per image (default: 1)"
    )
    classify.add_argument(
        "--timeout", type=float, default=30.0, help="deadline in seconds (default: 30)"
    )
    add_security_arguments(classify)
    classify.set_defaults(func=run_classify)

    health = subparsers.add_parser(
        "health",
        help="exit 0 when the server answers SERVING (for HEALTHCHECK)",
        description="Ask grpc.health.v1.Health/Check; exit 0 on SERVING, 1 otherwise.",
    )
    health.add_argument("--target", default=None, help=target_help)
    health.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    health.add_argument(
        "--timeout", type=float, default=2.0, help="deadline in seconds (default: 2)"
    )
    add_security_arguments(health)
    health.set_defaults(func=run_health)

    models = subparsers.add_parser(
        "models", help="list the server's models, versions, input shapes and labels"
    )
    models.add_argument("--target", default=None, help=target_help)
    models.add_argument(
        "--timeout", type=float, default=10.0, help="deadline in seconds (default: 10)"
    )
    add_security_arguments(models)
    models.set_defaults(func=run_models)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()
) -> str:
    """Rows as aligned columns under a header; column indices in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _quiet_grpc() -> None:
    """Keep gRPC's own log lines (a failed TLS handshake, say) off the terminal: the command
    prints one line of its own. Must run before grpc is first imported."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    print(f"convserve {command}: {message}", file=sys.stderr)
    return code


def run_classify(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from convserve.client import Client, InferenceError

    if args.top_k < 1:
        return _fail("classify", f"--top-k must be >= 1, got {args.top_k}", EXIT_USAGE)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        return _fail("classify", f"no such file: {', '.join(missing)}", EXIT_USAGE)
    try:
        with Client(args.target, timeout=args.timeout, **security_arguments(args)) as client:
            results = client.classify(
                args.images, top_k=args.top_k, model=args.model, version=args.version
            )
    except InferenceError as error:
        return _fail("classify", str(error))
    except (ValueError, TypeError, ImportError) as error:  # unreadable image, bad target, no Pillow
        return _fail("classify", str(error), EXIT_USAGE)
    rows = []
    for path, predictions in zip(args.images, results):
        for rank, p in enumerate(predictions):
            rows.append(
                [path if rank == 0 else "", p.label, f"{p.score:.4f}"]
                + ([rank + 1] if args.top_k > 1 else [])
            )
    headers = ["FILE", "LABEL", "SCORE"] + (["RANK"] if args.top_k > 1 else [])
    print(format_table(headers, rows, right=(2, 3)))
    return EXIT_OK


def run_health(args: argparse.Namespace) -> int:
    _quiet_grpc()
    import grpc
    from convserve.client.channel import default_target
    from convserve.client.credentials import channel_credentials, token_metadata
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or default_target()
    try:
        # The health service needs no token; one given is sent anyway (a proxy may ask for it).
        credentials = channel_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        metadata = token_metadata(args.token, credentials is not None, target)
    except ValueError as error:
        return _fail("health", str(error), EXIT_USAGE)
    try:
        with (
            grpc.insecure_channel(target)
            if credentials is None
            else grpc.secure_channel(target, credentials)
        ) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=metadata,
            )
    except grpc.RpcError as error:
        details = error.details() or ""
        if credentials is None and "Socket closed" in details:  # what a TLS port does to plaintext
            details += "; if the server uses TLS, pass --tls-ca-file"
        return _fail("health", f"{target}: {error.code().name}: {details}")
    except ValueError as error:  # e.g. an invalid timeout
        return _fail("health", str(error))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return _fail("health", f"{target}: {status}")
    print(f"{target}: {status}")
    return EXIT_OK


def _shape(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


def run_models(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from convserve.client import Client, InferenceError

    try:
        with Client(args.target, timeout=args.timeout, **security_arguments(args)) as client:
            index = client.repository()
            names = sorted({m.name for m in index})
            rows, labels = [], {}
            for name in names:
                versions = sorted(
                    (m for m in index if m.name == name),
                    key=lambda m: int(m.version) if m.version.isdigit() else 0,
                )
                ready = [m.version for m in versions if m.state.upper() == "READY"]
                shown = ", ".join(
                    f"{m.version}"
                    if m.state.upper() == "READY"
                    else f"{m.version} ({m.state.lower()})"
                    for m in versions
                )
                if not ready:
                    rows.append([name, shown or "-", "-", "-", "-"])
                    continue
                info = client.metadata(name)
                labels[name] = client.labels(name)
                rows.append(
                    [
                        name,
                        shown,
                        f"{info.input.datatype} {_shape(info.input.shape[1:])}",
                        info.num_classes or "?",
                        info.max_batch_size or "?",
                    ]
                )
    except InferenceError as error:
        return _fail("models", str(error))
    except ValueError as error:
        return _fail("models", str(error), EXIT_USAGE)
    if not rows:
        print("no models")
        return EXIT_OK
    print(format_table(["MODEL", "VERSIONS", "INPUT", "CLASSES", "MAX BATCH"], rows, right=(3, 4)))
    for name, names_ in labels.items():
        print(f"\n{name} labels: " + ", ".join(f"{i}={label}" for i, label in enumerate(names_)))
    return EXIT_OK
