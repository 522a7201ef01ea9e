"""ModelStreamInfer: Triton's bidirectional inference stream, one call carrying many requests.

Each ModelInferRequest read from the stream runs as its own task and joins the model's dynamic
batcher exactly as a unary ModelInfer does (same decoding, limits, priorities, queue timeouts,
metrics and ModelStatistics). Its answer is written to the stream as soon as it is ready, so
answers may come out of order; each carries the request's `id`. A request that fails is
answered with a ModelStreamInferResponse whose `error_message` says why (its `infer_response`
still names the model, version and id, so the caller can match it) and the stream goes on.

Bounds: at most STREAM_WINDOW requests of one stream are in progress (queued, computing, or
answered but not yet sent); the next message is read only when one is done, so a fast writer,
or a client that does not read its answers, is held back by HTTP/2 flow control, not by our
memory.
Stream requests also share the server's admission limits with unary calls (the byte budget of
--max-queue-bytes and the limit on calls in progress): a request over them is answered
"Server busy" in the stream. The call's deadline, if any, applies to every request in it.

End of the stream: when the client half-closes (it has sent its last request), the requests in
progress finish and are answered, then the call ends OK. When the client cancels the call or
goes away, its queued requests leave the batcher's queue before compute and are counted as
cancelled; nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from convserve.proto import grpc_service_pb2 as pb
from convserve.server.errors import ServingError, Unavailable

log = logging.getLogger(__name__)

STREAM_WINDOW = 128  # requests of one stream in progress at once (two full batches of 64)


class InferStream:
    """One ModelStreamInfer call: reads requests, answers each one as it finishes."""

    def __init__(self, servicer: Any, context: Any, admission: Any = None):
        self.servicer = servicer  # convserve.server.servicer.InferenceServicer
        self.context = context
        self.admission = admission  # convserve.server.admission.Admission, or None
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic_ns() + int(remaining * 1e9)
        self._write_lock = asyncio.Lock()  # grpc.aio takes one write at a time
        self._window = asyncio.Semaphore(STREAM_WINDOW)

    async def serve(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        """Answer every request of the stream; return once the client half-closed and every
        answer is written. Cancelled (client gone): the queued requests are abandoned. At the
        end of a shutdown's refusal phase: stop reading, answer the requests in progress, then
        end the call with UNAVAILABLE (so the server's stop does not wait for open streams)."""
        pending: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(requests, pending))
        ending = loop.create_task(self.servicer.state.streams_end.wait())
        try:
            await asyncio.wait((reader, ending), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():  # the client half-closed, or sent an undecodable message
                reader.result()  # (then AbortError: the call is over, the rest is dropped)
                if pending:
                    await asyncio.gather(*pending)
                return
            reader.cancel()  # the server is stopping: answer what is in progress, then end
            await asyncio.wait((reader,))
            if pending:
                await asyncio.gather(*pending)
            await self.context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "Server exiting: the stream is closed; retry on another replica",
            )
        finally:
            # cancelled, or the client sent an undecodable message: drop what is still queued
            for task in (reader, ending, *pending):
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _read(
        self, requests: AsyncIterator[pb.ModelInferRequest], pending: set[asyncio.Task]
    ) -> None:
        """Read requests until the client half-closes, each one started as a task."""
        loop = asyncio.get_running_loop()
        while True:
            await self._window.acquire()  # read the next message only with room for it
            request = await anext(requests, None)
            if request is None:
                return
            task = loop.create_task(self._one(request))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _one(self, request: pb.ModelInferRequest) -> None:
        """Answer one request; its window slot is freed once the answer is sent, so a client
        that does not read its answers stops the reading of new requests too."""
        try:
            try:
                response = await self._answer(request)
            except ServingError as exc:
                response = _error_response(request, str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:  # a server bug: this request fails, the stream and server go on
                log.exception("internal error in a ModelStreamInfer request")
                response = _error_response(
                    request, "ModelStreamInfer: internal server error (details in the server log)"
                )
            try:
                async with self._write_lock:
                    await self.context.write(response)
            except Exception:  # noqa: BLE001 - the client went away; the call's end cancels the rest
                log.debug("ModelStreamInfer: an answer could not be sent (the stream has ended)")
        finally:
            self._window.release()

    async def _answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        """Infer one request under the server's limits; raises ServingError."""
        servicer, state = self.servicer, self.servicer.state
        t0 = time.perf_counter_ns()
        admission = self.admission
        if state.refusing or (admission is not None and admission.holding):
            raise Unavailable("Server exiting: no new requests; retry on another replica")
        if not state.ready:
            raise Unavailable(state.loading_message)
        entry = servicer.repository.get(request.model_name, request.model_version)
        outcome = entry.outcome(t0)
        held = self._admit(request, outcome)
        try:
            response = await servicer.answer(entry, request, self.deadline, outcome)
        except asyncio.CancelledError:  # the stream was cancelled or its deadline passed
            passed = self.deadline is not None and time.monotonic_ns() >= self.deadline
            outcome.failed("timeout" if passed else "cancelled")
            raise
        except ServingError as exc:
            outcome.failed(exc.reason)
            raise
        finally:
            if admission is not None:
                admission.active -= 1
                admission.budget.give_back(held)
        return pb.ModelStreamInferResponse(infer_response=response)

    def _admit(self, request: pb.ModelInferRequest, outcome: Any) -> int:
        """Count the request as a call in progress and reserve its bytes (as unary calls do);
        returns the bytes held. Raises Unavailable ("Server busy") when there is no room."""
        admission = self.admission
        if admission is None:
            return 0
        size = request.ByteSize()
        if admission.active >= admission.max_calls:
            reason, why = "concurrency", f"{admission.active} calls are in progress"
        elif not admission.budget.try_take(size):
            reason = "memory"
            why = (
                f"requests in progress hold {admission.budget.in_use} of the "
                f"{admission.budget.limit} bytes this server admits (--max-queue-bytes)"
            )
        else:
            admission.active += 1
            return size
        admission.on_refused("/inference.GRPCInferenceService/ModelStreamInfer", reason)
        outcome.failed("rejected")
        raise Unavailable(f"Server busy: {why}; retry later")


def _error_response(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An answer saying why `request` failed, naming it so the caller can match it."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
