"""`convserve ray-serve`: deploy the model repository on a Ray Serve cluster (the `ray` extra)."""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = (
    "Deploy every model of a repository as a Ray Serve deployment (replicas, autoscaling, "
    "restarts) behind Ray Serve's gRPC proxy, which speaks the same Open Inference Protocol as "
    "`convserve serve`. Needs the `ray` extra: pip install 'convserve[ray]'. A flag wins over "
    "--config FILE, which wins over the CONVSERVE_* variable. See docs/ray.md."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from convserve.ray.settings import add_flags

    help_text = "serve the model repository on Ray Serve (starts or joins a Ray cluster)"
    parser = subparsers.add_parser("ray-serve", help=help_text, description=DESCRIPTION)
    parser.set_defaults(func=run)
    add_flags(parser)


def run(args: argparse.Namespace) -> int:
    from convserve.ray.settings import SettingsError, resolve
    from convserve.server.app import configure_logging
    from convserve.server.repository import RepositoryError

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    try:
        settings = resolve(flags=flags)
    except SettingsError as exc:
        print(f"convserve ray-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.server.log_level)
    try:
        import ray  # noqa: F401 - only to say what is missing
    except ImportError:
        print(
            "convserve ray-serve: Ray Serve is not installed: pip install 'convserve[ray]'",
            file=sys.stderr,
        )
        return 2
    from convserve.ray.serving import run as run_app

    try:
        return run_app(settings)
    except (FileNotFoundError, RepositoryError) as exc:
        logging.getLogger("convserve.ray").error("cannot start: %s", exc)
        return 2
    except ConnectionError as exc:  # no cluster at --address
        logging.getLogger("convserve.ray").error(
            "cannot join the Ray cluster at %s: %s", settings.address, str(exc).splitlines()[0]
        )
        return 2
