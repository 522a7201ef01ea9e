"""The one place that wires config, repository, batchers, metrics, health and the gRPC server.

Lifecycle: listen at once (ServerLive true, health NOT_SERVING) -> load and warm every model
version in a thread -> SERVING / ServerReady true -> on SIGTERM or SIGINT: health NOT_SERVING at
once, keep serving for the drain window, then hold new calls unread, finish every accepted request,
stop the transport (GOAWAY), answer the held calls UNAVAILABLE, stop the batchers and return 0
within the grace period (docs/operations.md says why in that order).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time

import grpc
from convserve.core.threads import threads_by_batch
from convserve.server.config import WORKER_ENV, ServerConfig, resolve_repository

from convserve import __version__

SETTLE_SECONDS = 0.2  # at shutdown: from the last answered call to stopping the transport
GOAWAY_SECONDS = 0.1  # at shutdown: from the transport's GOAWAY to answering the held calls
MAX_CONNECTIONS = 1024  # per server process; more are closed at accept (UNAVAILABLE)
MESSAGE_OVERHEAD = 1 << 20  # protobuf framing, names, parameters around the pixels
FALLBACK_IMAGE_BYTES = 224 * 224 * 3 * 4  # a model whose header cannot be read: assume this
PEEK_HEADER_BYTES = 16 << 20  # larger model headers are not read for the message limit

log = logging.getLogger("convserve.server")


class StartupError(Exception):
    """The server cannot start; the message says why (no traceback is shown)."""


def message_limit(config: ServerConfig, image_bytes: int) -> int:
    """Configured limit, or the largest legal request: --max-request-images FP32 images of the
    largest model (`image_bytes` each, FP32), plus framing."""
    if config.max_message_bytes:
        return config.max_message_bytes
    return min(config.max_request_images * image_bytes + MESSAGE_OVERHEAD, 2**31 - 1)


def largest_image_bytes(repository) -> int:
    """Bytes of one FP32 image of the largest model input, read from the model files' headers
    (before they are loaded, so the listener gets its message limit at once)."""
    largest = 0
    for versions in repository.models.values():
        for entry in versions.values():
            shape = peek_input_shape(entry.path)
            elements = FALLBACK_IMAGE_BYTES // 4 if shape is None else math.prod(shape)
            largest = max(largest, elements * 4)
    return largest


def peek_input_shape(path) -> tuple[int, ...] | None:
    """The input shape in a model file's header, or None if it cannot be read (the model's load
    reports why)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > PEEK_HEADER_BYTES:
                return None
            metadata = json.loads(f.read(size))["__metadata__"]
            shape = json.loads(metadata["architecture"])["input"]["shape"]
        shape = tuple(int(d) for d in shape)
        return shape if shape and all(d > 0 for d in shape) else None
    except Exception:  # noqa: BLE001 - any malformed header: the load reports it properly
        return None


def configure_logging(level: str) -> None:
    worker = os.environ.get(WORKER_ENV)
    name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
    logging.basicConfig(
        level=getattr(logging, level), format=f"%(asctime)s %(levelname)s {name}: %(message)s"
    )
    logging.getLogger("convserve").setLevel(getattr(logging, level))


def threading_layer() -> str:
    try:
        import numba

        return f"numba {numba.__version__}, threading layer {numba.threading_layer()}, {numba.get_num_threads()} threads"
    except Exception as exc:  # noqa: BLE001 - informational only (no parallel kernel run yet)
        return f"numba threading layer unknown ({exc})"


class _Observer:
    """Batch hooks: Prometheus histograms and ModelStatistics counters (worker thread)."""

    def __init__(self, metrics, stats):
        self.metrics = metrics
        self.stats = stats

    def on_batch(self, batch_size: int, compute_ns: int) -> None:
        self.metrics.compute_duration.observe(compute_ns / 1e9)
        self.metrics.batch_size.observe(batch_size)
        self.metrics.sample_queue()
        s = self.stats
        s.execution_count += 1
        s.compute_count += 1
        s.compute_ns += compute_ns
        slot = s.batches.get(batch_size)
        if slot is None:
            s.batches[batch_size] = [1, compute_ns]
        else:
            slot[0] += 1
            slot[1] += compute_ns


def build_batcher(entry, cfg: ServerConfig, warmup: tuple[int, ...], metrics, on_complete):
    """The DynamicBatcher of one loaded model version: `cfg.instances` warmed copies of the model,
    Numba threads by batch size, metrics and statistics hooks; `on_complete(jobs)` gets finished
    jobs on a worker thread (used by `convserve serve` and by Ray Serve replicas)."""
    import numba
    from convserve.server.batcher import DynamicBatcher

    # every instance after the first is a copy with its own buffers, warmed the same way
    models = [entry.model] + [entry.model.replica() for _ in range(cfg.instances - 1)]
    for copy in models[1:]:
        copy.warmup(warmup)
    share = max(1, numba.config.NUMBA_NUM_THREADS // cfg.instances)

    def alone() -> bool:  # an instance computing alone uses every thread
        return batcher.busy_instances <= 1  # bound below; only called once jobs arrive

    predicts = [threads_by_batch(m.predict, cfg.parallel_min_batch, share, alone) for m in models]
    batcher = DynamicBatcher(
        predicts,
        name=entry.name,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=cfg.max_queue_delay_us,
        max_queue_size=cfg.max_queue_size,
        on_complete=on_complete,
        observer=_Observer(metrics, entry.stats),
        extra_instance_min_images=max(cfg.parallel_min_batch, cfg.max_batch_size // 2),
    )
    metrics.track_queue(lambda: batcher.queued_requests)
    return batcher


class InferenceServer:
    """A running server: `await start()`, `await wait()`; `request_shutdown()` from a signal."""

    def __init__(self, config: ServerConfig, security=None):
        self.config = config
        self.security = security  # convserve.server.security.Security; read in run() if None
        self.bound_port: int | None = None
        self.metrics_port: int | None = None
        self._shutdown = asyncio.Event()
        self._hurry = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        from convserve.server.metrics import ServerMetrics
        from convserve.server.repository import ModelRepository, RepositoryError, model_limits
        from convserve.server.security import Security, SecurityError
        from convserve.server.servicer import ServerState

        cfg = self.config
        t_start = time.perf_counter()
        try:
            root = resolve_repository(cfg.model_repository)
            repository = ModelRepository(root)
            self.security = self.security or Security.from_config(cfg)
        except (FileNotFoundError, RepositoryError, SecurityError) as exc:
            raise StartupError(str(exc)) from None
        warmup = cfg.warmup_batch_sizes or tuple(sorted({1, cfg.max_batch_size}))
        shown = dict(
            cfg.as_dict(), model_repository=str(root), warmup_batch_sizes=",".join(map(str, warmup))
        )
        log.info(
            "convserve %s starting: %s",
            __version__,
            ", ".join(f"{k}={v}" for k, v in shown.items()),
        )
        log.info(
            "model repository %s: %s",
            root,
            "; ".join(
                f"{name} (versions {', '.join(map(str, sorted(v)))})"
                for name, v in repository.models.items()
            ),
        )
        self.metrics = ServerMetrics()
        self.state = ServerState()
        loop = asyncio.get_running_loop()
        self._install_signals(loop)

        # Listen first so that liveness and health (NOT_SERVING) answer during the warm-up; the
        # message limit comes from the model files' headers.
        limit = message_limit(cfg, largest_image_bytes(repository))
        self.repository = repository
        self.signatures, self.model_metrics = {}, {}
        server, health = await self._start_grpc(limit)
        self._start_metrics()

        def make_batcher(entry):
            from convserve.server.servicer import resolve_jobs

            metrics = self.metrics.for_model(entry.name, entry.version_str)
            return build_batcher(
                entry,
                cfg,
                warmup,
                metrics,
                lambda jobs: loop.call_soon_threadsafe(resolve_jobs, jobs),
            )

        load = _in_daemon_thread(
            loop, repository.load, make_batcher, warmup, cfg.skip_bad_models, model_limits(cfg)
        )
        stop = asyncio.ensure_future(self._shutdown.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info(
                "shutdown requested during start-up; exiting once the model being loaded is done"
            )
            await server.stop(0)
            return 0
        stop.cancel()
        try:
            load.result()
        except RepositoryError as exc:
            await server.stop(0)
            raise StartupError(str(exc)) from None
        from convserve.server.protocol import signature_for

        for entry in repository.ready_entries():
            key = (entry.name, entry.version)
            self.signatures[key] = signature_for(entry.name, entry.model, cfg.max_request_images)
            mm = self.metrics.for_model(entry.name, entry.version_str)
            mm.loaded(entry.load_seconds, entry.warmup_seconds)
            self.model_metrics[key] = mm
        loaded = [math.prod(e.model.input_shape) * 4 for e in repository.ready_entries()]
        if message_limit(cfg, max(loaded, default=0)) > limit:
            log.warning(
                "the message limit %d B is below the largest legal request of a loaded model; "
                "pass --max-message-bytes to raise it",
                limit,
            )
        log.info("%s", threading_layer())
        from convserve.core.runtime import release_compiler_pages, resident_mb

        before = resident_mb()
        release_compiler_pages()
        log.info(
            "resident memory %.0f MB after warm-up, %.0f MB once LLVM's code pages are dropped",
            before,
            resident_mb(),
        )
        from convserve.server.memory import Trimmer, freeze_startup_objects

        freeze_startup_objects()
        trimmer = asyncio.ensure_future(Trimmer(lambda: self.admission.idle).run())
        self.state.ready = True
        await health.refresh()
        self.metrics.ready.set(1)
        log.info(
            "ready: %d model version(s) on %s:%d (gRPC), metrics %s, started in %.2f s",
            len(repository.ready_entries()),
            cfg.host,
            self.bound_port,
            f"{'https' if cfg.metrics_tls else 'http'}://{cfg.host}:{self.metrics_port}/metrics"
            if self.metrics_port
            else "disabled",
            time.perf_counter() - t_start,
        )

        await self._shutdown.wait()
        trimmer.cancel()
        return await self._drain(server, health)

    # -- pieces ----------------------------------------------------------------------------
    async def _start_grpc(self, limit: int):
        from convserve.proto import grpc_service_pb2 as pb
        from convserve.proto import grpc_service_pb2_grpc as pb_grpc
        from convserve.server.admission import CONCURRENT_READS, AdmissionInterceptor, ByteBudget
        from convserve.server.connections import connection_options
        from convserve.server.readiness import HealthReporter
        from convserve.server.servicer import InferenceServicer
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        from grpc_reflection.v1alpha import reflection

        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if os.environ.get(WORKER_ENV) else 0),
            ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
            ("grpc.http2.bdp_probe", 0),
            *connection_options(cfg),  # connection age and keepalive (behind load balancers)
        ]
        # room for the messages being read (each reserves the limit) and one more held: a held
        # request then never keeps the next one from being read
        budget_bytes = max(cfg.max_queue_bytes, (CONCURRENT_READS + 1) * limit)
        if budget_bytes > cfg.max_queue_bytes:
            log.warning(
                "--max-queue-bytes %d is below %d x the message limit (%d B): raised to %d B",
                cfg.max_queue_bytes,
                CONCURRENT_READS + 1,
                limit,
                budget_bytes,
            )
        self.admission = AdmissionInterceptor(
            ByteBudget(budget_bytes, limit),
            self.metrics.refused_early,
            max(256, 2 * cfg.max_queue_size),
        )
        from convserve.server.wire import RawRequests

        # Admission first: it holds calls at shutdown and bounds the bytes every call may read,
        # a call with a bad token included; then the token check, before any bytes are parsed.
        interceptors = [
            self.admission,
            *self.security.interceptors(self.metrics.refused),
            RawRequests(self.metrics.refused_early),
        ]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        servicer = InferenceServicer(
            self.repository,
            self.state,
            self.signatures,
            self.model_metrics,
            cfg.max_queue_delay_us,
            cfg.max_queue_size,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        health = HealthReporter(health_servicer, self.state, lambda: self.repository)
        await health.refresh()
        service_name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
        reflection.enable_server_reflection(
            [
                service_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
            pool=_reflection_pool(),
        )
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        credentials = self.security.server_credentials()
        try:
            if credentials is None:
                self.bound_port = server.add_insecure_port(address)
            else:
                self.bound_port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address}: {exc}") from None
        await server.start()
        log.info(
            "listening on %s:%d (gRPC, %s, max message %d B, request bytes held at most %d B); "
            "health NOT_SERVING until models are warm",
            cfg.host,
            self.bound_port,
            self.security.describe(),
            limit,
            budget_bytes,
        )
        self._health_watch = asyncio.ensure_future(health.watch())
        return server, health

    def _start_metrics(self) -> None:
        cfg = self.config
        if not cfg.metrics_port:
            return
        from convserve.server.security import serve_metrics

        try:
            self._metrics_server = serve_metrics(
                cfg.metrics_port, cfg.host, self.metrics.registry, self.security
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc}"
            ) from None
        self.metrics_port = self._metrics_server.server_port

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_shutdown, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
                pass

    def request_shutdown(self, sig: int | None = None) -> None:
        self._signals += 1
        name = signal.Signals(sig).name if sig else "request"
        if self._signals == 1:
            log.info("%s received: health NOT_SERVING, draining", name)
        else:
            log.warning("%s received again: skipping the rest of the drain window", name)
            self._hurry.set()
        self._shutdown.set()

    async def _drain(self, server, health) -> int:
        cfg = self.config
        t0 = time.monotonic()
        self.state.exiting = True
        self.metrics.ready.set(0)
        await health.refresh()
        drain = min(cfg.drain_seconds, cfg.grace_period / 2)
        deadline = t0 + cfg.grace_period
        if drain > 0 and not self._hurry.is_set():
            log.info("drain window: serving new requests for %.1f s more", drain)
            try:
                await asyncio.wait_for(self._hurry.wait(), drain)
            except TimeoutError:
                pass
        log.info(
            "refusing new requests; finishing the accepted ones (at most %.1f s)",
            max(0.0, deadline - time.monotonic()),
        )
        # gRPC core answers the calls it holds but has not handed to Python with CANCELLED when
        # the transport stops (grpc/grpc#41785). So: hold every new call unread, let the accepted
        # ones finish, stop the transport (GOAWAY to every client), and only then answer the held
        # calls (UNAVAILABLE); their retries find the port closed and fail cleanly too.
        self.admission.hold()
        await self.admission.wait_idle(max(0.0, deadline - time.monotonic() - 1.0))
        # A client answered just now sends its next call at once: let gRPC hand it to us (held)
        # before the transport stops, or it would be one of the calls core cancels.
        await asyncio.sleep(SETTLE_SECONDS)
        stopping = asyncio.ensure_future(server.stop(max(0.1, deadline - time.monotonic() - 0.5)))
        await asyncio.sleep(GOAWAY_SECONDS)
        self.state.refusing = True  # the held calls, and only they, are refused
        self.admission.release()
        await stopping
        stopped = True
        for entry in self.repository.ready_entries():
            stopped &= entry.batcher.close(timeout=max(0.1, deadline - time.monotonic()))
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        log.info(
            "shutdown complete in %.2f s%s",
            time.monotonic() - t0,
            "" if stopped else " (a batcher did not stop in time)",
        )
        return 0 if stopped else 1


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn, *args) -> asyncio.Future:
    """Run fn(*args) in a daemon thread (so a shutdown during warm-up does not wait for it)."""
    import threading

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
        except RuntimeError:  # the loop is gone: the server stopped during start-up
            pass

    threading.Thread(target=target, name="model-loader", daemon=True).start()
    return future


def _reflection_pool():
    """A descriptor pool holding our service (private pool, see proto/generate.py) plus health and reflection."""
    from convserve.proto import grpc_service_pb2 as pb
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool


def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM/SIGINT; returns the process exit code. With `workers` > 1,
    supervise that many server processes instead (see `convserve.server.workers`)."""
    from convserve.server.security import Security, SecurityError

    configure_logging(config.log_level)
    try:
        security = Security.from_config(config)  # before any worker starts: one clear line
    except SecurityError as exc:
        log.error("cannot start: %s", exc)
        return 2
    if config.workers > 1:
        from convserve.server.workers import supervise

        return supervise(config)
    from convserve.server.memory import prefer_mmap_for_large_blocks

    if os.environ.get(WORKER_ENV) is not None:
        from convserve.server.workers import die_with_supervisor

        die_with_supervisor()
    prefer_mmap_for_large_blocks()
    server = InferenceServer(config, security)
    try:
        return asyncio.run(server.run())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
