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
    build: int = 0  # which file of that version answered (0: the first one expected)


@dataclass
class Traffic:
    target: str
    model: str
    repository: Path
    clients: int = 8
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _expected: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, version: int, path: Path) -> None:
        """Scores version `version` may answer (computed here from its file); a second call for
        the same version adds the scores of a replacement file."""
        from convserve.core import Model

        scores = Model.load(path).predict(self.image.astype(np.float32)).ravel()
        self._expected.setdefault(str(version), []).append(scores)

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
                    builds = [
                        i
                        for i, expected in enumerate(self._expected.get(version, []))
                        if np.allclose(scores, expected, rtol=1e-4, atol=1e-5)
                    ]
                    build = builds[-1] if builds else 0
                    error = "" if builds else f"version {version!r} answered unexpected scores"
                except Exception as exc:  # noqa: BLE001 - every failure is recorded
                    details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                    version, error = "", f"{type(exc).__name__}: {details}"
                    build = 0
                t1 = time.monotonic()
                with self._lock:
                    self.calls.append(Call(t1, version, t1 - t0, error, build))
        finally:
            channel.close()

    def last_version(self) -> str:
        with self._lock:
            return self.calls[-1].version if self.calls else ""

    def wait_for_version(self, version: str, timeout: float, build: int = 0) -> float:
        """Seconds until every client's newest answers come from `version` (and its `build`-th
        expected file); fails at timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self._lock:
                recent = self.calls[-self.clients :]
            if len(recent) == self.clients and all(
                c.version == version and c.build == build for c in recent
            ):
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
