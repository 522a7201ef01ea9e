"""The model repository: `<dir>/<model>/<version>/model.safetensors` on disk, and what is served.

The repository knows models and versions, nothing of gRPC. `scan_disk` reads the folder;
`ModelRepository` keeps one `ModelVersion` record per version it knows (state and reason, as
RepositoryIndex reports them) pointing at the `ServedVersion` that answers for it, and resolves
a request's model name and version. What to load and when is `convserve.server.lifecycle`'s job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.server.config import MODEL_FILENAME
from convserve.server.errors import InvalidRequest, ModelNotFound, shown
from convserve.server.model_config import CONFIG_FILENAME

if TYPE_CHECKING:
    from convserve.server.model_config import ModelSettings
    from convserve.server.served import ServedVersion

log = logging.getLogger(__name__)


MAX_VERSION_DIGITS = 18  # fits an int64, as in Triton's version numbers


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


def fingerprint(path: Path) -> tuple:
    """What identifies a file's content cheaply: (inode, size, mtime); () if it is absent.

    A rename into place changes the inode, a copy in progress the size and mtime.
    """
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ModelOnDisk:
    """One `<repo>/<model>/` folder: its version files and its config.json's fingerprint."""

    folder: Path
    versions: dict[int, Path] = field(default_factory=dict)
    config: tuple = ()  # fingerprint of config.json, () when absent

    def version_fingerprint(self, version: int) -> tuple:
        return fingerprint(self.versions[version])


def scan_disk(root: Path, only: str | None = None) -> dict[str, ModelOnDisk]:
    """The models in `root` (or just `only`): `<model>/<version>/model.safetensors` entries.

    Hidden folders (".tmp-v3", a safe publish's staging place) and non-numeric version folders
    are ignored; a version folder without its model file yet is skipped (not an error).
    """
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    if only is not None:
        folders = [root / only] if _visible_dir(root / only) else []
    else:
        folders = sorted(p for p in root.iterdir() if _visible_dir(p))
    found: dict[str, ModelOnDisk] = {}
    for model_dir in folders:
        entry = ModelOnDisk(model_dir, config=fingerprint(model_dir / CONFIG_FILENAME))
        try:
            version_dirs = sorted(p for p in model_dir.iterdir() if _visible_dir(p))
        except OSError:  # removed while scanning
            continue
        for version_dir in version_dirs:
            version = parse_version(version_dir.name)
            if version is None:
                _warn_once(
                    version_dir,
                    "ignoring %s (version folders are positive integers written with the ASCII "
                    "digits 0-9)",
                )
                continue
            path = version_dir / MODEL_FILENAME
            if path.is_file():
                entry.versions[version] = path
        found[model_dir.name] = entry
    return found


_warned: set[Path] = set()  # folders already reported: a poll does not repeat the warning


def _warn_once(path: Path, message: str) -> None:
    if path not in _warned:
        _warned.add(path)
        log.warning("model repository: " + message, path)


def _visible_dir(path: Path) -> bool:
    return not path.name.startswith(".") and path.is_dir()


@dataclass
class ModelVersion:
    """What the repository knows of one version: its file, state, reason and served object.

    `served` answers requests while set, also when state is UNAVAILABLE because a newer file of
    the same version failed to load (the previous build keeps serving)."""

    name: str
    version: int
    path: Path
    state: str = "UNAVAILABLE"  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str = ""
    served: ServedVersion | None = None
    failed: tuple = ()  # the (file, settings) that failed to load: retried only once changed

    @property
    def version_str(self) -> str:
        return str(self.version)

    @property
    def ready(self) -> bool:
        return self.served is not None


class ModelRepository:
    """The versions known, and the lookup of a request's model and version to a ServedVersion.

    Event-loop only: records change between requests, never under one.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory")
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.settings: dict[str, ModelSettings] = {}  # the effective settings of each model
        self._by_key: dict[tuple[str, str], ServedVersion] = {}

    def record(self, name: str, version: int, path: Path) -> ModelVersion:
        """The record of `name` version `version`, created if new."""
        versions = self.models.setdefault(name, {})
        entry = versions.get(version)
        if entry is None:
            entry = versions[version] = ModelVersion(name, version, path)
        entry.path = path
        return entry

    def publish(self, entry: ModelVersion, served: ServedVersion | None) -> ServedVersion | None:
        """Let `served` answer for `entry` (None: stop serving it); returns what it replaced.

        New requests reach the new object at once; requests already holding the old one
        finish on it."""
        previous, entry.served = entry.served, served
        if served is not None:
            entry.state, entry.reason = "READY", ""
        self._index()
        return previous

    def forget(self, name: str) -> None:
        """Drop every record of a model that left the disk (nothing of it is served)."""
        self.models.pop(name, None)
        self.settings.pop(name, None)
        self._index()

    def _index(self) -> None:
        by_key: dict[tuple[str, str], ServedVersion] = {}
        for name, versions in self.models.items():
            served = [e.served for e in versions.values() if e.served is not None]
            for item in served:
                by_key[(name, item.version_str)] = item
            if served:
                by_key[(name, "")] = max(served, key=lambda s: s.version)
            settings = self.settings.get(name)
            for label, version in (settings.labels if settings else {}).items():
                if (name, str(version)) in by_key:
                    by_key[(name, label)] = by_key[(name, str(version))]
        self._by_key = by_key

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The served version `version` (a number, a label or "" = highest) of `name`."""
        served = self._by_key.get((name, version))
        if served is not None:
            return served
        if name not in self.models:
            known = ", ".join(f"'{m}'" for m in self.models)
            raise InvalidRequest(
                f"Request for unknown model: '{shown(name)}' is not found (available models: {known})"
            )
        settings = self.settings.get(name)
        labels = settings.labels if settings else {}
        if version and version not in labels and parse_version(version) is None:
            raise InvalidRequest(
                f"failed to parse model version '{shown(version)}' for model '{name}': "
                "expected a positive integer written with the ASCII digits 0-9, a label of the "
                "model's config.json, or empty for the latest version"
            )
        available = self.ready_versions(name)
        if not available:
            states = ", ".join(
                f"version {e.version} {e.state}" + (f" ({e.reason})" if e.reason else "")
                for _, e in sorted(self.models[name].items())
            )
            raise ModelNotFound(
                f"Request for unknown model: '{name}' has no available versions"
                + (f": {states}" if states else "")
            )
        what = f"label '{shown(version)}'" if version in labels else f"version {version}"
        raise ModelNotFound(
            f"Request for unknown model: '{name}' {what} is not found "
            f"(available versions: {', '.join(available)})"
        )

    def ready_versions(self, name: str) -> list[str]:
        return [str(v) for v, e in sorted(self.models.get(name, {}).items()) if e.ready]

    def entries(self) -> list[ModelVersion]:
        return [entry for versions in self.models.values() for _, entry in sorted(versions.items())]

    def ready_entries(self) -> list[ModelVersion]:
        return [entry for entry in self.entries() if entry.ready]

    def served_versions(self) -> list[ServedVersion]:
        return [entry.served for entry in self.ready_entries()]
