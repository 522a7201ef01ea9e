"""A discrete-event simulation of one batcher instance on a virtual clock (not a test module).

It follows the batcher's rules (server/batcher.py): a request arriving while the worker is idle
starts at once (with a controller: unless the batch before it joined several requests); a batch
formed after a busy period waits until its oldest request has waited
the window, or until `limit` images are queued; a batch takes at most `limit` requests. The
service time of a batch of n is `overhead + per_image * n` seconds: batching pays. Arrivals are
seeded Poisson, with a rate that changes in steps (a load ramp). No threads, no sleeps.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from convserve.server.slo import SloController


@dataclass
class Step:
    """One ramp step's results: requests that arrived in it, and what the policy did."""

    rate: float
    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    windows: list[float] = field(default_factory=list)  # window in force at each batch

    def p99(self, settle: float = 0.0) -> float:
        """p99 latency of the requests after `settle` of this step's seconds (convergence)."""
        values = sorted(self._late(self.latencies, settle))
        return values[max(0, math.ceil(0.99 * len(values)) - 1)]

    def mean_batch(self, settle: float = 0.0) -> float:
        values = self._late(self.batches, settle)
        return sum(values) / len(values)

    def _late(self, values: list, settle: float) -> list:
        # entries are kept in time order; the last (1 - settle/duration) share of the step
        share = 1 - settle / (self.end - self.start)
        return values[int(len(values) * (1 - share)) :]


def arrivals(rates: list[float], seconds_per_step: float, seed: int) -> list[float]:
    """Poisson arrival times for consecutive steps of `rates` requests per second."""
    rng = random.Random(seed)
    times: list[float] = []
    for index, rate in enumerate(rates):
        t, end = index * seconds_per_step, (index + 1) * seconds_per_step
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                break
            times.append(t)
    return times


def simulate(
    rates: list[float],
    seconds_per_step: float,
    *,
    overhead: float,
    per_image: float,
    max_batch_size: int,
    controller: SloController | None = None,
    fixed_window: float = 0.0,
    seed: int = 1,
) -> list[Step]:
    """Run the ramp through a fixed window, or through `controller`; results per step."""
    times = arrivals(rates, seconds_per_step, seed)
    steps = [
        Step(rate, i * seconds_per_step, (i + 1) * seconds_per_step) for i, rate in enumerate(rates)
    ]
    queue: deque[float] = deque()
    now, next_index, idle, last_requests = 0.0, 0, True, 0

    def admit(until: float) -> None:
        nonlocal next_index
        while next_index < len(times) and times[next_index] <= until:
            queue.append(times[next_index])
            next_index += 1

    while next_index < len(times) or queue:
        if not queue:  # the worker sleeps until the next request, which then starts at once
            now, idle = max(now, times[next_index]), True
        admit(now)
        window = controller.window_s if controller else fixed_window
        limit = controller.batch_limit if controller else max_batch_size
        hold = not idle or (controller is not None and last_requests > 1)
        if hold and window and len(queue) < limit:
            deadline = queue[0] + window
            admit(deadline)
            now = max(now, queue[limit - 1] if len(queue) >= limit else deadline)
        windowed = hold and len(queue) < limit
        batch = [queue.popleft() for _ in range(min(limit, len(queue)))]
        last_requests = len(batch)
        seconds = overhead + per_image * len(batch)
        now += seconds
        step = steps[min(int(batch[0] // seconds_per_step), len(steps) - 1)]
        step.latencies.extend(now - arrived for arrived in batch)
        step.batches.append(len(batch))
        step.windows.append(window)
        if controller:
            controller.observe_batch(len(batch), seconds, windowed)
            controller.observe_latencies(now - arrived for arrived in batch)
            controller.update(now)
        admit(now)
        idle = False
    return steps
