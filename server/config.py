"""Server configuration: one table of options, read from flags with `CONVSERVE_*` variables as defaults.

Every option `--some-flag` can also be set by the environment variable `CONVSERVE_SOME_FLAG`;
a flag given on the command line wins over the variable, which wins over the built-in default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "CONVSERVE_"
MODEL_FILENAME = "model.safetensors"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CONTROL_MODES = ("none", "poll", "explicit")
WORKER_ENV = "CONVSERVE_WORKER_INDEX"  # set by the `--workers` supervisor in each worker process


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    return value


def _pos_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port 0-65535, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {text}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    sizes = tuple(int(part) for part in text.replace(" ", "").split(","))
    if any(s < 1 for s in sizes):
        raise ValueError(f"expected comma-separated batch sizes >= 1, got {text!r}")
    return sizes


def _control_mode(text: str) -> str:
    value = text.strip().lower()
    if value not in CONTROL_MODES:
        raise ValueError(f"expected one of {', '.join(CONTROL_MODES)}, got {text!r}")
    return value


def _pos_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"expected a number > 0, got {text}")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3_600_000:
        raise ValueError(f"expected milliseconds from 0 to 3600000, got {text}")
    return value


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated model names (a repeated flag adds to the list)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value


@dataclass(frozen=True)
class Option:
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    repeatable: bool = False  # the flag may be given several times; values add up (a tuple)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "--model-repository",
        str,
        None,
        "model repository <dir>/<model>/<version>/model.safetensors "
        "(default: the bundled models/ folder)",
        "DIR",
    ),
    Option("--host", str, "0.0.0.0", "address to listen on for gRPC and metrics", "HOST"),
    Option("--port", _port, 8001, "gRPC port (0: pick a free one)", "PORT"),
    Option("--metrics-port", _port, 8002, "Prometheus /metrics HTTP port (0: disabled)", "PORT"),
    Option(
        "--max-batch-size", _pos_int, 64, "most images per model execution (1: no batching)", "N"
    ),
    Option(
        "--max-queue-delay-us",
        _nonneg_int,
        0,
        "after a busy period, how long an under-full batch may wait for more requests, counted "
        "from its oldest request (0: take what is queued)",
        "US",
    ),
    Option(
        "--max-queue-size",
        _nonneg_int,
        1024,
        "most requests waiting per model; more are refused with UNAVAILABLE (0: unbounded)",
        "N",
    ),
    Option(
        "--parallel-min-batch",
        _pos_int,
        16,
        "batches smaller than this run on one Numba thread, larger ones on all (small batches gain "
        "little from threads and leave a core to the gRPC event loop); the kernel planner times "
        "them the same way",
        "N",
    ),
    Option(
        "--instances",
        _pos_int,
        2,
        "copies of each model computing batches side by side (Triton's instance count): the first "
        "takes every batch, the others join when at least half a batch is queued; each computes "
        "with max(1, threads / N) Numba threads, or all of them while no other instance computes",
        "N",
    ),
    Option(
        "--max-request-images",
        _pos_int,
        8192,
        "most images in one request (larger requests run in chunks of --max-batch-size)",
        "N",
    ),
    Option(
        "--max-message-bytes",
        _nonneg_int,
        0,
        "gRPC message size limit in bytes (0: automatic, at least 64 MiB)",
        "BYTES",
    ),
    Option(
        "--warmup-batch-sizes",
        _sizes,
        None,
        "batch sizes to run at start-up, comma-separated (default: 1 and --max-batch-size)",
        "LIST",
    ),
    Option(
        "--grace-period",
        _nonneg_float,
        30.0,
        "seconds from SIGTERM/SIGINT to exit, including the drain window",
        "S",
    ),
    Option(
        "--drain-seconds",
        _nonneg_float,
        2.0,
        "after SIGTERM: seconds health reports NOT_SERVING while new requests are still served",
        "S",
    ),
    Option(
        "--skip-bad-models",
        _bool,
        False,
        "start even if a model file cannot be loaded (it is listed as UNAVAILABLE) instead of exiting",
        "BOOL",
    ),
    Option("--log-level", _level, "INFO", f"log level: {', '.join(LOG_LEVELS)}", "LEVEL"),
    Option(
        "--workers",
        _pos_int,
        1,
        "server processes sharing the gRPC port (SO_REUSEPORT), each with its own models, batcher "
        "and max(1, cores / N) Numba threads; metrics are summed over them (needs a fixed --port)",
        "N",
    ),
    Option(
        "--tls-cert-file",
        str,
        None,
        "serve gRPC over TLS with this PEM certificate (chain); a changed file is used for new "
        "connections without a restart",
        "FILE",
    ),
    Option("--tls-key-file", str, None, "the PEM private key of --tls-cert-file", "FILE"),
    Option(
        "--tls-client-ca-file",
        str,
        None,
        "mutual TLS: require client certificates signed by this PEM CA",
        "FILE",
    ),
    Option(
        "--auth-token-file",
        str,
        None,
        "require 'authorization: Bearer <token>' metadata on every call except health, "
        "ServerLive and ServerReady; one token per line, blank lines and # comments ignored, "
        "re-read when it changes",
        "FILE",
    ),
    Option(
        "--allow-insecure-token",
        _bool,
        False,
        "allow --auth-token-file without TLS: tokens then cross the network in clear text, so "
        "only for a port that nothing but a local TLS-terminating proxy (sidecar) can reach",
        "BOOL",
    ),
    Option(
        "--metrics-tls",
        _bool,
        False,
        "serve /metrics over HTTPS with the gRPC certificate (and client CA, if set)",
        "BOOL",
    ),
    Option(
        "--max-connection-age-secs",
        _nonneg_float,
        60.0,
        "close each client connection after about this long (gRPC adds up to 10 percent jitter) so clients "
        "reconnect, re-resolve DNS and spread over new replicas (0: never)",
        "S",
    ),
    Option(
        "--max-connection-age-grace-secs",
        _nonneg_float,
        float("inf"),
        "how long calls already running on a connection closed by --max-connection-age-secs may "
        "take to finish (inf: as long as they need; new calls move to a new connection at once)",
        "S",
    ),
    Option(
        "--keepalive-time-secs",
        _nonneg_float,
        30.0,
        "send a keepalive ping on each client connection (idle ones too) every this many seconds, "
        "to find and drop dead peers (0: never)",
        "S",
    ),
    Option(
        "--keepalive-timeout-secs",
        _nonneg_float,
        10.0,
        "drop a connection whose keepalive ping is not answered within this many seconds",
        "S",
    ),
    Option(
        "--keepalive-min-client-interval-secs",
        _nonneg_float,
        10.0,
        "clients may send keepalive pings this often, also between calls; a client pinging more "
        "often is disconnected (GOAWAY too_many_pings)",
        "S",
    ),
    Option(
        "--max-parameters",
        _nonneg_int,
        1_000_000_000,
        "refuse a model with more weights than this at load (0: no limit)",
        "N",
    ),
    Option(
        "--max-dimension",
        _nonneg_int,
        65_536,
        "refuse a model whose input or any layer output image has a height, width or channel "
        "count above this, or with more classes (0: no limit)",
        "N",
    ),
    Option(
        "--max-image-activation-bytes",
        _nonneg_int,
        1 << 30,
        "refuse a model whose widest layer needs more float32 activation bytes (input + output) "
        "per image (0: no limit)",
        "BYTES",
    ),
    Option(
        "--max-batch-bytes",
        _nonneg_int,
        16 << 30,
        "refuse a model whose batch of --max-batch-size images (inputs plus every image's "
        "activations) would need more bytes (0: no limit)",
        "BYTES",
    ),
    Option(
        "--max-queue-bytes",
        _pos_int,
        512 * 1024 * 1024,
        "most request bytes one server process holds at once (received, queued or computing; "
        "at least 5 x the message limit). A call reserves the message limit before its message "
        "is read; one that finds no room is refused with RESOURCE_EXHAUSTED, unread",
        "BYTES",
    ),
    Option(
        "--model-control-mode",
        _control_mode,
        "none",
        "none: load the repository once at start-up; poll: also follow added, changed and removed "
        "versions, models and config.json files while serving; explicit: load only the models "
        "named by --load-model or the RepositoryModelLoad RPC (see docs/lifecycle.md)",
        "MODE",
    ),
    Option(
        "--repository-poll-secs",
        _pos_float,
        5.0,
        "poll mode: seconds between two reads of the model repository",
        "S",
    ),
    Option(
        "--load-model",
        _names,
        (),
        "explicit mode: a model to load at start-up (repeatable or comma-separated; * = all)",
        "NAME",
        repeatable=True,
    ),
    Option(
        "--latency-slo-ms",
        _milliseconds,
        0.0,
        "p99 latency target (queue + compute) per model: the batching window then adapts to hold "
        "it with batches as large as it allows, bounded by --max-queue-delay-us when that is set "
        "(0: off, the fixed --max-queue-delay-us window; see docs/operations.md)",
        "MS",
    ),
    Option(
        "--plan-kernels",
        _bool,
        True,
        "at load, time the kernel variants of every layer that has a choice (Winograd or "
        "direct, ...) on this machine and keep the fastest, and the most images a pass runs at "
        "once, within 2 s a model (2.5 s with batches over 32); plans are cached (see "
        "--plan-cache-dir). false: the built-in choice",
        "BOOL",
    ),
    Option(
        "--plan-cache-dir",
        str,
        None,
        "where kernel plans are cached (default: $NUMBA_CACHE_DIR/convserve-plans, else "
        "~/.cache/convserve-plans); a directory that cannot be written only costs the timing "
        "at every start",
        "DIR",
    ),
)


def _field_type(opt: Option) -> Any:
    """The type a parsed value has (from the parser's return annotation, or the parser itself)."""
    kind = (
        opt.parse if isinstance(opt.parse, type) else get_type_hints(opt.parse).get("return", Any)
    )
    return kind if opt.default is not None else kind | None


def _as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The effective configuration of one server: one field per option, named after its flag
# (`--max-batch-size` -> `max_batch_size`), with the table's default. Built from OPTIONS so that
# a default is written once; see OPTIONS for the meaning of each field.
ServerConfig = dataclasses.make_dataclass(
    "ServerConfig",
    [(opt.dest, _field_type(opt), field(default=opt.default)) for opt in OPTIONS],
    namespace={"as_dict": _as_dict, "__doc__": "Effective configuration of one server."},
)


def add_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """Add every option; defaults come from `CONVSERVE_*` variables when set (parse errors reported)."""
    environ = os.environ if environ is None else environ
    for opt in OPTIONS:
        raw = environ.get(opt.env)
        # A string default is parsed by argparse only when the flag is absent: the flag wins.
        default = raw if raw is not None else opt.default
        shown = "" if opt.default is None else f" [default: {opt.default}]"
        extra: dict[str, Any] = {}
        if opt.repeatable:  # values add up; the variable's value is parsed in config_from_args
            extra, default = {"action": "append"}, None
        parser.add_argument(
            opt.flag,
            type=_argtype(opt, raw),
            default=default,
            metavar=opt.metavar,
            help=f"{opt.help}{shown} (env {opt.env})",
            **extra,
        )


def _argtype(opt: Option, env_value: str | None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except ValueError as exc:
            source = f" (from the environment variable {opt.env})" if text is env_value else ""
            raise argparse.ArgumentTypeError(f"{exc}{source}") from None

    parse.__name__ = opt.dest
    return parse


def to_flags(config: ServerConfig) -> list[str]:
    """Command-line flags that reproduce `config` (for worker processes)."""
    flags: list[str] = []
    for opt in OPTIONS:
        value = getattr(config, opt.dest)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif opt.repeatable:
            flags += [part for item in value for part in (opt.flag, item)]
            continue
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        flags += [opt.flag, str(value)]
    return flags


def config_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> ServerConfig:
    values = {opt.dest: getattr(args, opt.dest) for opt in OPTIONS}
    environ = os.environ if environ is None else environ
    for opt in OPTIONS:
        if not opt.repeatable:
            continue
        given = values[opt.dest]
        if given is None:  # not on the command line: the variable, else the default
            raw = environ.get(opt.env)
            values[opt.dest] = opt.default if raw is None else opt.parse(raw)
        else:
            values[opt.dest] = tuple(name for part in given for name in part)
    return ServerConfig(**values)


def markdown_table() -> str:
    """The option table as Markdown, for docs/configuration.md (a test checks that the two agree)."""
    rows = ["| Flag | Variable | Default | Meaning |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        flag = f"{opt.flag} {opt.metavar}" if opt.metavar else opt.flag
        value = "true" if opt.default is True else "false" if opt.default is False else opt.default
        shown = "see meaning" if value is None or value == () else f"`{value}`"
        meaning = opt.help.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{opt.env}` | {shown} | {meaning} |")
    return "\n".join(rows)


def candidate_repositories() -> list[Path]:
    """Where the bundled repository may be: next to the source tree (editable install), then ./models."""
    import convserve

    source_root = Path(convserve.__file__).resolve().parent.parent
    return [source_root / "models", Path.cwd() / "models"]


def resolve_repository(configured: str | None) -> Path:
    """The model repository to serve; raises FileNotFoundError with a message saying what to do."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model repository {path} is not a directory "
                f"(from --model-repository or {ENV_PREFIX}MODEL_REPOSITORY)"
            )
        return path.resolve()
    tried = candidate_repositories()
    for path in tried:
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(
        "no model repository: pass --model-repository DIR or set CONVSERVE_MODEL_REPOSITORY "
        f"(the bundled repository was not found at {', '.join(str(p) for p in tried)})"
    )


if __name__ == "__main__":
    print(markdown_table())
