"""Prometheus metrics of the server, in a registry of its own, served on http://HOST:PORT/metrics.

Per request the servicer touches a pre-bound counter child and three histogram children; the
queue depth is read by Prometheus from the batcher on scrape (no per-request cost).

Under `--workers N` each worker runs in prometheus-client's multiprocess mode (the supervisor sets
PROMETHEUS_MULTIPROC_DIR and serves the sum): gauges then say how to combine workers, and the
queue depth, which a scrape cannot read from another process, is sampled after every batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("success", "invalid", "rejected", "timeout", "cancelled", "error")
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The collectors; `for_model()` returns pre-bound children for one model version."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("model", "version")
        self.requests = Counter(
            "convserve_requests",
            "Inference requests by outcome (success, invalid, rejected, timeout, cancelled, error)",
            labels + ("outcome",),
            registry=r,
        )
        self.refusals = Counter(
            "convserve_refusals",
            "Calls refused before their message was read or by gRPC itself, by method and reason "
            "(memory: byte budget full; concurrency: too many calls; message_size: over the "
            "gRPC message limit); ModelInfer refusals also count in convserve_requests_total "
            'with model="" and outcome "rejected"',
            ("method", "reason"),
            registry=r,
        )
        self.images = Counter(
            "convserve_inference_images", "Images inferred successfully", labels, registry=r
        )
        self.request_duration = Histogram(
            "convserve_request_duration_seconds",
            "Request time in the server, from decoding to response (successful requests)",
            labels,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "convserve_queue_duration_seconds",
            "Time a request waited in the batch queue",
            labels,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "convserve_compute_duration_seconds",
            "Model execution time per batch",
            labels,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "convserve_batch_size",
            "Images per model execution",
            labels,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.queue_depth = Gauge(
            "convserve_queue_depth",
            "Requests waiting in the batch queue",
            labels,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_window = Gauge(
            "convserve_batch_window_seconds",
            "How long an under-full batch may wait for more requests now: --max-queue-delay-us, "
            "or with --latency-slo-ms the window the SLO controller chose",
            labels,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.batch_limit = Gauge(
            "convserve_batch_limit",
            "Most images per model execution now: --max-batch-size, or with --latency-slo-ms "
            "the controller's cap (two executions must fit in the SLO)",
            labels,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.load_seconds = Gauge(
            "convserve_model_load_seconds",
            "Time to load the model file",
            labels,
            registry=r,
            multiprocess_mode="max",
        )
        self.warmup_seconds = Gauge(
            "convserve_model_warmup_seconds",
            "Time to compile and warm the model up",
            labels,
            registry=r,
            multiprocess_mode="max",
        )
        self.ready = Gauge(
            "convserve_server_ready",
            "1 when the server is ready (all models loaded and warm)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.auth_refusals = Counter(
            "convserve_auth_refusals",
            "Calls refused for their token, by reason (missing, malformed, unknown)",
            ("reason",),
            registry=r,
        )

        self.owners: dict[tuple[str, str], ModelMetrics] = {}
        self.versions_loaded = Gauge(
            "convserve_model_versions_loaded",
            "Model versions loaded and serving",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.transitions = Counter(
            "convserve_model_transitions",
            "Model lifecycle transitions by action (load, unload, config) and outcome "
            "(success, failure)",
            ("model", "action", "outcome"),
            registry=r,
        )

    def transition(self, model: str, action: str, outcome: str) -> None:
        """Count one load, unload or config.json read of `model` and how it ended."""
        self.transitions.labels(model, action, outcome).inc()

    def refused(self, reason: str) -> None:
        """Count a call refused by the token check."""
        self.auth_refusals.labels(reason).inc()

    def refused_early(self, method: str, reason: str) -> None:
        """A call refused before its model was known (see `convserve.server.admission`)."""
        name = method.rsplit("/", 1)[-1]
        self.refusals.labels(name, reason).inc()
        if name == "ModelInfer":
            self.requests.labels("", "", "rejected").inc()

    def for_model(self, model: str, version: str) -> ModelMetrics:
        bound = ModelMetrics(self, model, version)
        self.owners[(model, version)] = bound  # a reload of the same version takes them over
        return bound


class ModelMetrics:
    """Children bound to one model version (label lookups done once)."""

    def __init__(self, metrics: ServerMetrics, model: str, version: str):
        self._parent, self._labels = metrics, (model, version)
        self.outcome = {o: metrics.requests.labels(model, version, o) for o in OUTCOMES}
        self.images = metrics.images.labels(model, version)
        self.request_duration = metrics.request_duration.labels(model, version)
        self.queue_duration = metrics.queue_duration.labels(model, version)
        self.compute_duration = metrics.compute_duration.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self._queue_depth = metrics.queue_depth.labels(model, version)
        self._multiprocess = metrics.multiprocess
        self._depth: Callable[[], float] | None = None
        self._load = metrics.load_seconds.labels(model, version)
        self._warmup = metrics.warmup_seconds.labels(model, version)
        self._window = metrics.batch_window.labels(model, version)
        self._limit = metrics.batch_limit.labels(model, version)

    def track_queue(self, depth: Callable[[], float]) -> None:
        if self._multiprocess:
            self._depth = depth
        else:
            self._queue_depth.set_function(depth)

    def sample_queue(self) -> None:
        """Multiprocess mode: record the queue depth now (called after each batch)."""
        if self._depth is not None:
            self._queue_depth.set(self._depth())

    def batch_window(self, window_seconds: float, batch_limit: int) -> None:
        """The batching window and batch size limit in force (set when they change)."""
        self._window.set(window_seconds)
        self._limit.set(batch_limit)

    def loaded(self, load_seconds: float, warmup_seconds: float) -> None:
        self._load.set(load_seconds)
        self._warmup.set(warmup_seconds)

    def forget(self) -> None:
        """An unloaded version: drop its live gauges (the queue reader would keep its batcher
        alive); its counters and histograms stay, as Prometheus counters must."""
        self._depth = None
        parent = self._parent
        if parent.owners.get(self._labels) is not self:
            return  # a newer build of the same version uses these children now
        del parent.owners[self._labels]
        gauges = (
            parent.queue_depth,
            parent.load_seconds,
            parent.warmup_seconds,
            parent.batch_window,
            parent.batch_limit,
        )
        for gauge in gauges:
            try:
                gauge.remove(*self._labels)
            except KeyError:
                pass
