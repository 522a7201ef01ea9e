"""The asyncio client: `AsyncClient`, the same methods as `Client` as coroutines on grpc.aio,
plus streams (`predict_stream`, `classify_stream`) over Triton's ModelStreamInfer.

async with AsyncClient("localhost:8001") as client:
    rows = await client.classify(["examples/coat_6.png"], top_k=3)
    async for answer in client.predict_stream(batches, model="fashion"):
        probabilities = answer.result()  # answer.index: which batch of `batches`
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc.aio
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from . import images as imaging
from . import protocol
from .base import ClientBase
from .errors import InferenceError, from_rpc_error
from .protocol import ModelInfo, ModelVersionState, Prediction, StreamResult
from .retry import Deadline, call_async


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

    # -- plumbing

    async def _call(self, method: str, request: Any, deadline: Deadline, retry: bool = True) -> Any:
        attempt = self._attempt(getattr(self._stub, method), request)
        try:
            return await call_async(attempt, self._policy(retry), deadline, method)
        except InferenceError as error:
            raise self._explain(error) from None

    async def _model(self, model: str | None, deadline: Deadline) -> str:
        if model:
            return model
        if self._default_model:
            return self._default_model
        request = pb.RepositoryIndexRequest()

        async def choose(seconds: float) -> str:
            return self._choose_model(
                await self._stub.RepositoryIndex(request, timeout=seconds, metadata=self._metadata)
            )

        try:
            return await call_async(choose, self.retry, deadline, "RepositoryIndex")
        except InferenceError as error:
            raise self._explain(self._unlisted(error)) from None

    async def _info(self, model: str, version: str, deadline: Deadline) -> ModelInfo:
        if (model, version) in self._infos:
            return self._infos[(model, version)]
        meta_request, config_request = self._metadata_requests(model, version)
        meta = await self._call("ModelMetadata", meta_request, deadline)
        config = None
        try:
            config = await self._call("ModelConfig", config_request, deadline)
        except InferenceError as error:
            self._config_missing(error)
        return self._remember(model, version, meta, config)

    async def _index(self, deadline: Deadline, ready: bool = False) -> list[ModelVersionState]:
        try:
            response = await self._call(
                "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), deadline
            )
        except InferenceError as error:
            raise self._unlisted(error) from None
        return protocol.repository_index(response)

    async def _infer(
        self, info: ModelInfo, version: str, batch: np.ndarray, class_count: int, deadline: Deadline
    ) -> list[tuple[Any, int]]:
        limit = asyncio.Semaphore(self.concurrency)

        async def one(part: slice) -> tuple[Any, int]:
            async with limit:
                request = protocol.infer_request(info, version, batch[part], class_count)
                return await self._call("ModelInfer", request, deadline), part.stop - part.start

        parts = protocol.chunks(len(batch), info.max_batch_size)
        tasks = [asyncio.ensure_future(one(p)) for p in parts]
        try:
            return list(await asyncio.gather(*tasks))
        except InferenceError as error:
            self._forget(error, (info.name, version))
            raise
        finally:
            for task in tasks:
                task.cancel()

    # -- health and metadata

    async def is_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server answers and says it is live (False when it cannot be reached)."""
        return await self._ask("ServerLive", pb.ServerLiveRequest(), "live", timeout)

    async def is_ready(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or one model) is ready; False when the server cannot be reached."""
        if model is None:
            return await self._ask("ServerReady", pb.ServerReadyRequest(), "ready", timeout)
        request = pb.ModelReadyRequest(name=model, version=version)
        return await self._ask("ModelReady", request, "ready", timeout)

    async def _ask(self, method: str, request: Any, field: str, timeout: float | None) -> bool:
        try:
            response = await self._call(method, request, self._deadline(timeout), retry=False)
        except InferenceError as error:
            return self._answer_or_false(error)
        return bool(getattr(response, field))

    async def wait_until_ready(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until the server (or a model) is ready; InferenceError DEADLINE_EXCEEDED if it does not get there."""
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            if await self.is_ready(model, timeout=self._ready_question_timeout(deadline)):
                return
            await asyncio.sleep(self._ready_pause(deadline, attempt, model))

    async def models(self, *, timeout: float | None = None) -> list[str]:
        """Names of the server's ready models, sorted."""
        return self._ready_names(await self._index(self._deadline(timeout), ready=True))

    async def repository(self, *, timeout: float | None = None) -> list[ModelVersionState]:
        """Every model version the server knows, with its state."""
        return await self._index(self._deadline(timeout))

    async def metadata(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        """The model's inputs, outputs, versions and max_batch_size (cached per client)."""
        deadline = self._deadline(timeout)
        return await self._info(await self._model(model, deadline), version, deadline)

    async def labels(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> tuple[str, ...]:
        """The model's class labels, by output index (learned from one classification; cached)."""
        deadline = self._deadline(timeout)
        info = await self._info(await self._model(model, deadline), version, deadline)
        if (info.name, version) in self._labels:
            return self._labels[(info.name, version)]
        probe = await self._infer(
            info, version, self._probe(info), self._probe_classes(info), deadline
        )
        return self._learn_labels(info, version, probe)

    # -- inference

    async def predict(
        self,
        images: imaging.ImageSource,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Class probabilities, shape (N, classes); see `Client.predict`."""
        deadline = self._deadline(timeout)
        info = await self._info(await self._model(model, deadline), version, deadline)
        results = await self._infer(info, version, self._batch(images, info), 0, deadline)
        return self._probabilities(info, results)

    async def classify(
        self,
        images: imaging.ImageSource,
        top_k: int = 5,
        model: str | None = None,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> list[list[Prediction]]:
        """The `top_k` best classes of each image, best first; see `Client.classify`."""
        self._check_top_k(top_k)
        deadline = self._deadline(timeout)
        info = await self._info(await self._model(model, deadline), version, deadline)
        results = await self._infer(info, version, self._batch(images, info), top_k, deadline)
        return self._rows(info, results)

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
        info = await self._info(await self._model(model, setup), version, setup)
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
