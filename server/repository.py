"""The model repository: `<dir>/<model>/<version>/model.safetensors`, loaded and warmed up front.

The repository knows models and versions, nothing of gRPC. Each loaded version owns a
`DynamicBatcher`. A model file that cannot be loaded is either fatal (`RepositoryError`, the
default: the server refuses to start) or skipped and listed as UNAVAILABLE with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.server.config import MODEL_FILENAME
from convserve.server.errors import InvalidRequest, ModelNotFound, shown

if TYPE_CHECKING:
    from convserve.core.limits import Limits

log = logging.getLogger(__name__)


MAX_VERSION_DIGITS = 18  # fits an int64, as in Triton's version numbers


def model_limits(config) -> tuple[Limits, int]:
    """The size limits of a `ServerConfig` as the core takes them, with the largest batch a
    model runs (`--max-batch-size`): the `limits` argument of `ModelRepository.load`."""
    from convserve.core.limits import Limits

    limits = Limits(
        config.max_parameters,
        config.max_dimension,
        config.max_image_activation_bytes,
        config.max_batch_bytes,
    )
    return limits, config.max_batch_size


class RepositoryError(Exception):
    """The repository cannot be served (no models, or a model failed to load)."""


def parse_version(text: str) -> int | None:
    """A version number from ASCII digits (>= 1), else None.

    `str.isdigit()` accepts other scripts' digits and superscripts ("²") that `int()` refuses,
    so only 0-9 count; the length bound keeps `int()` cheap on a hostile string.
    """
    if not (0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit()):
        return None
    version = int(text)
    return version if version >= 1 else None


@dataclass
class ModelStats:
    """Counters for the ModelStatistics RPC (Triton semantics, durations in ns)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # images
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, ns]


@dataclass
class ModelVersion:
    """One loaded version of a model, with its batcher and counters."""

    name: str
    version: int
    path: Path
    model: object = None  # convserve.core.Model
    batcher: object = None  # convserve.server.batcher.DynamicBatcher
    state: str = "UNAVAILABLE"  # READY or UNAVAILABLE
    reason: str = ""
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def version_str(self) -> str:
        return str(self.version)

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    def reported_state(self) -> tuple[str, str]:
        """State and reason as RepositoryIndex reports them, checked against the disk.

        A loaded version whose file was removed is reported UNAVAILABLE: nothing is unloaded
        (the loaded copy keeps answering), but the repository no longer holds it.
        """
        if self.ready and not self.path.is_file():
            return "UNAVAILABLE", (
                f"model file {self.path} was removed after loading; the loaded copy keeps "
                "answering until the server restarts"
            )
        return self.state, self.reason


class ModelRepository:
    """Scans a repository folder; `load()` loads every version; `get()` resolves name + version."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self._latest: dict[str, ModelVersion] = {}
        self._by_key: dict[tuple[str, str], ModelVersion] = {}
        self.scan()

    def scan(self) -> None:
        """Find `<model>/<version>/model.safetensors` entries (no loading)."""
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory")
        models: dict[str, dict[int, ModelVersion]] = {}
        for model_dir in sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            versions: dict[int, ModelVersion] = {}
            for version_dir in sorted(
                p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            ):
                version = parse_version(version_dir.name)
                if version is None:
                    log.warning(
                        "model repository: ignoring %s (version folders are positive integers "
                        "written with the ASCII digits 0-9)",
                        version_dir,
                    )
                    continue
                path = version_dir / MODEL_FILENAME
                if not path.is_file():
                    log.warning(
                        "model repository: ignoring %s (no %s inside)", version_dir, MODEL_FILENAME
                    )
                    continue
                versions[version] = ModelVersion(model_dir.name, version, path)
            if versions:
                models[model_dir.name] = versions
            else:
                log.warning(
                    "model repository: ignoring %s (no <version>/%s inside)",
                    model_dir,
                    MODEL_FILENAME,
                )
        if not models:
            raise RepositoryError(
                f"model repository {self.root} holds no models: expected "
                f"<model>/<version>/{MODEL_FILENAME}"
            )
        self.models = models

    def load(
        self,
        make_batcher: Callable[[ModelVersion], object],
        warmup_batch_sizes: tuple[int, ...],
        skip_bad: bool = False,
        limits: tuple[Limits, int] | None = None,
    ) -> None:
        """Load and warm every version, then build its batcher. Bad files: raise or skip (logged).

        `limits` (see `model_limits`) bound what a model may need at its largest batch; a
        model beyond them is a bad model.
        """
        from convserve.core import Model, ModelError  # heavy (numba); only when serving

        size_limits, max_batch_size = limits or (None, 1)
        batch_size = max(max_batch_size, *warmup_batch_sizes)

        for name, versions in self.models.items():
            for version, entry in sorted(versions.items()):
                t0 = time.perf_counter()
                try:
                    model = Model.load(entry.path, size_limits, batch_size)
                    t1 = time.perf_counter()
                    model.warmup(warmup_batch_sizes)
                except (ModelError, OSError, ValueError, MemoryError) as exc:
                    entry.reason = str(exc)
                    if not skip_bad:
                        raise RepositoryError(
                            f"cannot load model '{name}' version {version}: {exc}"
                        ) from None
                    log.error("skipping model '%s' version %d: %s", name, version, exc)
                    continue
                t2 = time.perf_counter()
                entry.model = model
                entry.load_seconds, entry.warmup_seconds = t1 - t0, t2 - t1
                entry.batcher = make_batcher(entry)
                entry.state, entry.reason = "READY", ""
                log.info(
                    "model '%s' version %d ready: %s, input %s, %d classes, loaded in %.2f s, "
                    "warm-up (batch sizes %s) %.2f s",
                    name,
                    version,
                    entry.path,
                    "x".join(map(str, model.input_shape)),
                    model.num_classes,
                    t1 - t0,
                    ",".join(map(str, warmup_batch_sizes)),
                    t2 - t1,
                )
        self._index()
        if not self._latest:
            raise RepositoryError(f"no model in {self.root} could be loaded")

    def _index(self) -> None:
        self._by_key.clear()
        self._latest.clear()
        for name, versions in self.models.items():
            ready = [v for v in versions.values() if v.ready]
            for entry in ready:
                self._by_key[(name, entry.version_str)] = entry
            if ready:
                latest = max(ready, key=lambda v: v.version)
                self._latest[name] = latest
                self._by_key[(name, "")] = latest

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready version `version` of `name` ("" = highest); Triton's errors otherwise."""
        entry = self._by_key.get((name, version))
        if entry is not None:
            return entry
        if name not in self.models:
            known = ", ".join(f"'{m}'" for m in self.models)
            raise InvalidRequest(
                f"Request for unknown model: '{shown(name)}' is not found (available models: {known})"
            )
        if version and parse_version(version) is None:
            raise InvalidRequest(
                f"failed to parse model version '{shown(version)}' for model '{name}': "
                "expected a positive integer written with the ASCII digits 0-9, or empty for the "
                "latest version"
            )
        available = self.ready_versions(name)
        if not available:
            raise ModelNotFound(f"Request for unknown model: '{name}' has no available versions")
        raise ModelNotFound(
            f"Request for unknown model: '{name}' version {version} is not found "
            f"(available versions: {', '.join(available)})"
        )

    def ready_versions(self, name: str) -> list[str]:
        return [str(v) for v, e in sorted(self.models.get(name, {}).items()) if e.ready]

    def entries(self) -> list[ModelVersion]:
        return [entry for versions in self.models.values() for _, entry in sorted(versions.items())]

    def ready_entries(self) -> list[ModelVersion]:
        return [entry for entry in self.entries() if entry.ready]
