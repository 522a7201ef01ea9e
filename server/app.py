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
from convserve.server.config import MODEL_FILENAME, WORKER_ENV, ServerConfig, resolve_repository

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


def largest_image_bytes(paths) -> int:
    """Bytes of one FP32 image of the largest model input among the model files `paths`, read
    from their headers (before they are loaded, so the listener gets its message limit at once)."""
    largest = 0
    for path in paths:
        shape = peek_input_shape(path)
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
        from convserve.server.lifecycle import ModelLifecycle
        from convserve.server.metrics import ServerMetrics
        from convserve.server.repository import ModelRepository, RepositoryError, scan_disk
        from convserve.server.security import Security, SecurityError
        from convserve.server.servicer import ServerState

        cfg = self.config
        t_start = time.perf_counter()
        try:
            root = resolve_repository(cfg.model_repository)
            repository = ModelRepository(root)
            on_disk = scan_disk(root)
            if not on_disk and cfg.model_control_mode == "none":
                raise RepositoryError(
                    f"model repository {root} holds no models: expected "
                    f"<model>/<version>/{MODEL_FILENAME}"
                )
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
                f"{name} (versions {', '.join(map(str, sorted(m.versions)))})"
                for name, m in on_disk.items()
            )
            or "empty",
        )
        self.metrics = ServerMetrics()
        self.state = ServerState()
        self.state.empty_ok = cfg.model_control_mode != "none"
        loop = asyncio.get_running_loop()
        self._install_signals(loop)

        # Listen first so that liveness and health (NOT_SERVING) answer during the warm-up; the
        # message limit comes from the model files' headers.
        limit = message_limit(
            cfg, largest_image_bytes(p for m in on_disk.values() for p in m.versions.values())
        )
        self.repository = repository
        self.lifecycle = ModelLifecycle(
            repository,
            version_factory(cfg, self.metrics, loop),
            cfg.model_control_mode,
            model_defaults(cfg),
            self.metrics,
            close_timeout=cfg.grace_period,
        )
        server, health = await self._start_grpc(limit)
        self._start_metrics()

        load = asyncio.ensure_future(self.lifecycle.start(cfg.load_model))
        stop = asyncio.ensure_future(self._shutdown.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info(
                "shutdown requested during start-up; exiting once the model being loaded is done"
            )
            self.lifecycle.closing = True
            await server.stop(0)
            return 0
        stop.cancel()
        failures = load.result()
        if failures and not cfg.skip_bad_models:
            await self.lifecycle.close_all(cfg.grace_period)
            await server.stop(0)
            raise StartupError(f"cannot load {failures[0]}")
        if not repository.ready_entries() and cfg.model_control_mode == "none":
            await server.stop(0)
            raise StartupError(f"no model in {root} could be loaded")
        loaded = [math.prod(s.model.input_shape) * 4 for s in repository.served_versions()]
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
            "ready: %d model version(s) on %s:%d (gRPC), metrics %s, model control mode %s, "
            "started in %.2f s",
            len(repository.ready_entries()),
            cfg.host,
            self.bound_port,
            f"{'https' if cfg.metrics_tls else 'http'}://{cfg.host}:{self.metrics_port}/metrics"
            if self.metrics_port
            else "disabled",
            cfg.model_control_mode,
            time.perf_counter() - t_start,
        )
        polling = None
        if cfg.model_control_mode == "poll":
            polling = asyncio.ensure_future(self.lifecycle.poll_forever(cfg.repository_poll_secs))

        await self._shutdown.wait()
        self.lifecycle.closing = True
        if polling is not None:
            polling.cancel()
        trimmer.cancel()
        return await self._drain(server, health)

    # -- pieces ----------------------------------------------------------------------------
    async def _start_grpc(self, limit: int):
        from convserve.proto import grpc_service_pb2 as pb
        from convserve.proto import grpc_service_pb2_grpc as pb_grpc
        from convserve.server.admission import CONCURRENT_READS, Admission, ByteBudget
        from convserve.server.connections import connection_options
        from convserve.server.readiness import HealthReporter
        from convserve.server.servicer import InferenceServicer
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
        from grpc_reflection.v1alpha._async import ReflectionServicer

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
        self.admission = Admission(
            ByteBudget(budget_bytes, limit),
            self.metrics.refused_early,
            max(256, 2 * cfg.max_queue_size),
        )
        from convserve.server.infer_request import parse_infer_request
        from convserve.server.wire import WrappingRegistrar, raw_requests

        # Admission outermost: it holds calls at shutdown and bounds the bytes every call may
        # read, a call with a bad token included; then the token check, before any bytes are
        # parsed; then our own parsing of the raw bytes (inference requests' tensor bytes stay
        # where gRPC put them).
        server = grpc.aio.server(options=options)
        registrar = WrappingRegistrar(
            server,
            [
                self.admission.wrap,
                *self.security.handler_wrappers(self.metrics.refused),
                raw_requests(
                    self.metrics.refused_early,
                    {pb.ModelInferRequest.DESCRIPTOR.full_name: parse_infer_request},
                ),
            ],
        )
        servicer = InferenceServicer(self.repository, self.state, self.lifecycle, self.admission)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registrar)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
        health = HealthReporter(health_servicer, self.state, lambda: self.repository)
        await health.refresh()
        service_name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
        # what reflection.enable_server_reflection does, through the registrar
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(
                [
                    service_name,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                pool=_reflection_pool(),
            ),
            registrar,
        )
        registrar.check()
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
        self.state.streams_end.set()  # open ModelStreamInfer calls end (UNAVAILABLE)
        self.admission.release()
        await stopping
        stopped = await self.lifecycle.close_all(max(0.1, deadline - time.monotonic()))
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        log.info(
            "shutdown complete in %.2f s%s",
            time.monotonic() - t0,
            "" if stopped else " (a batcher did not stop in time)",
        )
        return 0 if stopped else 1


def version_factory(config: ServerConfig, metrics, loop: asyncio.AbstractEventLoop):
    """The factory of served versions: batchers hand finished jobs to the event loop."""
    from convserve.server.served import VersionFactory, completion_on_loop
    from convserve.server.servicer import resolve_jobs

    return VersionFactory(
        config, metrics, completion_on_loop(loop, resolve_jobs), config.warmup_batch_sizes or ()
    )


def model_defaults(config: ServerConfig):
    """The settings of a model without config.json: the flags, the mode's version policy."""
    from convserve.server.lifecycle import ModelLifecycle
    from convserve.server.model_config import ModelSettings

    return ModelSettings.defaults(config, ModelLifecycle.default_policy(config.model_control_mode))


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
    from convserve.server.slo import window_bound_error

    error = window_bound_error(config.latency_slo_ms, config.max_queue_delay_us)
    if error:
        log.error("cannot start: %s", error)
        return 2
    if config.workers > 1:
        from convserve.server.workers import supervise

        if config.model_control_mode == "explicit":
            # a load or unload RPC reaches one worker only, so the workers' models would differ
            log.error(
                "cannot start: --model-control-mode explicit needs --workers 1 (a load or unload "
                "call reaches one worker only); use --model-control-mode poll with several workers"
            )
            return 2

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
