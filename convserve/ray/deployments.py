"""The Ray Serve deployments: one `ModelServer` per model behind one `Ingress`.

Ray's gRPC proxy parses each `inference.GRPCInferenceService` (and `grpc.health.v1.Health`) call
and hands it to the application's ingress, calling the method named after the RPC. The ingress
sends model calls to that model's deployment and answers server-wide calls itself. Both run the
server's own `InferenceServicer` (server/servicer.py): requests are decoded, checked, batched and
encoded exactly as by `convserve serve`, and its gRPC status and message travel back unchanged.
This module imports Ray; `convserve.ray.serving` imports it only when an application is built.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from convserve.proto import grpc_service_pb2 as pb
from convserve.server.config import ServerConfig
from convserve.server.repository import RepositoryError
from convserve.server.servicer import InferenceServicer, ServerState, resolve_jobs

log = logging.getLogger("convserve.ray")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# RPCs that name a model, and the request fields holding its name and version
MODEL_RPCS = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelReady": ("name", "version"),
    "ModelMetadata": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
}
READY_TIMEOUT_S = 5.0  # ServerReady / health: a model deployment slower than this is not ready


class Aborted(Exception):
    """`context.abort()` of the servicer: the call ends with this status and message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The part of `grpc.aio.ServicerContext` the servicer uses, outside a gRPC server.

    Ray's proxy does not forward the caller's deadline; a caller that gives up (its deadline or
    a cancellation) cancels the call through Ray instead, which the servicer handles the same way.
    """

    def __init__(self) -> None:
        self.trailing: tuple[tuple[str, str], ...] = ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)


# (response or None, status code or None, details, trailing metadata): picklable across Ray
Outcome = tuple[Any, "grpc.StatusCode | None", str, tuple]


async def run_rpc(servicer: InferenceServicer, method: str, request) -> Outcome:
    """Run one servicer RPC; its abort becomes the outcome's status instead of an exception."""
    if SERVICE.methods_by_name[method].client_streaming:  # Ray's proxy passes single messages
        details = f"{method} is not served through Ray Serve; streams need `convserve serve`"
        return None, grpc.StatusCode.UNIMPLEMENTED, details, ()
    context = CallContext()
    try:
        response = await getattr(servicer, method)(request, context)
    except Aborted as exc:
        return None, exc.code, exc.details, context.trailing
    return response, None, "", context.trailing


def _resolve_from_worker(jobs) -> None:
    """Batcher callback (worker thread): wake the awaiting handlers on the replica's event loop."""
    jobs[0].future.get_loop().call_soon_threadsafe(resolve_jobs, jobs)


class Endpoint:
    """What Ray's proxy calls: one method per RPC (added below) and grpc.health.v1.Health."""

    async def answer(self, method: str, request) -> Outcome:
        raise NotImplementedError

    async def ready(self) -> bool:
        raise NotImplementedError

    async def handle(self, method: str, request, grpc_context) -> Any:
        """One RPC through Ray: the response, or the servicer's status set on Ray's context."""
        response, code, details, trailing = await self.answer(method, request)
        if grpc_context is not None:
            if trailing:
                grpc_context.set_trailing_metadata(list(trailing))
            if code is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(details)
        if code is not None:
            output = SERVICE.methods_by_name[method].output_type.full_name
            return _EMPTY[output]
        return response

    async def _health(self, service: str) -> int:
        if service not in ("", SERVICE.full_name):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if await self.ready():
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, grpc_context=None):
        status = await self._health(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            if grpc_context is not None:  # as grpc's own health servicer answers
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details("unknown service")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, grpc_context=None):
        """The status now, then each change (checked every second) until the caller leaves."""
        last = None
        while True:
            status = await self._health(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)


class ModelServer(Endpoint):
    """A replica of one model: its versions loaded and warmed, a batcher each, the servicer.

    It is the application's entry itself when the repository holds one model (one Ray hop
    fewer); otherwise the `Ingress` calls `call()`.
    """

    def __init__(self, root: str, name: str, config: ServerConfig):
        from convserve.core.runtime import release_compiler_pages
        from convserve.server.app import configure_logging, model_defaults
        from convserve.server.lifecycle import ModelLifecycle
        from convserve.server.metrics import ServerMetrics
        from convserve.server.repository import ModelRepository, scan_disk
        from convserve.server.served import VersionFactory

        configure_logging(config.log_level)
        self.name = name
        if name not in scan_disk(Path(root), name):
            raise RepositoryError(f"model '{name}' is no longer in {root}")
        metrics = ServerMetrics()
        # the model's versions are loaded once (model control mode none): a new version is a
        # new deployment of the application, rolled out by Ray Serve
        lifecycle = ModelLifecycle(
            ModelRepository(Path(root)),
            VersionFactory(config, metrics, _resolve_from_worker, config.warmup_batch_sizes or ()),
            "none",
            model_defaults(config),
            metrics,
        )
        lifecycle.only = name  # RepositoryIndex: the ingress merges every model's rows
        failures = lifecycle.load_blocking(name)
        if failures and not config.skip_bad_models:
            raise RepositoryError(f"cannot load {failures[0]}")
        served = lifecycle.repository.served_versions()
        if not served:
            raise RepositoryError(f"no version of model '{name}' in {root} could be loaded")
        release_compiler_pages()
        state = ServerState()
        state.ready = True
        self.servicer = InferenceServicer(lifecycle.repository, state, lifecycle)
        log.info(
            "replica of model '%s' ready in process %d: versions %s",
            name,
            os.getpid(),
            ", ".join(s.version_str for s in served),
        )

    async def call(self, method: str, request) -> Outcome:
        return await run_rpc(self.servicer, method, request)

    async def answer(self, method: str, request) -> Outcome:
        return await self.call(method, request)

    async def ready(self) -> bool:
        return self.servicer.state.ready

    def pid(self) -> int:
        """This replica's process id (for operators and the fault-tolerance test)."""
        return os.getpid()


def _failure(model: str, exc: BaseException) -> Outcome:
    """A Ray-side failure of a model call as the status a caller can act on."""
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return (
            None,
            grpc.StatusCode.UNAVAILABLE,
            f"model '{model}': the replica serving the call stopped before answering "
            f"({type(exc).__name__}); Ray Serve restarts it, retry the call",
            (),
        )
    if isinstance(exc, BackPressureError):
        return None, grpc.StatusCode.UNAVAILABLE, f"model '{model}': {exc.message}", ()
    if isinstance(exc, RayTaskError):  # an unexpected error in the replica: one line, no traceback
        cause = exc.as_instanceof_cause()
        return None, grpc.StatusCode.INTERNAL, f"model '{model}' failed: {type(cause).__name__}", ()
    return (
        None,
        grpc.StatusCode.INTERNAL,
        f"model '{model}' failed: {type(exc).__name__}: {exc}",
        (),
    )


class Ingress(Endpoint):
    """The entry of a repository of several models: routes model RPCs to each model's
    deployment, answers server RPCs and health itself."""

    def __init__(self, root: str, models: dict[str, Any]):
        self.models = models  # model name -> DeploymentHandle of its ModelServer
        from convserve.server.lifecycle import ModelLifecycle
        from convserve.server.repository import ModelRepository, scan_disk

        # scanned, not loaded: server-wide answers and the unknown-model errors of the server
        repository = ModelRepository(Path(root))
        for name, on_disk in scan_disk(repository.root).items():
            for version, path in on_disk.versions.items():
                repository.record(name, version, path)
        state = ServerState()
        state.ready = True
        lifecycle = ModelLifecycle(repository, None, "none", None, None)
        self.servicer = InferenceServicer(repository, state, lifecycle)

    async def _model_call(self, name: str, method: str, request) -> Outcome:
        try:
            return await self.models[name].call.remote(method, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes a status
            return _failure(name, exc)

    async def _all_models(self, method: str, request) -> list[Outcome]:
        names = sorted(self.models)
        return list(await asyncio.gather(*(self._model_call(n, method, request) for n in names)))

    async def ready(self) -> bool:
        """Every model deployment answers ServerReady true within READY_TIMEOUT_S."""
        try:
            outcomes = await asyncio.wait_for(
                self._all_models("ServerReady", pb.ServerReadyRequest()), READY_TIMEOUT_S
            )
        except TimeoutError:
            return False
        return all(code is None and response.ready for response, code, _, _ in outcomes)

    async def answer(self, method: str, request) -> Outcome:
        if method in MODEL_RPCS:
            name = getattr(request, MODEL_RPCS[method][0])
            if name in self.models:
                return await self._model_call(name, method, request)
            if method == "ModelStatistics" and not name:
                return await self._merged(method, request, "model_stats")
        elif method == "ServerReady":
            return pb.ServerReadyResponse(ready=await self.ready()), None, "", ()
        elif method == "RepositoryIndex":
            return await self._merged(method, request, "models")
        # unknown models, ServerLive, ServerMetadata and unimplemented RPCs: the server's answer
        return await run_rpc(self.servicer, method, request)

    async def _merged(self, method: str, request, field: str) -> Outcome:
        """One response listing every model's `field` entries (the first error otherwise)."""
        merged = getattr(pb, SERVICE.methods_by_name[method].output_type.name)()
        for response, code, details, trailing in await self._all_models(method, request):
            if code is not None:
                return response, code, details, trailing
            getattr(merged, field).extend(getattr(response, field))
        return merged, None, "", ()


_EMPTY = {m.output_type.full_name: getattr(pb, m.output_type.name)() for m in SERVICE.methods}


def _rpc(method: str):
    async def rpc(self, request, grpc_context=None):
        return await self.handle(method, request, grpc_context)

    rpc.__name__ = rpc.__qualname__ = method
    rpc.__doc__ = f"inference.GRPCInferenceService/{method} through Ray Serve."
    return rpc


# one method per RPC: Ray's proxy calls the entry's method named after the RPC
for _method in SERVICE.methods:
    setattr(Endpoint, _method.name, _rpc(_method.name))
