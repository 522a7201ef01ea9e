"""The asyncio client: `AsyncClient`, the same methods as `Client` as coroutines on grpc.aio,
plus streams (`predict_stream`, `classify_stream`) over Triton's ModelStreamInfer.

async with AsyncClient("localhost:8001") as client:
    rows = await client.classify(["examples/coat_6.png"], top_k=3)
    async for answer in client.predict_stream(batches, model="fashion"):
        probabilities = answer.result()  # answer.index: which batch of `batches`
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc.aio
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from . import images as imaging
from . import protocol
from .base import ClientBase
from .errors import InferenceError, from_rpc_error
from .plan import Call, Concurrently, Effect, Plan, Running, Sleep
from .protocol import ModelInfo, StreamResult
from .retry import call_async

T = TypeVar("T")


class AsyncClient(ClientBase):
    """Like `Client` (same arguments), with every call a coroutine. Use it inside one event loop.

    Chunks of a large input run concurrently as tasks, at most `concurrency` at a time.
    """

    def _connect(self) -> None:
        # The channel is made on first use, inside the event loop that will use it.
        self._channel: grpc.aio.Channel | None = None
        self._stub_: Any = None

    @property
    def _stub(self) -> Any:
        # Made on first use, so the channel belongs to the running event loop.
        if self._stub_ is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            self._stub_ = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub_

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub_ = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- the driver

    async def _run(self, plan: Plan[T]) -> T:
        """Drive `plan` to its result, awaiting its effects."""
        running = Running(plan)
        while not running.done:
            try:
                reply, failure = await self._perform(running.effect), None
            except InferenceError as error:
                reply, failure = None, self._explain(error)
            # resumed outside the except block, so a failure the plan raises is not chained
            running.resume(reply, failure)
        return running.result

    async def _perform(self, effect: Effect) -> Any:
        """Perform one effect of a plan, awaiting it; its reply."""
        match effect:
            case Call():
                rpc, call = getattr(self._stub, effect.method), effect

                async def attempt(seconds: float) -> Any:
                    answer = await rpc(call.request, timeout=seconds, metadata=call.metadata)
                    return call.answer(answer)

                return await call_async(attempt, call.policy, call.deadline, call.method)
            case Concurrently(calls):
                return await self._gather(calls)
            case Sleep(seconds):
                await asyncio.sleep(seconds)

    async def _gather(self, calls: Sequence[Callable[[], Call]]) -> list[Any]:
        """The replies of `calls`, at most `concurrency` running as tasks at once."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(make: Callable[[], Call]) -> Any:
            async with limit:
                return await self._perform(make())

        tasks = [asyncio.ensure_future(one(make)) for make in calls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # -- streams

    def predict_stream(
        self,
        batches: Iterable[imaging.ImageSource] | AsyncIterable[imaging.ImageSource],
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Send each item of `batches` (images, as `predict` takes them) as one request of a
        single ModelStreamInfer call, and yield a `StreamResult` per request as it finishes
        (completion order; `.index` is the item's position, `.result()` the probabilities).

        A request the server refuses yields a result with `.error` and the stream goes on.
        `timeout` bounds the whole stream (None: no deadline). Leaving the loop early cancels
        the stream: the server drops its requests still queued. InferenceError is raised when
        the stream itself fails (server unreachable, refused token, deadline passed)."""
        return self._stream(batches, 0, model, version, timeout)

    def classify_stream(
        self,
        batches: Iterable[imaging.ImageSource] | AsyncIterable[imaging.ImageSource],
        top_k: int = 5,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Like `predict_stream`, each result's value being the `top_k` best classes of each
        image, best first (as `classify` returns them)."""
        self._check_top_k(top_k)
        return self._stream(batches, top_k, model, version, timeout)

    async def _stream(
        self,
        batches: Iterable[imaging.ImageSource] | AsyncIterable[imaging.ImageSource],
        class_count: int,
        model: str | None,
        version: str,
        timeout: float | None,
    ) -> AsyncIterator[StreamResult]:
        setup = self._deadline(timeout)
        info = await self._run(self._model_info(model, version, setup))
        call = self._stub.ModelStreamInfer(
            timeout=None if timeout is None else setup.remaining(), metadata=self._metadata
        )

        async def send() -> None:
            index = 0
            async for images in _as_async(batches):
                await call.write(self._stream_request(info, version, images, class_count, index))
                index += 1
            await call.done_writing()

        def stop_on_failure(task: asyncio.Task) -> None:
            if _failure(task) is not None:
                call.cancel()

        sender = asyncio.ensure_future(send())
        sender.add_done_callback(stop_on_failure)
        try:
            async for response in call:
                yield self._stream_result(info, response, class_count)
            await sender
        except (grpc.RpcError, asyncio.CancelledError) as error:
            failure = _failure(sender)
            if failure is not None:  # e.g. an item that is not images: the caller's mistake
                raise failure from None
            if isinstance(error, asyncio.CancelledError):
                raise
            raise self._explain(from_rpc_error(error)) from None
        finally:
            sender.cancel()
            call.cancel()

    def _stream_request(
        self,
        info: ModelInfo,
        version: str,
        images: imaging.ImageSource,
        class_count: int,
        index: int,
    ) -> Any:
        """Request `index` of a stream: the whole batch in one message, its index as the id."""
        return protocol.infer_request(
            info, version, self._batch(images, info), class_count, str(index)
        )

    def _stream_result(self, info: ModelInfo, response: Any, class_count: int) -> StreamResult:
        """A ModelStreamInferResponse as a StreamResult (matched to its request by `id`)."""
        answer = response.infer_response
        try:
            index = int(answer.id)
        except ValueError:
            index = -1  # not one of ours (a server that does not echo ids)
        if response.error_message:
            message = response.error_message
            return StreamResult(index, error=InferenceError(message, _stream_code(message)))
        rows = answer.outputs[0].shape[0] if answer.outputs and answer.outputs[0].shape else 0
        results = [(answer, rows)]
        if class_count:
            return StreamResult(index, self._rows(info, results))
        return StreamResult(index, self._probabilities(info, results))


def _stream_code(message: str) -> grpc.StatusCode:
    """A stream's error carries only a message: UNAVAILABLE for the retryable refusals (busy,
    exiting, queue full, not ready, queue timeout), INVALID_ARGUMENT otherwise."""
    retryable = ("Server busy", "Server exiting", "Server not ready", "Exceeds maximum queue size")
    if message.startswith(retryable) or message.startswith("Request timeout expired"):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


def _failure(task: asyncio.Task) -> BaseException | None:
    """The exception a finished task raised (None while running, when cancelled or fine)."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()


async def _as_async(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
