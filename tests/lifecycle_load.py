"""Continuous inference traffic for the model lifecycle tests (not a test module).

`Traffic` runs N client threads, each with its own channel, sending one image to a model's
latest version in a loop and checking every answer against the local copy of the version that
answered. It records each call (time, version, latency, error) for the test's verdict.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from tests import server_harness as h


@dataclass
class Call:
    t: float  # time.monotonic() at the answer
    version: str
    seconds: float
    error: str = ""


@dataclass
class Traffic:
    target: str
    model: str
    repository: Path
    clients: int = 8
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _expected: dict[str, np.ndarray] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, version: int, path: Path) -> None:
        """The scores version `version` must answer (computed here from its file)."""
        from convserve.core import Model

        self._expected[str(version)] = Model.load(path).predict(self.image.astype(np.float32))

    @property
    def image(self) -> np.ndarray:
        return h.images(1, seed=5)

    def start(self) -> Traffic:
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        stub, channel = h.stub(self.target)
        request = h.infer_request(self.model, self.image)
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    response = stub.ModelInfer(request, timeout=30)
                    version = response.model_version
                    scores = np.frombuffer(response.raw_output_contents[0], np.float32)
                    expected = self._expected.get(version)
                    error = ""
                    if expected is None:
                        error = f"answered by unexpected version {version!r}"
                    elif not np.allclose(scores, expected.ravel(), rtol=1e-4, atol=1e-5):
                        error = f"version {version} answered wrong scores"
                except Exception as exc:  # noqa: BLE001 - every failure is recorded
                    details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                    version, error = "", f"{type(exc).__name__}: {details}"
                t1 = time.monotonic()
                with self._lock:
                    self.calls.append(Call(t1, version, t1 - t0, error))
        finally:
            channel.close()

    def last_version(self) -> str:
        with self._lock:
            return self.calls[-1].version if self.calls else ""

    def wait_for_version(self, version: str, timeout: float) -> float:
        """Seconds until every client's newest answers come from `version` (fails at timeout)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self._lock:
                recent = self.calls[-self.clients :]
            if len(recent) == self.clients and all(c.version == version for c in recent):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"answers did not switch to version {version} within {timeout} s")

    def failures(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.error]

    def worst_second(self, around: float, window: float = 5.0) -> tuple[float, int]:
        """(max latency in s, calls) in the worst one-second bucket within `window` s of `around`."""
        with self._lock:
            calls = [c for c in self.calls if abs(c.t - around) <= window]
        buckets: dict[int, list[float]] = {}
        for c in calls:
            buckets.setdefault(int(c.t - around + window), []).append(c.seconds)
        if not buckets:
            return 0.0, 0
        worst = max(buckets.values(), key=max)
        return max(worst), len(calls)


def publish(model_dir: Path, version: int, write) -> Path:
    """The safe publish: write the version in a hidden folder, then rename it into place."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir(parents=True)
    write(staging / "model.safetensors")
    final = model_dir / str(version)
    staging.rename(final)
    return final / "model.safetensors"
