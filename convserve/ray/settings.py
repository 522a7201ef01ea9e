"""Settings of a Ray Serve deployment: the server's batching options plus scaling and cluster ones.

Every setting has a flag (`convserve ray-serve --min-replicas 2`), a `CONVSERVE_*` variable and a
key in a YAML or JSON settings file (`min_replicas: 2`, or `--config FILE`), or an argument of the
Serve application builder (`serve run convserve.ray:build_app min_replicas=2`). A flag wins over
the file, the file over the variable, the variable over the built-in default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convserve.server.config import (
    OPTIONS,
    Option,
    ServerConfig,
    _nonneg_float,
    _nonneg_int,
    _port,
    _pos_int,
)

# The server options that mean the same in a Ray replica (ports, workers and draining belong to
# Ray's proxies and controller there).
SERVER_FLAGS = (
    "--model-repository",
    "--max-batch-size",
    "--max-queue-delay-us",
    "--max-queue-size",
    "--parallel-min-batch",
    "--instances",
    "--max-request-images",
    "--max-message-bytes",
    "--warmup-batch-sizes",
    "--skip-bad-models",
    "--log-level",
)
SERVER_OPTIONS = tuple(opt for opt in OPTIONS if opt.flag in SERVER_FLAGS)


def _address(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError(
            "expected 'local', 'auto' or a cluster address HOST:PORT / ray://HOST:PORT"
        )
    return value


def _pos_float(text: str) -> float:
    value = _nonneg_float(text)
    if value <= 0:
        raise ValueError(f"expected a number > 0, got {text}")
    return value


RAY_OPTIONS: tuple[Option, ...] = (
    Option(
        "--address",
        _address,
        "local",
        "Ray cluster: 'local' starts one in this process (stopped on exit), 'auto' joins the "
        "cluster started on this machine by `ray start`, HOST:PORT joins that head node; when "
        "joining, the application keeps running after the command returns",
        "ADDR",
    ),
    Option("--grpc-port", _port, 9000, "port of Ray Serve's gRPC proxy on every node", "PORT"),
    Option(
        "--http-port", _port, 8000, "port of Ray Serve's HTTP proxy (unused by convserve)", "PORT"
    ),
    Option("--min-replicas", _nonneg_int, 1, "fewest replicas per model (0: scale to zero)", "N"),
    # more than --min-replicas turns autoscaling on
    Option("--max-replicas", _pos_int, 1, "most replicas per model (autoscaling above min)", "N"),
    Option(
        "--target-ongoing-requests",
        _pos_float,
        32.0,
        "autoscaling target: requests in flight per replica (queued in its batcher or computing); "
        "higher keeps batches fuller, lower adds replicas sooner",
        "N",
    ),
    Option(
        "--replica-cpus",
        _pos_float,
        1.0,
        "CPUs Ray reserves for each model replica (its Numba threads: this rounded down, >= 1)",
        "N",
    ),
    Option(
        "--num-cpus",
        _nonneg_int,
        0,
        "CPUs of the local cluster with --address local (0: every core of this machine)",
        "N",
    ),
    Option(
        "--config",
        str,
        None,
        "YAML or JSON file of settings (keys as in the flags, with _)",
        "FILE",
    ),
)
ALL_OPTIONS = SERVER_OPTIONS + RAY_OPTIONS
_BY_KEY = {opt.dest: opt for opt in ALL_OPTIONS}


class SettingsError(ValueError):
    """A setting is unknown or invalid; the message names it and where it came from."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how convserve runs on Ray Serve."""

    server: ServerConfig
    address: str = "local"
    grpc_port: int = 9000
    http_port: int = 8000
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32.0
    replica_cpus: float = 1.0
    num_cpus: int = 0

    @property
    def numba_threads(self) -> int:
        return max(1, int(self.replica_cpus))

    def scaling(self) -> dict[str, Any]:
        """Ray Serve deployment options of one model: a fixed count or an autoscaling range."""
        if self.max_replicas == self.min_replicas:
            return {"num_replicas": self.min_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        }


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; an absent flag leaves no attribute (the file or variable decides)."""
    for opt in ALL_OPTIONS:
        shown = "" if opt.default is None else f" [default: {opt.default}]"
        parser.add_argument(
            opt.flag,
            type=_flag_type(opt),
            default=argparse.SUPPRESS,
            metavar=opt.metavar,
            help=f"{opt.help}{shown} (env {opt.env})",
        )


def _flag_type(opt: Option):
    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = opt.dest
    return parse


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """A settings file: a YAML (or JSON, a subset of YAML) mapping."""
    import yaml  # a dependency of Ray

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"settings file {path} must hold a mapping of settings, got {type(data).__name__}"
        )
    return data


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _coerce(opt: Option, value: Any, source: str) -> Any:
    try:
        return opt.parse(_text(value))
    except ValueError as exc:
        raise SettingsError(f"setting {opt.dest} from {source}: {exc}") from None


def resolve(
    flags: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RaySettings:
    """Settings from parsed `flags`, then `values` (a file or builder arguments, with the file
    named by their or the flags' `config` read too), then `CONVSERVE_*` variables, then defaults."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    layers: list[tuple[dict[str, Any], str]] = [(dict(values or {}), "the application arguments")]
    config = flags.get("config") or layers[0][0].get("config") or environ.get(_BY_KEY["config"].env)
    if config:
        layers.append((read_file(config), f"settings file {config}"))
    for layer, source in layers:
        unknown = sorted(str(key) for key in layer if str(key).replace("-", "_") not in _BY_KEY)
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(unknown)} in {source}; known: {', '.join(_BY_KEY)}"
            )
    chosen: dict[str, Any] = {}
    for key, opt in _BY_KEY.items():
        if key in flags:
            chosen[key] = flags[key]
            continue
        for layer, source in layers:
            for spelled in (key, key.replace("_", "-")):
                if spelled in layer and key not in chosen:
                    chosen[key] = _coerce(opt, layer[spelled], source)
        if key not in chosen:
            raw = environ.get(opt.env)
            chosen[key] = opt.default if raw is None else _coerce(opt, raw, f"${opt.env}")
    chosen.pop("config")
    server = ServerConfig(**{opt.dest: chosen.pop(opt.dest) for opt in SERVER_OPTIONS})
    settings = RaySettings(server=server, **chosen)
    if settings.max_replicas < max(1, settings.min_replicas):
        raise SettingsError(
            f"max_replicas ({settings.max_replicas}) must be >= min_replicas "
            f"({settings.min_replicas}) and >= 1"
        )
    return settings
