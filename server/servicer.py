"""The `inference.GRPCInferenceService` servicer (grpc.aio): thin glue between protobuf and the batcher.

Every RPC that Triton's service declares and convserve does not serve answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.server.batcher import Job
from convserve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    QueueFull,
    RequestTimeout,
    ServingError,
    shown,
)
from convserve.server.protocol import (
    ADVERTISED_INPUT_DTYPE,
    INPUT_NAME,
    OUTPUT_NAME,
    Signature,
    decode_request,
    encode_response,
)
from convserve.server.readiness import readiness
from convserve.server.repository import ModelRepository, scan_disk
from convserve.server.served import ServedVersion

from convserve import __version__

log = logging.getLogger(__name__)

DEADLINE_SLACK_NS = (
    25_000_000  # see ModelInfer: a cancellation this close to the deadline is the deadline
)

SERVER_NAME = "convserve"
PLATFORM = "convserve_numba"
BACKEND = "convserve"
EXTENSIONS = (
    "classification",
    "schedule_policy",
    "parameters",
    "model_configuration",
    "statistics",
    "model_repository",
)
_STATUS = {code.name: code for code in grpc.StatusCode}


class ServerState:
    """Lifecycle flags shared by the servicer and the wiring (single event-loop thread)."""

    def __init__(self) -> None:
        self.ready = False
        self.exiting = False
        self.refusing = False  # after the drain window: new inferences get UNAVAILABLE from us
        self.empty_ok = False  # poll and explicit modes: ready with no model loaded (yet)
        self.loading_message = "Server not ready: models are loading"
        self.streams_end = asyncio.Event()  # set once refusing: open streams end (UNAVAILABLE)


def resolve_jobs(jobs: list[Job]) -> None:
    """Runs on the event loop: hand each finished job to its awaiting handler."""
    for job in jobs:
        fut = job.future
        if not fut.done():
            fut.set_result(job)


def _expire(batcher, job: Job, timeout_us: int) -> None:
    """Event-loop timer: a request still queued when its `timeout` parameter expires is refused."""
    waited_ms = (time.monotonic_ns() - job.arrival_ns) / 1e6
    error = RequestTimeout(
        f"Request timeout expired: the request waited {waited_ms:.1f} ms in the queue of model "
        f"'{batcher.name}', longer than its 'timeout' parameter ({timeout_us} us)"
    )
    if batcher.abandon(job, error) and not job.future.done():
        job.future.set_result(job)


def _passed(deadline_ns: int | None, slack_ns: int = 0) -> bool:
    """The call's deadline (monotonic ns) has passed, or will within `slack_ns`."""
    return deadline_ns is not None and time.monotonic_ns() >= deadline_ns - slack_ns


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over the repository's models."""

    def __init__(
        self, repository: ModelRepository, state: ServerState, lifecycle: Any, admission: Any = None
    ):
        self.repository = repository
        self.state = state
        self.lifecycle = lifecycle  # convserve.server.lifecycle.ModelLifecycle
        self.admission = admission  # its limits apply to stream requests too (see streaming)

    # -- helpers ---------------------------------------------------------------------------
    async def _fail(self, context, error: ServingError) -> None:
        await context.abort(_STATUS.get(error.code, grpc.StatusCode.INTERNAL), str(error))

    async def _require_ready(self, context) -> None:
        if not self.state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.state.loading_message)

    async def _entry(self, context, name: str, version: str) -> ServedVersion:
        await self._require_ready(context)
        try:
            return self.repository.get(name, version)
        except ServingError as exc:
            await self._fail(context, exc)
            raise  # unreachable: abort raises

    # -- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=readiness(self.state, self.repository).ready)

    async def ModelReady(self, request, context):
        if not self.state.ready:
            return pb.ModelReadyResponse(ready=False)
        try:
            entry = self.repository.get(request.name, request.version)
        except ServingError as exc:
            if exc.code == "NOT_FOUND":
                return pb.ModelReadyResponse(ready=False)
            await self._fail(context, exc)  # unknown model: Triton answers an error
        return pb.ModelReadyResponse(ready=entry.alive and not self.state.exiting)

    async def ServerMetadata(self, request, context):
        await self._require_ready(context)
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        entry = await self._entry(context, request.name, request.version)
        sig = entry.signature
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=self.repository.ready_versions(entry.name),
            platform=PLATFORM,
            inputs=[
                tm(
                    name=INPUT_NAME,
                    datatype=ADVERTISED_INPUT_DTYPE,
                    shape=[-1, sig.height, sig.width, sig.channels],
                )
            ],
            outputs=[tm(name=OUTPUT_NAME, datatype="FP32", shape=[-1, sig.classes])],
        )

    async def ModelConfig(self, request, context):
        entry = await self._entry(context, request.name, request.version)
        sig, settings = entry.signature, entry.settings
        config = pb.ModelConfig(
            name=entry.name,
            platform=PLATFORM,
            backend=BACKEND,
            max_batch_size=settings.max_batch_size,
            version_policy=_version_policy(settings.version_policy),
            instance_group=[
                pb.ModelInstanceGroup(
                    name=entry.name, kind=pb.ModelInstanceGroup.KIND_CPU, count=settings.instances
                )
            ],
            input=[
                pb.ModelInput(
                    name=INPUT_NAME,
                    data_type=pb.TYPE_UINT8,
                    format=pb.ModelInput.FORMAT_NHWC,
                    dims=[sig.height, sig.width, sig.channels],
                )
            ],
            output=[pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[sig.classes])],
            dynamic_batching=pb.ModelDynamicBatching(
                max_queue_delay_microseconds=settings.max_queue_delay_us,
                default_queue_policy=pb.ModelQueuePolicy(
                    timeout_action=pb.ModelQueuePolicy.REJECT,
                    allow_timeout_override=True,
                    max_queue_size=settings.max_queue_size,
                ),
            ),
            parameters={
                f"label:{label}": pb.ModelParameter(string_value=str(version))
                for label, version in sorted(settings.labels.items())
            },
        )
        return pb.ModelConfigResponse(config=config)

    # -- inference -------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        t0 = time.perf_counter_ns()
        if self.state.refusing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "Server exiting: the drain window is over; retry on another replica",
            )
        entry = await self._entry(context, request.model_name, request.model_version)
        outcome = entry.outcome(t0)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic_ns() + int(remaining * 1e9)
        try:
            response = await self.answer(entry, request, deadline, outcome)
        except asyncio.CancelledError:  # the caller cancelled or its deadline passed
            # The client's deadline timer fires (and cancels the call) a little before the server's
            # copy of it, which counts from the request's arrival: within DEADLINE_SLACK_NS of the
            # deadline a cancellation is the deadline passing.
            outcome.failed("timeout" if _passed(deadline, DEADLINE_SLACK_NS) else "cancelled")
            raise
        except ServingError as exc:
            outcome.failed(exc.reason)
            if _passed(deadline):  # gRPC has answered DEADLINE_EXCEEDED: nothing left to send
                raise asyncio.CancelledError from None
            if exc.code == "INTERNAL":
                log.error("model '%s' version %d: %s", entry.name, entry.version, exc)
            if isinstance(exc, QueueFull):  # gRPC retry policies honour this hint
                context.set_trailing_metadata(
                    (("grpc-retry-pushback-ms", str(entry.batcher.drain_estimate_ms())),)
                )
            await self._fail(context, exc)
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's bidirectional stream: see convserve.server.streaming."""
        from convserve.server.streaming import InferStream

        await InferStream(self, context, self.admission).serve(request_iterator)

    async def answer(
        self, entry: ServedVersion, request, deadline: int | None, outcome
    ) -> pb.ModelInferResponse:
        """Decode, batch and encode one request (unary or from a stream) and count its success
        in `outcome`; raises ServingError, or CancelledError when the call is over."""
        decoded, job, decode_ns = await self._run(entry, entry.signature, request, deadline)
        t0 = time.perf_counter_ns()
        response = encode_response(
            request,
            entry.version_str,
            decoded,
            job.result,
            entry.signature,
            job.queue_ns // 1000,
            job.compute_ns // 1000,
            job.batch_size,
        )
        outcome.succeeded(job, decode_ns, time.perf_counter_ns() - t0)
        return response

    async def _run(self, entry: ServedVersion, sig: Signature, request, deadline: int | None):
        """Decode, queue and await one request; returns (decoded, finished job, decoding ns) or
        raises ServingError (also when the deadline passed while the batch computed)."""
        t0 = time.perf_counter_ns()
        decoded = decode_request(request, sig)
        decode_ns = time.perf_counter_ns() - t0
        timeout = (
            None if decoded.timeout_us is None else time.monotonic_ns() + decoded.timeout_us * 1000
        )
        loop = asyncio.get_running_loop()
        batcher = entry.batcher
        job = batcher.submit(
            decoded.images,
            deadline_ns=deadline,
            timeout_ns=timeout,
            priority=decoded.priority,
            future=loop.create_future(),
        )
        timer = None
        if timeout is not None:  # Triton's queue timeout: leave the queue when it expires
            timer = loop.call_later(
                decoded.timeout_us / 1e6, _expire, batcher, job, decoded.timeout_us
            )
        try:
            await job.future
        except asyncio.CancelledError:
            expired = _passed(deadline, DEADLINE_SLACK_NS)
            error = (
                DeadlineExceeded("Deadline Exceeded")
                if expired
                else Cancelled("cancelled by the client")
            )
            if not batcher.abandon(job, error):
                job.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if job.error is not None:
            error = job.error
            if not isinstance(error, ServingError):
                error = ServingError(f"model '{entry.name}' failed: {error}")
            raise error
        if _passed(deadline):
            # A client's race: its deadline passed while its batch computed. gRPC has answered
            # DEADLINE_EXCEEDED; sending our answer now would fail inside grpc.aio.
            raise asyncio.CancelledError
        return decoded, job, decode_ns

    # -- statistics and repository ---------------------------------------------------------
    async def ModelStatistics(self, request, context):
        await self._require_ready(context)
        if request.name:
            entries = [await self._entry(context, request.name, request.version)]
            if not request.version:  # Triton: all versions of the model
                entries = [e for e in self.repository.served_versions() if e.name == request.name]
        else:
            entries = self.repository.served_versions()
        response = pb.ModelStatisticsResponse()
        for entry in entries:
            s = entry.stats
            d = pb.StatisticDuration
            stat = response.model_stats.add(
                name=entry.name,
                version=entry.version_str,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            inf = stat.inference_stats
            done = s.success_count  # queue and the compute stages count successful requests
            inf.success.CopyFrom(d(count=done, ns=s.success_ns))
            inf.fail.CopyFrom(d(count=s.fail_count, ns=s.fail_ns))
            inf.queue.CopyFrom(d(count=done, ns=s.queue_ns))
            inf.compute_input.CopyFrom(d(count=done, ns=s.compute_input_ns))
            inf.compute_infer.CopyFrom(d(count=done, ns=s.compute_ns))
            inf.compute_output.CopyFrom(d(count=done, ns=s.compute_output_ns))
            for size, slot in sorted(dict(s.batches).items()):
                count, input_ns, infer_ns, output_ns = list(slot)
                stat.batch_stats.add(
                    batch_size=size,
                    compute_input=d(count=count, ns=input_ns),
                    compute_infer=d(count=count, ns=infer_ns),
                    compute_output=d(count=count, ns=output_ns),
                )
        return response

    async def RepositoryIndex(self, request, context):
        from convserve.server.lifecycle import in_daemon_thread

        disk = await in_daemon_thread(scan_disk, self.repository.root)
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.lifecycle.index_rows(disk):
            if request.ready and state != "READY":
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(self, request, context):
        await self._repository_call(context, "load", request)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._repository_call(context, "unload", request)
        return pb.RepositoryModelUnloadResponse()

    async def _repository_call(self, context, action: str, request) -> None:
        """Load or unload through the lifecycle; errors answer their status with one line."""
        if self.state.exiting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Server exiting: no model changes")
        unsupported = sorted(set(request.parameters) - {"unload_dependents"})
        if unsupported:  # Triton's config / file: overrides: models come from the repository
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{action} parameter '{shown(unsupported[0])}' is not supported: {SERVER_NAME} "
                "loads models from the repository folder (publish files there, then load)",
            )
        try:
            if action == "load":
                await self.lifecycle.load(request.model_name)
            else:
                await self.lifecycle.unload(request.model_name)
        except ServingError as exc:
            await self._fail(context, exc)


def _version_policy(policy) -> pb.ModelVersionPolicy:
    if policy.kind == "all":
        return pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    if policy.kind == "specific":
        return pb.ModelVersionPolicy(
            specific=pb.ModelVersionPolicy.Specific(versions=list(policy.specific))
        )
    return pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest))


def _unimplemented(name: str, streaming: bool):
    message = (
        f"{name} is not implemented by {SERVER_NAME}; served RPCs: ServerLive, ServerReady, ModelReady, "
        "ServerMetadata, ModelMetadata, ModelInfer, ModelStreamInfer, ModelConfig, ModelStatistics, "
        "RepositoryIndex, "
        "RepositoryModelLoad, RepositoryModelUnload"
    )

    async def handler(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = name
    return handler


for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in InferenceServicer.__dict__:
        setattr(
            InferenceServicer, _method.name, _unimplemented(_method.name, _method.client_streaming)
        )
