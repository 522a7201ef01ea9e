"""Health as Kubernetes reads it: readiness follows the server's real state, liveness stays cheap.

grpc.health.v1 service names (kubelet's native gRPC probes name one in `service:`):
- "readiness", "" and "inference.GRPCInferenceService": SERVING only when every loaded model
  version can compute; NOT_SERVING while warming up, reloading models or draining. ServerReady
  answers the same.
- "liveness": SERVING from the moment the port listens, through warm-up and drain, so a slow
  compile or a drain never gets the container restarted. NOT_SERVING only when a model's batcher
  thread died outside a shutdown: a state that no wait cures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("convserve.server")

READINESS_SERVICES = ("", "readiness", "inference.GRPCInferenceService")
LIVENESS_SERVICE = "liveness"
CHECK_PERIOD_SECONDS = 0.5  # how often the state is re-read besides the explicit refreshes


@dataclass(frozen=True)
class Verdict:
    ready: bool
    reason: str


def _stopped(repository) -> list[str]:
    """Loaded model versions whose batcher can no longer compute."""
    return [
        f"'{e.name}' version {e.version}"
        for e in repository.ready_entries()
        if e.batcher is None or not e.batcher.alive
    ]


def readiness(state, repository) -> Verdict:
    """Whether this replica should get traffic now, and why (state: servicer.ServerState)."""
    if state.exiting:
        return Verdict(False, "draining: the server is shutting down")
    if not state.ready:
        return Verdict(False, "warming up: models are loading")
    if state.reloading:
        return Verdict(False, "reloading: models are being loaded and warmed up")
    if repository is None or not repository.ready_entries():
        return Verdict(False, "no model version is loaded")
    stopped = _stopped(repository)
    if stopped:
        return Verdict(False, f"cannot compute: the batcher of {', '.join(stopped)} stopped")
    return Verdict(True, "every loaded model version can compute")


def liveness(state, repository) -> bool:
    """False only when a loaded model's batcher died while the server is meant to serve."""
    if state.exiting or not state.ready or repository is None:
        return True
    return not _stopped(repository)


class HealthReporter:
    """Keeps the grpc.health.v1 statuses equal to `readiness` and `liveness` (event-loop only)."""

    def __init__(self, health, state, repository: Callable[[], object]):
        self.health = health  # grpc_health.v1._async.HealthServicer
        self.state = state
        self.repository = repository
        self._shown: tuple[bool, bool] | None = None

    async def refresh(self) -> Verdict:
        from grpc_health.v1 import health_pb2

        repository = self.repository()
        verdict = readiness(self.state, repository)
        live = liveness(self.state, repository)
        if (verdict.ready, live) != self._shown:
            status = health_pb2.HealthCheckResponse
            for name in READINESS_SERVICES:
                await self.health.set(name, status.SERVING if verdict.ready else status.NOT_SERVING)
            await self.health.set(LIVENESS_SERVICE, status.SERVING if live else status.NOT_SERVING)
            if self._shown is not None:
                log.log(
                    logging.INFO if live else logging.ERROR,
                    "health: readiness %s (%s), liveness %s",
                    "SERVING" if verdict.ready else "NOT_SERVING",
                    verdict.reason,
                    "SERVING" if live else "NOT_SERVING",
                )
            self._shown = (verdict.ready, live)
        return verdict

    async def watch(self) -> None:
        """Re-read the state periodically (changes nobody announced, e.g. a dead batcher)."""
        while True:
            await asyncio.sleep(CHECK_PERIOD_SECONDS)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad read
                log.exception("health: cannot evaluate readiness")
