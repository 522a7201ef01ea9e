"""Closed-loop client load for the replica tests (not a test module).

`ClientLoad` runs threads that each call `call(rng)` in a loop until the `with` block ends,
counting successful calls and keeping every failure, for tests that kill or scale replicas
while traffic flows and then check that no call failed, or compare throughputs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


class ClientLoad:
    """`threads` threads calling `call(rng)` (rng: the thread's own seeded generator)."""

    def __init__(self, call: Callable[[np.random.Generator], Any], threads: int = 4):
        self.call = call
        self.calls = 0
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(threads)
        ]

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        while not self._stop.is_set():
            try:
                self.call(rng)
            except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
                with self._lock:
                    self.failures.append(exc)
                continue
            with self._lock:
                self.calls += 1

    def __enter__(self) -> ClientLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def rate(self, seconds: float) -> float:
        """Successful calls per second over the next `seconds`."""
        before, t0 = self.calls, time.perf_counter()
        time.sleep(seconds)
        return (self.calls - before) / (time.perf_counter() - t0)
