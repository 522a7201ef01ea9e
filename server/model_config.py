"""Per-model settings: the server's defaults, overridden by an optional `<repo>/<model>/config.json`.

```json
{"max_batch_size": 32, "max_queue_delay_us": 500, "instances": 1, "max_queue_size": 256,
 "version_policy": {"latest": 2}, "labels": {"stable": 1, "canary": 2}}
```

Every key is optional. `version_policy` is `{"latest": N}`, `"all"` or `{"specific": [1, 3]}`;
`labels` name versions (a request may ask for model_version "stable"); `latency_slo_ms` (a
number, 0 = off) turns on latency-SLO batching for this model. An unknown key or a bad
value refuses the whole file with one line (`ModelConfigError`): a typo must not silently serve
the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from convserve.server.slo import window_bound_error

CONFIG_FILENAME = "config.json"
MAX_CONFIG_BYTES = 64 * 1024  # a settings file, not a data file
MAX_LABEL_LENGTH = 64
LIMITS = {  # key -> smallest allowed value (all are integers)
    "max_batch_size": 1,
    "max_queue_delay_us": 0,
    "instances": 1,
    "max_queue_size": 0,
}
MAX_INTEGER = 1 << 31


class ModelConfigError(ValueError):
    """A config.json that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk are served: Triton's latest N / all / specific."""

    kind: str = "latest"  # "latest", "all" or "specific"
    latest: int = 1
    specific: tuple[int, ...] = ()

    def select(self, versions: Iterable[int]) -> set[int]:
        ordered = sorted(set(versions))
        if self.kind == "all":
            return set(ordered)
        if self.kind == "specific":
            return set(ordered) & set(self.specific)
        return set(ordered[-self.latest :])

    def describe(self) -> str:
        if self.kind == "specific":
            return f"specific {list(self.specific)}"
        return "all" if self.kind == "all" else f"latest {self.latest}"


@dataclass(frozen=True)
class ModelSettings:
    """The effective settings of one model (what ModelConfig reports)."""

    max_batch_size: int
    max_queue_delay_us: int
    instances: int
    max_queue_size: int
    version_policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict, hash=False)
    latency_slo_ms: float = 0.0  # > 0: adaptive batching window (convserve.server.slo)

    @classmethod
    def defaults(cls, config, policy: VersionPolicy) -> ModelSettings:
        """The server's flags (a `ServerConfig`) with the mode's default version policy."""
        return cls(
            config.max_batch_size,
            config.max_queue_delay_us,
            config.instances,
            config.max_queue_size,
            policy,
            latency_slo_ms=config.latency_slo_ms,
        )


def read_settings(model_dir: Path, defaults: ModelSettings) -> ModelSettings:
    """`defaults` overridden by `model_dir/config.json` (absent: the defaults themselves)."""
    path = Path(model_dir) / CONFIG_FILENAME
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return defaults
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelConfigError(f"{path}: not valid JSON ({first})") from None
    try:
        return _settings(document, defaults)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{path}: {exc}") from None


def _settings(document: object, defaults: ModelSettings) -> ModelSettings:
    if not isinstance(document, dict):
        raise ModelConfigError("expected a JSON object")
    known = {*LIMITS, "version_policy", "labels", "latency_slo_ms"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ModelConfigError(
            f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"[:300]
        )
    changes: dict[str, object] = {}
    for key, least in LIMITS.items():
        if key in document:
            changes[key] = _integer(document[key], key, least)
    if "version_policy" in document:
        changes["version_policy"] = _policy(document["version_policy"])
    if "labels" in document:
        changes["labels"] = _labels(document["labels"])
    if "latency_slo_ms" in document:
        changes["latency_slo_ms"] = _milliseconds(document["latency_slo_ms"])
    settings = replace(defaults, **changes)
    error = window_bound_error(settings.latency_slo_ms, settings.max_queue_delay_us, "key")
    if error:
        raise ModelConfigError(error)
    return settings


def _integer(value: object, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value < MAX_INTEGER:
        raise ModelConfigError(f"{what} must be an integer >= {least}, got {_shown(value)}")
    return value


def _milliseconds(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= 3_600_000
    ):
        raise ModelConfigError(
            f"latency_slo_ms must be a number from 0 to 3600000, got {_shown(value)}"
        )
    return float(value)


def _policy(value: object) -> VersionPolicy:
    if value == "all":
        return VersionPolicy("all")
    if isinstance(value, dict) and len(value) == 1:
        ((kind, argument),) = value.items()
        if kind == "latest":
            return VersionPolicy("latest", latest=_integer(argument, "version_policy latest", 1))
        if kind == "specific" and isinstance(argument, list) and argument:
            versions = tuple(_integer(v, "version_policy specific", 1) for v in argument)
            return VersionPolicy("specific", specific=tuple(sorted(set(versions))))
    raise ModelConfigError(
        'version_policy must be {"latest": N}, "all" or {"specific": [versions]}, got '
        + _shown(value)
    )


def _labels(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ModelConfigError(f"labels must map names to versions, got {_shown(value)}")
    labels = {}
    for name, version in value.items():
        # a label must not look like a version number, or "2" would be ambiguous
        if not (0 < len(name) <= MAX_LABEL_LENGTH and name.isascii() and name.isprintable()):
            raise ModelConfigError(
                f"label names are 1-{MAX_LABEL_LENGTH} printable ASCII characters, got {_shown(name)}"
            )
        if name.isdigit():
            raise ModelConfigError(f"label {name!r} looks like a version number")
        labels[name] = _integer(version, f"label {name!r}", 1)
    return labels


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
