"""Dynamic batching of image requests in front of one model version.

The batcher knows NumPy arrays and futures, nothing of gRPC or protobuf. One worker thread per
model instance (Triton's instance group: a copy of the model with its own buffers, usually one)
takes queued requests and runs its `predict` (Numba releases the GIL) on their stacked images:

* a request that arrives while the worker is idle starts at once: there is no artificial wait;
* requests queued while the model computes form the next batch, oldest first (a higher
  `priority`, i.e. a smaller positive number, goes ahead of the default 0), up to
  `max_batch_size` images; several multi-image requests share one batch;
* with `max_queue_delay_us` > 0, a batch formed after a busy period that is not full may wait
  for more requests until its oldest request has waited that long;
* a request with more images than `max_batch_size` is split into chunks of at most
  `max_batch_size` images, queued one after the other; its result is reassembled in order;
* a full queue (`max_queue_size` requests) rejects at once (`QueueFull`);
* requests that were cancelled, whose deadline passed, or whose queue `timeout` expired leave
  the queue before compute;
* if a batch raises, each member is re-run alone, so only the culprit fails;
* with several instances, the first takes every batch as before and the others take a batch
  when at least `extra_instance_min_images` images are queued, so large batches (chunks of one
  large request too) compute side by side while single-image traffic keeps forming batches on
  one instance;
* with a `window` (`convserve.server.slo.SloWindow`, `--latency-slo-ms`) the wait and the batch
  size limit come from a latency-SLO controller instead of `max_queue_delay_us`, and every
  executed batch is reported to it. This window also holds a request that finds the model idle
  when the batch before it joined several requests (concurrent callers keep coming; a lone
  caller still starts at once);
* a worker holding an under-full batch is woken when the batch fills or its wait ends, not by
  every request that joins it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from convserve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
    ServingError,
    Unavailable,
)

if TYPE_CHECKING:
    from convserve.server.slo import SloWindow

log = logging.getLogger(__name__)

DEFAULT_PRIORITY_LEVEL = 1 << 62  # priority 0 ("model default") sorts after every explicit level


class Job:
    """One request: its images, its limits, and (when done) its result or error."""

    __slots__ = (
        "images",
        "size",
        "deadline_ns",
        "timeout_ns",
        "level",
        "arrival_ns",
        "future",
        "cancelled",
        "result",
        "error",
        "queue_ns",
        "assembly_ns",
        "compute_ns",
        "batch_size",
        "_parts_left",
        "_queued_parts",
        "_queued_images",
        "_taken",
        "_removed",
    )

    def __init__(
        self,
        images: np.ndarray,
        deadline_ns: int | None,
        timeout_ns: int | None,
        level: int,
        future: Any,
    ):
        self.images = images
        self.size = images.shape[0]
        self.deadline_ns = deadline_ns  # absolute time.monotonic_ns(); None = no deadline
        self.timeout_ns = timeout_ns  # absolute queue timeout (Triton `timeout`); None = none
        self.level = level
        self.arrival_ns = time.monotonic_ns()
        self.future = future
        self.cancelled = False
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.queue_ns = 0  # arrival -> start of (first) compute
        self.assembly_ns = 0  # building the batch(es) it ran in (ModelStatistics compute_input)
        self.compute_ns = 0  # compute time of the batch(es) it ran in
        self.batch_size = 0  # images in the (largest) batch it ran in
        self._parts_left = 0
        self._queued_parts = 0
        self._queued_images = 0
        self._taken = False  # a chunk has left the queue for compute
        self._removed = False  # abandoned while queued; its entries are skipped when popped

    def cancel(self) -> None:
        """Mark the job abandoned by its caller; it leaves the queue before compute."""
        self.cancelled = True


def _set_concurrent_future(jobs: list[Job]) -> None:
    for job in jobs:
        fut = job.future
        if isinstance(fut, Future) and not fut.done():
            fut.set_result(job)


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def on_batch(  # pragma: no cover - trivial
        self, batch_size: int, compute_ns: int, input_ns: int = 0, output_ns: int = 0
    ) -> None:
        """One execution: `input_ns` built the batch, `compute_ns` ran the model, `output_ns`
        handed the rows out to the requests (0 when the batch failed)."""


class DynamicBatcher:
    """A queue and one worker thread per instance running `predict` on batches of up to
    `max_batch_size` images. `predict` is one function, or one per instance.

    `on_complete(jobs)` is called from a worker thread with every finished job (success or
    error); the default sets `job.future` (a `concurrent.futures.Future`) to the job itself.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray] | list[Callable[[np.ndarray], np.ndarray]],
        *,
        name: str = "model",
        max_batch_size: int = 64,
        max_queue_delay_us: int = 0,
        max_queue_size: int = 0,
        on_complete: Callable[[list[Job]], None] | None = None,
        observer: BatchObserver | None = None,
        extra_instance_min_images: int = 1,
        window: SloWindow | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_us < 0 or max_queue_size < 0:
            raise ValueError("max_queue_delay_us and max_queue_size must be >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.max_queue_size = max_queue_size  # requests; 0 = unbounded
        predicts = list(predict) if isinstance(predict, (list, tuple)) else [predict]
        if not predicts:
            raise ValueError("at least one predict function (instance) is needed")
        self.instances = len(predicts)
        self._extra_min = max(1, extra_instance_min_images)
        self._on_complete = on_complete or _set_concurrent_future
        self._observer = observer or BatchObserver()
        self._delay_ns = max_queue_delay_us * 1000
        self._window = window  # None: the fixed max_queue_delay_us and max_batch_size
        self._heap: list[tuple[int, int, Job, int, int]] = []  # (level, seq, job, start, stop)
        self._seq = itertools.count()
        self._queued_requests = 0
        self._queued_images = 0
        self.ns_per_image = 0.0  # moving average of compute time per image (for retry pushback)
        self._closed = False
        self.busy_instances = 0  # instances computing a batch right now
        self._waiting = [0, 0]  # idle workers: the first instance, the other instances
        self._last_requests = 0  # requests in the batch taken last
        self._holding = [0, 0]  # the same: workers holding an under-full batch, ...
        self._hold_limit = [0, 0]  # ... woken once this many images are queued
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the first instance waits here
        self._extra_cond = threading.Condition(lock)  # the others (same lock), woken
        # only once enough images are queued: waking them for every request costs throughput
        self._deliver_lock = (
            threading.Lock()
        )  # chunks of one job may finish on two instances at once
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(fn, i),
                daemon=True,
                name=f"batcher-{name}" + (f"-{i}" if len(predicts) > 1 else ""),
            )
            for i, fn in enumerate(predicts)
        ]
        for thread in self._threads:
            thread.start()

    # -- queue side ------------------------------------------------------------------------
    @property
    def queued_requests(self) -> int:
        return self._queued_requests

    def submit(
        self,
        images: np.ndarray,
        *,
        deadline_ns: int | None = None,
        timeout_ns: int | None = None,
        priority: int = 0,
        future: Any = None,
    ) -> Job:
        """Queue `images` (N, H, W, C); returns the job, whose `future` completes with it.

        Raises `QueueFull` at once when `max_queue_size` requests are already waiting, and
        `Unavailable` once the batcher is closed.
        """
        level = priority if priority > 0 else DEFAULT_PRIORITY_LEVEL
        job = Job(images, deadline_ns, timeout_ns, level, Future() if future is None else future)
        n = job.size
        step = self.max_batch_size
        with self._cond:
            if self._closed:
                raise Unavailable(f"Server exiting: model '{self.name}' no longer accepts requests")
            if self.max_queue_size and self._queued_requests >= self.max_queue_size:
                raise QueueFull(
                    f"Exceeds maximum queue size: {self._queued_requests} requests are queued for model "
                    f"'{self.name}', the maximum is {self.max_queue_size}"
                )
            if n <= step:
                job._parts_left = job._queued_parts = 1
                heapq.heappush(self._heap, (level, next(self._seq), job, 0, n))
            else:
                parts = range(0, n, step)
                job._parts_left = job._queued_parts = len(parts)
                for start in parts:
                    heapq.heappush(
                        self._heap, (level, next(self._seq), job, start, min(start + step, n))
                    )
            job._queued_images = n
            self._queued_requests += 1
            self._queued_images += n
            # a busy worker finds the request when it looks next; one holding an under-full
            # batch is woken only once the batch is full (waking it on every request costs
            # each request a thread switch and two GIL hand-overs)
            queued = self._queued_images
            full = [bool(self._holding[k]) and queued >= self._hold_limit[k] for k in (0, 1)]
            if self._waiting[0] or full[0]:
                self._cond.notify()
            if (self._waiting[1] and queued >= self._extra_min) or full[1]:
                self._extra_cond.notify()
        return job

    @property
    def alive(self) -> bool:
        """True while the batcher accepts requests and every worker thread runs (readiness)."""
        return not self._closed and all(thread.is_alive() for thread in self._threads)

    def drain_estimate_ms(self) -> int:
        """Rough time until the current queue is computed (a retry hint for refused callers)."""
        return int(min(10_000, max(1.0, self._queued_images * self.ns_per_image / 1e6)))

    def abandon(self, job: Job, error: ServingError) -> bool:
        """Take a job out of the queue if none of it has started; True if it was removed.

        The job then fails with `error`, frees its queue slot at once and is never computed.
        When a chunk already runs (False), its result or error will come as usual.
        """
        with self._cond:
            if job._taken or job._removed or job._parts_left == 0:
                return False
            job._removed = True
            job.cancelled = True
            job.error = error
            self._queued_requests -= 1
            self._queued_images -= job._queued_images
            job._queued_images = 0
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish the queued ones, stop the worker; True if it stopped in time."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._extra_cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- worker side -----------------------------------------------------------------------
    def _run(self, predict: Callable[[np.ndarray], np.ndarray], index: int) -> None:
        least = (
            0 if index == 0 else self._extra_min
        )  # images queued before this instance takes a batch
        kind = min(index, 1)
        cond = self._cond if index == 0 else self._extra_cond
        idle = True
        while True:
            with self._cond:
                while not self._heap or self._queued_images < least:
                    if self._closed:
                        return
                    idle = True
                    self._waiting[kind] += 1
                    cond.wait()
                    self._waiting[kind] -= 1
                window = self._window
                delay_ns, limit = (
                    (window.delay_ns, window.batch_limit)
                    if window
                    else (self._delay_ns, self.max_batch_size)
                )
                # the fixed window holds only batches formed after a busy period; the SLO
                # window also holds one that starts an idle model while the last batch joined
                # several requests (concurrent callers: a lone caller never waits)
                hold = not idle or (window is not None and self._last_requests > 1)
                if hold and delay_ns:
                    self._wait_for_more(cond, kind, delay_ns, limit)
                # the window decided this batch: it could be held and leaves under-full
                windowed = hold and self._queued_images < limit
                batch, dropped = self._take(limit)
                if batch:
                    self.busy_instances += 1
                    self._last_requests = len(batch)
            idle = False
            if dropped:
                self._on_complete(dropped)
            if batch:
                try:
                    self._execute(batch, predict, windowed)
                finally:
                    with self._cond:
                        self.busy_instances -= 1

    def _wait_for_more(
        self, cond: threading.Condition, kind: int, delay_ns: int, limit: int
    ) -> None:
        """Hold a batch under `limit` images until its oldest request has waited `delay_ns`."""
        # another instance may take the queue while this one waits (the lock is released)
        while self._heap and self._queued_images < limit and not self._closed:
            oldest = min(entry[2].arrival_ns for entry in self._heap)
            remaining = oldest + delay_ns - time.monotonic_ns()
            if remaining <= 0:
                return
            self._holding[kind] += 1
            self._hold_limit[kind] = limit  # the same for every worker: the window's or the max
            cond.wait(remaining / 1e9)
            self._holding[kind] -= 1

    def _take(self, limit: int) -> tuple[list[tuple[Job, int, int]], list[Job]]:
        """Pop live entries (oldest first within a priority) up to `limit` images (at least one
        entry: a chunk is at most max_batch_size images, and `limit` may be smaller)."""
        batch: list[tuple[Job, int, int]] = []
        dropped: list[Job] = []
        images = 0
        now = time.monotonic_ns()
        heap = self._heap
        while heap:
            _, _, job, start, stop = heap[0]
            if images and images + (stop - start) > limit:
                break
            heapq.heappop(heap)
            if job._removed:  # abandoned: already uncounted and answered
                continue
            self._queued_images -= stop - start
            job._queued_images -= stop - start
            job._queued_parts -= 1
            if job._queued_parts == 0:
                self._queued_requests -= 1
            if job.error is not None:  # an earlier chunk of this job already failed
                continue
            error = self._dead(job, now)
            if error is not None:
                job.error = error
                self._forget_parts(job)
                dropped.append(job)
                continue
            job._taken = True
            batch.append((job, start, stop))
            images += stop - start
        return batch, dropped

    def _dead(self, job: Job, now: int) -> ServingError | None:
        if job.cancelled:
            return Cancelled(f"request for model '{self.name}' was cancelled by the client")
        if job.deadline_ns is not None and now >= job.deadline_ns:
            waited = (now - job.arrival_ns) / 1e6
            return DeadlineExceeded(
                f"Deadline Exceeded: the request's deadline passed after {waited:.1f} ms "
                f"in the queue of model '{self.name}', before compute"
            )
        if job.timeout_ns is not None and now >= job.timeout_ns:
            waited = (now - job.arrival_ns) / 1e6
            return RequestTimeout(
                f"Request timeout expired: the request waited {waited:.1f} ms in the queue "
                f"of model '{self.name}', longer than its 'timeout' parameter"
            )
        return None

    def _forget_parts(self, job: Job) -> None:
        """Remove a failed job's other queued chunks (they are skipped lazily when popped)."""
        job._parts_left = 0

    def _execute(
        self,
        batch: list[tuple[Job, int, int]],
        predict: Callable[[np.ndarray], np.ndarray],
        windowed: bool = False,
    ) -> None:
        started = time.monotonic_ns()
        if len(batch) == 1:
            job, start, stop = batch[0]
            x = job.images if (start == 0 and stop == job.size) else job.images[start:stop]
        else:
            x = np.concatenate([job.images[start:stop] for job, start, stop in batch])
        assembled = time.monotonic_ns()
        try:
            out = predict(x)
            failed = False
        except Exception:  # noqa: BLE001 - isolated below
            failed = True
        finished = time.monotonic_ns()
        compute = finished - assembled
        assembly = assembled - started
        total = x.shape[0]
        per_image = compute / total
        self.ns_per_image = (
            per_image if not self.ns_per_image else 0.9 * self.ns_per_image + 0.1 * per_image
        )
        done: list[Job] = []
        if failed:
            self._observer.on_batch(total, compute, assembly)
            if len(batch) > 1:
                log.warning(
                    "model '%s': a batch of %d images from %d requests failed; re-running each alone",
                    self.name,
                    total,
                    len(batch),
                )
            for job, start, stop in batch:
                self._execute_alone(job, start, stop, started, done, predict)
        else:
            offset = 0
            with self._deliver_lock:
                for job, start, stop in batch:
                    n = stop - start
                    job.assembly_ns += assembly
                    self._deliver(
                        job, start, stop, out[offset : offset + n], started, compute, total, done
                    )
                    offset += n
            self._observer.on_batch(total, compute, assembly, time.monotonic_ns() - finished)
        if self._window is not None:
            self._window.observe((job.arrival_ns for job in done), total, compute, windowed)
        if done:
            self._on_complete(done)

    def _execute_alone(
        self,
        job: Job,
        start: int,
        stop: int,
        batch_started: int,
        done: list[Job],
        predict: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        t0 = time.monotonic_ns()
        try:
            out = predict(job.images[start:stop])
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            with self._deliver_lock:
                if job.error is None:
                    job.error = _as_serving_error(exc, self.name)
                    job._parts_left = 0
                    done.append(job)
            return
        finished = time.monotonic_ns()
        with self._deliver_lock:
            self._deliver(job, start, stop, out, batch_started, finished - t0, stop - start, done)
        self._observer.on_batch(stop - start, finished - t0, 0, time.monotonic_ns() - finished)

    @staticmethod
    def _deliver(
        job: Job,
        start: int,
        stop: int,
        rows: np.ndarray,
        started: int,
        compute: int,
        batch: int,
        done: list[Job],
    ) -> None:
        if job.error is not None:
            return
        if job._parts_left == 1 and start == 0 and stop == job.size:
            job.result = rows
        else:
            if job.result is None:
                job.result = np.empty((job.size, rows.shape[1]), rows.dtype)
            job.result[start:stop] = rows
        if job.queue_ns == 0:
            job.queue_ns = started - job.arrival_ns
        job.compute_ns += compute
        job.batch_size = max(job.batch_size, batch)
        job._parts_left -= 1
        if job._parts_left == 0:
            done.append(job)


def _as_serving_error(exc: BaseException, model: str) -> ServingError:
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ValueError):  # convserve.core.ModelError: the input was unusable
        return InvalidRequest(f"model '{model}' rejected the input: {exc}")
    return ServingError(
        f"model '{model}' failed: {type(exc).__name__}: {exc}", code="INTERNAL", reason="error"
    )
