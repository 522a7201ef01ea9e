"""One served model version, and the factory that builds it.

A `ServedVersion` owns everything a loaded version needs to answer: the model and its
instances, the batcher, the wire signature, the Prometheus children and the ModelStatistics
counters, with one success/failure path per request (`outcome`). Loading, swapping and
unloading act on this one object: the repository points at it, requests hold it while they
run, and `close()` lets the queued requests finish before releasing everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convserve.server.model_config import ModelSettings

log = logging.getLogger(__name__)


@dataclass
class ModelStats:
    """Counters for the ModelStatistics RPC, with Triton's semantics (durations in ns).

    success, queue and the three compute stages count successful requests (one each, so the
    compute counts are always equal, as Triton's perf_analyzer requires); a request's compute
    durations are those of the batch(es) it ran in. inference_count counts images,
    execution_count batches; `batches` holds, per batch size, [executions, input ns, infer ns,
    output ns] of the batches themselves.
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0  # decoding the request and assembling its batch
    compute_ns: int = 0  # running the model (compute_infer)
    compute_output_ns: int = 0  # encoding the response
    inference_count: int = 0  # images
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)


class Outcome:
    """One inference request's bookkeeping: Prometheus outcome counters and ModelStatistics."""

    __slots__ = ("metrics", "stats", "t0")

    def __init__(self, metrics: Any, stats: ModelStats, t0: int):
        self.metrics, self.stats, self.t0 = metrics, stats, t0

    def failed(self, reason: str) -> None:
        self.metrics.outcome[reason].inc()
        self.stats.fail_count += 1
        self.stats.fail_ns += time.perf_counter_ns() - self.t0

    def succeeded(self, job, decode_ns: int = 0, encode_ns: int = 0) -> None:
        """`job` finished; decoding its request took `decode_ns`, encoding the answer
        `encode_ns`."""
        elapsed = time.perf_counter_ns() - self.t0
        metrics, stats = self.metrics, self.stats
        metrics.outcome["success"].inc()
        metrics.images.inc(job.size)
        metrics.request_duration.observe(elapsed / 1e9)
        metrics.queue_duration.observe(job.queue_ns / 1e9)
        # one request: every count below moves together (no await between them)
        stats.success_count += 1
        stats.success_ns += elapsed
        stats.queue_ns += job.queue_ns
        stats.compute_input_ns += decode_ns + job.assembly_ns
        stats.compute_ns += job.compute_ns
        stats.compute_output_ns += encode_ns
        stats.inference_count += job.size
        stats.last_inference_ms = int(time.time() * 1000)


class BatchRecorder:
    """Batch hooks: Prometheus histograms and ModelStatistics counters (worker thread)."""

    def __init__(self, metrics, stats: ModelStats):
        self.metrics = metrics
        self.stats = stats

    def on_batch(
        self, batch_size: int, compute_ns: int, input_ns: int = 0, output_ns: int = 0
    ) -> None:
        self.metrics.compute_duration.observe(compute_ns / 1e9)
        self.metrics.batch_size.observe(batch_size)
        self.metrics.sample_queue()
        s = self.stats
        s.execution_count += 1
        slot = s.batches.get(batch_size)
        if slot is None:
            s.batches[batch_size] = [1, input_ns, compute_ns, output_ns]
        else:  # a list replaced whole would race the reader; in-place adds are fine
            slot[0] += 1
            slot[1] += input_ns
            slot[2] += compute_ns
            slot[3] += output_ns


@dataclass
class ServedVersion:
    """A loaded, warm model version that takes requests (built by `VersionFactory.build`)."""

    name: str
    version: int
    path: Path
    settings: ModelSettings
    model: Any  # convserve.core.Model (the first instance)
    batcher: Any  # convserve.server.batcher.DynamicBatcher over every instance
    signature: Any  # convserve.server.protocol.Signature
    metrics: Any  # convserve.server.metrics.ModelMetrics
    fingerprint: tuple = ()  # the files it was built from (see repository.fingerprint)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def version_str(self) -> str:
        return str(self.version)

    @property
    def alive(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    def outcome(self, t0_ns: int) -> Outcome:
        """The success/failure path of one request that started at `t0_ns` (perf_counter_ns)."""
        return Outcome(self.metrics, self.stats, t0_ns)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish the queued and running ones, then release the model,
        its instances and its live gauges; True if the batcher stopped in time. Blocking."""
        stopped = self.batcher.close(timeout)
        self.metrics.forget()
        if stopped:  # a worker still computing keeps its model until it returns
            self.model = self.batcher = None
        return stopped


class VersionFactory:
    """Builds `ServedVersion`s the same way for start-up and for reloads (call from a thread)."""

    def __init__(
        self,
        config,
        metrics,
        on_complete: Callable[[list], None],
        warmup_batch_sizes: tuple[int, ...] = (),
    ):
        self.config = config  # ServerConfig: size limits, --parallel-min-batch, message limits
        self.metrics = metrics  # ServerMetrics
        self.on_complete = on_complete  # finished jobs, from a batcher thread
        self.warmup_batch_sizes = warmup_batch_sizes  # () : 1 and the model's max batch size

    def warmup_sizes(self, settings: ModelSettings) -> tuple[int, ...]:
        return self.warmup_batch_sizes or tuple(sorted({1, settings.max_batch_size}))

    def build(
        self, name: str, version: int, path: Path, settings: ModelSettings, fingerprint: tuple = ()
    ) -> ServedVersion:
        """Load, validate and warm every instance, then start the batcher. Raises ModelError,
        OSError, ValueError or MemoryError with a one-line message on a bad model file."""
        from convserve.core import Model
        from convserve.server.protocol import signature_for

        warmup = self.warmup_sizes(settings)
        t0 = time.perf_counter()
        model = Model.load(
            path,
            size_limits(self.config),
            max(settings.max_batch_size, *warmup),
            plan=self.config.plan_kernels,
            plan_cache=self.config.plan_cache_dir,
            parallel_min_batch=self.config.parallel_min_batch,
        )
        t1 = time.perf_counter()
        # every instance after the first is a copy with its own buffers, warmed the same way
        models = [model] + [model.replica() for _ in range(settings.instances - 1)]
        for copy in models:
            copy.warmup(warmup)
        t2 = time.perf_counter()
        metrics = self.metrics.for_model(name, str(version))
        stats = ModelStats()
        batcher = self._batcher(name, models, settings, BatchRecorder(metrics, stats), metrics)
        metrics.track_queue(lambda: batcher.queued_requests)
        metrics.loaded(t1 - t0, t2 - t1)
        return ServedVersion(
            name,
            version,
            Path(path),
            settings,
            model,
            batcher,
            signature_for(name, model, self.config.max_request_images),
            metrics,
            fingerprint,
            t1 - t0,
            t2 - t1,
            stats,
        )

    def _batcher(
        self,
        name: str,
        models: list,
        settings: ModelSettings,
        recorder: BatchRecorder,
        metrics,
    ):
        import numba
        from convserve.core.threads import threads_by_batch
        from convserve.server.batcher import DynamicBatcher

        cfg = self.config
        share = max(1, numba.config.NUMBA_NUM_THREADS // settings.instances)
        batcher = None

        def alone() -> bool:  # an instance computing alone uses every thread
            return batcher.busy_instances <= 1  # bound below; only called once jobs arrive

        predicts = [
            threads_by_batch(m.predict, cfg.parallel_min_batch, share, alone) for m in models
        ]
        batcher = DynamicBatcher(
            predicts,
            name=name,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
            on_complete=self.on_complete,
            observer=recorder,
            extra_instance_min_images=max(cfg.parallel_min_batch, settings.max_batch_size // 2),
            window=slo_window(settings, metrics.batch_window),
        )
        return batcher


def slo_window(settings: ModelSettings, report: Callable[[float, int], None]):
    """The SLO controller's window for a model with `latency_slo_ms` (None: the fixed window);
    `report(window_s, batch_limit)` receives the window now and whenever it moves."""
    if not settings.latency_slo_ms:
        report(settings.max_queue_delay_us / 1e6, settings.max_batch_size)
        return None
    from convserve.server.slo import SloController, SloWindow

    slo_s = settings.latency_slo_ms / 1000
    bound_s = settings.max_queue_delay_us / 1e6 or slo_s
    window = SloWindow(SloController(slo_s, bound_s, settings.max_batch_size), report)
    report(0.0, window.batch_limit)
    return window


def size_limits(config):
    """The load-time size limits of a `ServerConfig` as the core takes them (a model beyond
    them, at its largest batch, is a bad model)."""
    from convserve.core.limits import Limits

    return Limits(
        config.max_parameters,
        config.max_dimension,
        config.max_image_activation_bytes,
        config.max_batch_bytes,
    )


def completion_on_loop(loop: asyncio.AbstractEventLoop, resolve: Callable[[list], None]):
    """A batcher's `on_complete` that hands finished jobs to `resolve` on the event loop."""

    def on_complete(jobs: list) -> None:
        loop.call_soon_threadsafe(resolve, jobs)

    return on_complete
