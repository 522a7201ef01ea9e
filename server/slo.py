"""Latency-SLO batching: a batching window that adapts to keep p99 latency under a target.

With `--latency-slo-ms T` the fixed `--max-queue-delay-us` window gives way to a controller:

* every request's latency in the batcher (queue + compute, from its arrival to the end of its
  batch) is observed; a control period ends after `PERIOD_REQUESTS` requests, or after
  `PERIOD_SECONDS` once `MIN_REQUESTS` were seen, and its p99 is compared with T;
* AIMD on the window, as Clipper does on its batch size: p99 above T multiplies the window by
  `BACKOFF`; p99 at or below `HEADROOM` x T adds `STEP_FRACTION` x T, but only when the window
  decided a batch in that period (a batch formed after a busy period and sent under-full), so
  it does not wind up while batches fill anyway or the model is idle;
* an open window whose held batches still average fewer than `MIN_GATHER` images gathers
  nothing and only adds latency (very low load): it shrinks by `BACKOFF` too;
* the batch size is capped as Nexus does: a request that just misses a batch waits for it and
  then runs in the next, so two executions of a batch must fit in T. A least-squares fit
  t(n) = a*n + c over the last batches gives the largest such n (never below 1, nor below a
  size seen to run in T/2) and also keeps the window at most T - t(cap): a held request waits
  the window, then its own batch;
* the window stays within [0, upper bound]: `--max-queue-delay-us` when set, else T itself.

`SloController` is pure (observations in, window out; time is passed in), so it can be driven by a
simulated clock; `SloWindow` is what the batcher's worker threads call.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

PERIOD_REQUESTS = 200  # a control period: this many requests (p99 = the 3rd slowest) ...
PERIOD_SECONDS = 1.0  # ... or this long, once MIN_REQUESTS were seen (low load)
MIN_REQUESTS = 20
HEADROOM = 0.8  # grow the window only while p99 <= HEADROOM x SLO
STEP_FRACTION = 1 / 16  # additive increase: SLO / 16 per period
BACKOFF = 0.7  # multiplicative decrease when p99 > SLO (gentler than TCP's halving, as Clipper)
MIN_GATHER = 1.1  # images per held batch below which an open window gathers too little
FIT_BATCHES = 64  # batches in the service-time fit
FIT_MIN_SAMPLES = 3  # batches of one size before its median joins the fit


def window_bound_error(slo_ms: float, max_queue_delay_us: int, what: str = "flag") -> str | None:
    """Why `max_queue_delay_us` cannot bound the window under an SLO of `slo_ms` (None: fine).

    `what` names the settings in the message: "flag" (--options) or "key" (config.json keys).
    """
    if not slo_ms or max_queue_delay_us < slo_ms * 1000:
        return None
    delay, slo = (
        ("--max-queue-delay-us", "--latency-slo-ms")
        if what == "flag"
        else ("max_queue_delay_us", "latency_slo_ms")
    )
    return (
        f"{delay} {max_queue_delay_us} ({max_queue_delay_us / 1000:g} ms) must be below "
        f"{slo} {slo_ms:g}: with an SLO it is the upper bound of the adaptive batching window "
        f"(0: bounded by the SLO itself)"
    )


class ServiceModel:
    """Least-squares fit of batch compute time t(n) = a*n + c over the last batches.

    The fit goes through the median time of each batch size seen at least `FIT_MIN_SAMPLES`
    times: on a shared machine one preempted batch must not tilt the line (and cap batches).
    """

    def __init__(self, keep: int = FIT_BATCHES):
        self._samples: deque[tuple[int, float]] = deque(maxlen=keep)
        self.per_image = 0.0  # a, seconds per image
        self.overhead = 0.0  # c, seconds per batch
        self.fitted = False
        self._points: list[tuple[int, float]] = []  # (batch size, median seconds) of the fit

    def add(self, images: int, seconds: float) -> None:
        self._samples.append((images, seconds))

    def refit(self) -> None:
        by_size: dict[int, list[float]] = {}
        for n, t in self._samples:
            by_size.setdefault(n, []).append(t)
        points = [
            (n, statistics.median(ts)) for n, ts in by_size.items() if len(ts) >= FIT_MIN_SAMPLES
        ]
        self._points = points
        if len(points) < 2:
            return  # one batch size says nothing about the slope: keep the last fit
        count = len(points)
        mean_n = sum(n for n, _ in points) / count
        mean_t = sum(t for _, t in points) / count
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / spread
        self.per_image = max(slope, 0.0)
        self.overhead = max(mean_t - self.per_image * mean_n, 0.0)
        self.fitted = True

    def seconds(self, images: int) -> float:
        """Predicted compute time of a batch of `images` (0 before a fit)."""
        return self.per_image * images + self.overhead if self.fitted else 0.0

    def largest_batch(self, budget: float, most: int) -> int:
        """The largest batch (1..most) whose predicted time is at most `budget` seconds."""
        if not self.fitted or self.seconds(most) <= budget:
            return most
        # never below a size actually seen to run within the budget: the line is an estimate
        seen = max((n for n, t in self._points if t <= budget), default=1)
        if self.per_image <= 0:
            return min(most, seen)
        predicted = math.floor((budget - self.overhead) / self.per_image)
        return max(1, min(most, max(predicted, seen)))


class SloController:
    """AIMD on the batching window against a p99 latency target (pure: no clock, no threads)."""

    def __init__(self, slo_s: float, max_window_s: float, max_batch_size: int):
        if not slo_s > 0:
            raise ValueError(f"the latency SLO must be > 0 seconds, got {slo_s}")
        if not 0 <= max_window_s <= slo_s:
            raise ValueError(f"the window bound must be within [0, SLO], got {max_window_s}")
        self.slo_s = slo_s
        self.max_window_s = max_window_s
        self.max_batch_size = max_batch_size
        self.step_s = slo_s * STEP_FRACTION
        self.window_s = 0.0  # start like the fixed default: take what is queued
        self.batch_limit = max_batch_size
        self.service = ServiceModel()
        self.last_p99_s = 0.0  # the last period's p99, images per held batch, held batches
        self.last_gathered = 0.0
        self.last_windowed = 0
        self.adjustments = {"up": 0, "down": 0}
        self._latencies: list[float] = []
        self._windowed = 0  # batches of this period whose dispatch the window decided
        self._windowed_images = 0
        self._period_start: float | None = None

    def observe_batch(self, images: int, compute_s: float, windowed: bool) -> None:
        """One executed batch; `windowed`: it formed after a busy period and left under-full."""
        self.service.add(images, compute_s)
        if windowed:
            self._windowed += 1
            self._windowed_images += images

    def observe_latencies(self, latencies_s: Iterable[float]) -> None:
        """Queue + compute latency of finished requests."""
        self._latencies.extend(latencies_s)

    def update(self, now_s: float) -> bool:
        """End the control period if it is long enough, and adjust; True if a period ended."""
        if self._period_start is None:
            self._period_start = now_s
        seen = len(self._latencies)
        long_enough = seen >= PERIOD_REQUESTS or (
            seen >= MIN_REQUESTS and now_s - self._period_start >= PERIOD_SECONDS
        )
        if not long_enough:
            return False
        self.last_gathered = self._windowed_images / self._windowed if self._windowed else 0.0
        self.last_windowed = self._windowed
        self._adjust(_p99(self._latencies))
        self._latencies = []
        self._windowed = self._windowed_images = 0
        self._period_start = now_s
        return True

    def _adjust(self, p99: float) -> None:
        self.last_p99_s = p99
        service = self.service
        service.refit()
        # Nexus: a request that just misses a batch waits for it, then runs in the next one
        self.batch_limit = service.largest_batch(self.slo_s / 2, self.max_batch_size)
        # a held request waits at most the window (or the running batch), then its own batch
        ceiling = min(self.max_window_s, max(0.0, self.slo_s - service.seconds(self.batch_limit)))
        window = self.window_s
        gathers_nothing = window and self._windowed and self.last_gathered < MIN_GATHER
        if p99 > self.slo_s or gathers_nothing:
            window *= BACKOFF
            if window < self.step_s / 4:  # a sliver of a window only adds latency
                window = 0.0
            self.adjustments["down"] += window < self.window_s
        elif p99 <= HEADROOM * self.slo_s and self._windowed:
            window = min(ceiling, window + self.step_s)
            self.adjustments["up"] += window > self.window_s
        self.window_s = min(window, ceiling)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class SloWindow:
    """The batcher's view of a `SloController`: thread-safe, on the monotonic clock.

    The worker threads read `delay_ns` and `batch_limit` before forming a batch and report each
    executed batch to `observe`; `on_change(window_s, batch_limit)` is called (from a worker
    thread) whenever the controller moves, e.g. to set a metrics gauge.
    """

    def __init__(
        self,
        controller: SloController,
        on_change: Callable[[float, int], None] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ):
        self.controller = controller
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()  # several instances report batches side by side
        self.delay_ns = 0
        self.batch_limit = controller.batch_limit

    def observe(
        self, arrivals_ns: Iterable[int], images: int, compute_ns: int, windowed: bool
    ) -> None:
        """A batch ended now: its requests' arrival times, its size and compute time."""
        now = self._clock()
        with self._lock:
            controller = self.controller
            controller.observe_batch(images, compute_ns / 1e9, windowed)
            controller.observe_latencies((now - arrived) / 1e9 for arrived in arrivals_ns)
            if not controller.update(now / 1e9):
                return
            before = (self.delay_ns, self.batch_limit)
            self.delay_ns = round(controller.window_s * 1e9)
            self.batch_limit = controller.batch_limit
            changed = (self.delay_ns, self.batch_limit) != before
        log.debug(
            "SLO window: p99 %.2f ms, %d batches held by the window, %.2f images each -> "
            "window %.2f ms, batch limit %d",
            controller.last_p99_s * 1e3,
            controller.last_windowed,
            controller.last_gathered,
            controller.window_s * 1e3,
            controller.batch_limit,
        )
        if changed and self._on_change is not None:
            self._on_change(controller.window_s, controller.batch_limit)
