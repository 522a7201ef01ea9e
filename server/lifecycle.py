"""Model control: which versions are served, brought in line with the repository folder.

Modes (Triton's names): `none` loads the repository once at start-up; `poll` re-reads it every
`--repository-poll-secs` and follows added, changed and removed versions, models and
config.json files; `explicit` loads only the models named by `--load-model` or by the
RepositoryModelLoad RPC, and unloads them on RepositoryModelUnload.

Every change keeps the model available: a new or changed version is loaded and warmed in a
background thread while the current one serves, then swapped in (`ModelRepository.publish`);
only then is what it replaces closed, which lets its queued requests finish. A version that
fails to load is UNAVAILABLE with its reason, the previous one keeps serving, and the same file
is not retried until it changes. Operations on one model are serialized (a per-model lock), so
an unload during a load waits for the load and then unloads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from convserve.server.errors import InvalidRequest, ModelNotFound, ServingError, shown
from convserve.server.model_config import (
    ModelConfigError,
    ModelSettings,
    VersionPolicy,
    read_settings,
)
from convserve.server.repository import (
    ModelOnDisk,
    ModelRepository,
    ModelVersion,
    fingerprint,
    scan_disk,
)
from convserve.server.served import ServedVersion, VersionFactory

log = logging.getLogger("convserve.server.lifecycle")

MODES = ("none", "poll", "explicit")
ALL_MODELS = "*"
MAX_NAME_LENGTH = 255


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"
    reason = "invalid"


class ModelLifecycle:
    """Loads, swaps and unloads served versions for one server (event-loop only)."""

    def __init__(
        self,
        repository: ModelRepository,
        factory: VersionFactory,
        mode: str,
        defaults: ModelSettings,
        metrics,
        close_timeout: float = 30.0,
    ):
        self.repository = repository
        self.factory = factory
        self.mode = mode
        self.defaults = defaults  # the server's flags with the mode's default version policy
        self.metrics = metrics  # ServerMetrics: versions gauge and transition counters
        self.close_timeout = close_timeout  # how long an unload waits for in-flight requests
        self.explicit: set[str] = set()  # explicit mode: the models asked for
        self._config_seen: dict[str, tuple] = {}  # model -> config.json fingerprint last read
        self._config_errors: dict[str, str] = {}  # model -> why its config.json was refused
        self._locks: dict[str, asyncio.Lock] = {}
        self.closing = False
        self.only: str | None = None  # index rows of this model only (a Ray Serve replica)

    @staticmethod
    def default_policy(mode: str) -> VersionPolicy:
        """`none` serves every version (as before modes existed); the others, Triton's latest 1."""
        return VersionPolicy("all") if mode == "none" else VersionPolicy("latest", latest=1)

    # -- entry points ----------------------------------------------------------------------
    async def start(self, load_models: tuple[str, ...] = ()) -> list[str]:
        """The start-up load; returns one line per version or config that failed."""
        disk = await in_daemon_thread(scan_disk, self.repository.root)
        if self.mode == "explicit":
            names = set(disk) if ALL_MODELS in load_models else set(load_models)
            missing = sorted(names - set(disk))
            if missing:
                return [
                    f"--load-model {shown(n)}: no such model in the repository" for n in missing
                ]
            self.explicit = names
        else:
            names = set(disk)
        failures: list[str] = []
        for name in sorted(names):
            failures += await self.sync_model(name, disk.get(name))
        return failures

    async def poll(self) -> None:
        """One pass over the whole repository (poll mode)."""
        disk = await in_daemon_thread(scan_disk, self.repository.root)
        for name in sorted(set(disk) | set(self.repository.models)):
            if self.closing:
                return
            await self.sync_model(name, disk.get(name))

    async def poll_forever(self, seconds: float) -> None:
        while not self.closing:
            await asyncio.sleep(seconds)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - one bad pass must not stop the polling
                log.exception("repository poll failed; retrying in %.1f s", seconds)

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: load (or re-read) `name`; raises ServingError when it fails."""
        self._require("load", name)
        disk = await in_daemon_thread(scan_disk, self.repository.root, name)
        if name not in disk:
            raise ModelNotFound(
                f"failed to load '{shown(name)}': no such model folder in the repository "
                f"{self.repository.root}"
            )
        self.explicit.add(name)
        failures = await self.sync_model(name, disk[name])
        if failures:
            raise InvalidRequest(f"failed to load '{name}': {'; '.join(failures)}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving every version of `name` once in-flight requests
        finished (an unknown or unloaded model is a success, as in Triton)."""
        self._require("unload", name)
        self.explicit.discard(name)
        if self._lock(name).locked():
            log.info("model '%s': unload waits for the operation under way", name)
        async with self._lock(name):
            for entry in list(self.repository.models.get(name, {}).values()):
                await self._unload(entry, "unloaded")

    async def close_all(self, timeout: float) -> bool:
        """At shutdown: stop polling and close every served version; True if all stopped."""
        self.closing = True
        deadline = time.monotonic() + timeout
        stopped = True
        for served in self.repository.served_versions():
            left = max(0.1, deadline - time.monotonic())
            stopped &= await in_daemon_thread(served.close, left)
        return stopped

    # -- one model -------------------------------------------------------------------------
    async def sync_model(self, name: str, on_disk: ModelOnDisk | None) -> list[str]:
        """Bring `name` in line with its folder; returns one line per failure."""
        async with self._lock(name):
            if self.mode == "explicit" and name not in self.explicit:
                return []
            if on_disk is None or not on_disk.versions:
                where = "removed from the repository"
                for entry in list(self.repository.models.get(name, {}).values()):
                    await self._unload(entry, where, drop=True)
                if name in self.repository.models:
                    self.repository.forget(name)
                    self._config_seen.pop(name, None)
                    self._config_errors.pop(name, None)
                return []
            settings, error = self._settings(name, on_disk)
            if settings is None:
                for version, path in on_disk.versions.items():
                    entry = self.repository.record(name, version, path)
                    if not entry.ready:
                        entry.state, entry.reason = "UNAVAILABLE", error
                return [error]
            failures = await self._sync_versions(name, on_disk, settings)
            return [error, *failures] if error else failures

    async def _sync_versions(
        self, name: str, on_disk: ModelOnDisk, settings: ModelSettings
    ) -> list[str]:
        policy = settings.version_policy
        wanted = policy.select(on_disk.versions)
        failures = []
        for version in sorted(wanted):
            entry = self.repository.record(name, version, on_disk.versions[version])
            key = (on_disk.version_fingerprint(version), settings)
            served = entry.served
            if served is not None and (served.fingerprint, served.settings) == key:
                continue
            if entry.failed == key:  # the same file failed before: retried once it changes
                failures.append(entry.reason)
                continue
            error = await self._load(entry, settings, key)
            if error:
                failures.append(error)
        versions = self.repository.models.get(name, {})
        wanted_serves = any(versions[v].ready for v in wanted if v in versions)
        for version, entry in sorted(versions.items()):
            if version in wanted:
                continue
            on_disk_now = version in on_disk.versions
            if entry.ready and not wanted_serves:
                # availability first: the version being replaced serves until one the
                # policy selects is loaded, even if its folder was removed meanwhile
                entry.reason = (
                    f"kept serving: no version selected by the version policy "
                    f"({policy.describe()}) could be loaded"
                )
                continue
            if on_disk_now:
                await self._unload(
                    entry, f"unloaded: not selected by the version policy ({policy.describe()})"
                )
            else:
                await self._unload(entry, "removed from the repository", drop=True)
        return failures

    def _settings(self, name: str, on_disk: ModelOnDisk) -> tuple[ModelSettings | None, str]:
        """The model's settings: config.json re-read when it changed; a bad one is refused
        with one line and the previous settings stay (None only if there are none yet)."""
        previous = self.repository.settings.get(name)
        if name in self._config_seen and self._config_seen[name] == on_disk.config:
            return previous, self._config_errors.get(name, "")
        self._config_seen[name] = on_disk.config
        self._config_errors.pop(name, None)
        try:
            settings = read_settings(on_disk.folder, self.defaults)
        except ModelConfigError as exc:
            kept = "keeping its previous configuration" if previous else "not loaded"
            log.error("model '%s': config.json refused, %s: %s", name, kept, exc)
            self.metrics.transition(name, "config", "failure")
            self._config_errors[name] = f"config.json refused: {exc}"
            return previous, self._config_errors[name]
        if previous is not None and settings != previous:
            log.info("model '%s': config.json changed; reloading its versions", name)
        self.repository.settings[name] = settings
        self.repository._index()  # labels may have changed
        return settings, ""

    async def _load(self, entry: ModelVersion, settings: ModelSettings, key: tuple) -> str:
        """Build a new ServedVersion for `entry` and swap it in; returns "" or the failure."""
        from convserve.core import ModelError

        replacing = entry.served is not None
        if not replacing:
            entry.state, entry.reason = "LOADING", ""
        t0 = time.perf_counter()
        try:
            served = await in_daemon_thread(
                self.factory.build, entry.name, entry.version, entry.path, settings, key[0]
            )
        except (ModelError, OSError, ValueError, MemoryError) as exc:
            return self._failed(entry, key, str(exc), t0)
        if fingerprint(entry.path) != key[0]:
            # written to while it loaded (an unsafe copy): the next poll tries the final file
            await in_daemon_thread(served.close, self.close_timeout)
            return self._failed(entry, (), "the file changed while it loaded", t0)
        if self.closing:
            await in_daemon_thread(served.close, self.close_timeout)
            return "the server is shutting down"
        previous = self._publish(entry, served, t0, replacing)
        if previous is not None:
            await self._close(previous, entry.name, entry.version, "replaced")
        return ""

    def _publish(
        self, entry: ModelVersion, served: ServedVersion, t0: float, replacing: bool = False
    ) -> ServedVersion | None:
        """Swap `served` in for `entry`, count and log it; returns the build it replaced."""
        previous = self.repository.publish(entry, served)
        entry.failed = ()
        self.metrics.transition(entry.name, "load", "success")
        self.metrics.versions_loaded.inc()
        log.info(
            "model '%s' version %d %s in %.2f s (load %.2f s, warm-up %.2f s): %s, input %s, "
            "%d classes, max batch %d, %d instance(s)",
            entry.name,
            entry.version,
            "swapped in" if replacing else "loaded",
            time.perf_counter() - t0,
            served.load_seconds,
            served.warmup_seconds,
            entry.path,
            "x".join(map(str, served.model.input_shape)),
            served.model.num_classes,
            served.settings.max_batch_size,
            served.settings.instances,
        )
        return previous

    def load_blocking(self, only: str | None = None) -> list[str]:
        """The start-up load without an event loop (a Ray Serve replica's constructor): every
        model (or `only`) with the versions its policy selects; returns the failures."""
        from convserve.core import ModelError

        failures: list[str] = []
        for name, on_disk in scan_disk(self.repository.root, only).items():
            settings, error = self._settings(name, on_disk)
            if settings is None:
                failures.append(error)
                continue
            for version in sorted(settings.version_policy.select(on_disk.versions)):
                entry = self.repository.record(name, version, on_disk.versions[version])
                key = (on_disk.version_fingerprint(version), settings)
                t0 = time.perf_counter()
                try:
                    served = self.factory.build(name, version, entry.path, settings, key[0])
                except (ModelError, OSError, ValueError, MemoryError) as exc:
                    failures.append(self._failed(entry, key, str(exc), t0))
                    continue
                self._publish(entry, served, t0)
        return failures

    def _failed(self, entry: ModelVersion, key: tuple, error: str, t0: float) -> str:
        line = " ".join(error.split()) or "unknown error"
        entry.failed = key
        if entry.served is not None:
            entry.reason = f"a new build failed to load, the previous one keeps serving: {line}"
        else:
            entry.state, entry.reason = "UNAVAILABLE", line
        self.metrics.transition(entry.name, "load", "failure")
        log.error(
            "skipping model '%s' version %d: %s (load failed after %.2f s%s)",
            entry.name,
            entry.version,
            line,
            time.perf_counter() - t0,
            "; the previous build keeps serving" if entry.served is not None else "",
        )
        return f"model '{entry.name}' version {entry.version}: {line}"

    async def _unload(self, entry: ModelVersion, reason: str, drop: bool = False) -> None:
        """Stop routing to `entry`, then wait for its in-flight requests and release it."""
        served = self.repository.publish(entry, None)
        entry.state, entry.reason, entry.failed = "UNAVAILABLE", reason, ()
        if drop:
            self.repository.models.get(entry.name, {}).pop(entry.version, None)
        if served is not None:
            entry.state = "UNLOADING"
            await self._close(served, entry.name, entry.version, reason)
            entry.state = "UNAVAILABLE"

    async def _close(self, served: ServedVersion, name: str, version: int, why: str) -> None:
        t0 = time.perf_counter()
        stopped = await in_daemon_thread(served.close, self.close_timeout)
        self.metrics.versions_loaded.dec()
        self.metrics.transition(name, "unload", "success" if stopped else "failure")
        log.log(
            logging.INFO if stopped else logging.ERROR,
            "model '%s' version %d unloaded (%s) in %.2f s%s",
            name,
            version,
            why,
            time.perf_counter() - t0,
            "" if stopped else f"; its batcher did not stop within {self.close_timeout:.0f} s",
        )

    # -- helpers ---------------------------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _require(self, action: str, name: str) -> None:
        if self.mode != "explicit":
            raise FailedPrecondition(
                f"cannot {action} '{shown(name)}': the model control mode is '{self.mode}'; "
                "explicit model load and unload need --model-control-mode explicit"
            )
        if not valid_model_name(name):
            raise InvalidRequest(
                f"cannot {action} '{shown(name)}': a model name is a folder of the repository "
                f"(1-{MAX_NAME_LENGTH} printable characters, no '/', not starting with '.')"
            )

    def index_rows(self, disk: dict[str, ModelOnDisk]) -> list[tuple[str, str, str, str]]:
        """RepositoryIndex rows (name, version, state, reason): every version known or on disk."""
        rows = []
        names = set(disk) | set(self.repository.models)
        for name in sorted(names if self.only is None else names & {self.only}):
            known = self.repository.models.get(name, {})
            on_disk = disk.get(name)
            versions = set(known) | set(on_disk.versions if on_disk else ())
            if not versions:
                rows.append((name, "", "UNAVAILABLE", "no <version>/model.safetensors inside"))
            for version in sorted(versions):
                entry = known.get(version)
                if entry is None:
                    rows.append((name, str(version), "", ""))  # never loaded (Triton: no state)
                    continue
                state, reason = entry.state, entry.reason
                if entry.ready and (on_disk is None or version not in on_disk.versions):
                    state, reason = (
                        "UNAVAILABLE",
                        (
                            f"model file {entry.path} was removed after loading; the loaded copy "
                            "keeps answering until it is unloaded or the server restarts"
                        ),
                    )
                rows.append((name, str(version), state, reason))
        return rows


def valid_model_name(name: str) -> bool:
    return (
        0 < len(name) <= MAX_NAME_LENGTH
        and name.isprintable()
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    )


def in_daemon_thread(fn, *args) -> asyncio.Future:
    """Run fn(*args) in a daemon thread, awaitable from the event loop (a shutdown never waits
    for a model still compiling)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result=None, error=None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: the server stopped meanwhile
            pass

    threading.Thread(
        target=target, name=f"model-{getattr(fn, '__name__', 'task')}", daemon=True
    ).start()
    return future
