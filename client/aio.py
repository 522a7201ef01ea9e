"""The asyncio client: `AsyncClient`, the same methods as `Client` as coroutines on grpc.aio.

async with AsyncClient("localhost:8001") as client:
    rows = await client.classify(["examples/coat_6.png"], top_k=3)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from . import images as imaging
from . import protocol
from .client import _UNREACHABLE, ClientBase
from .errors import InferenceError
from .protocol import ModelInfo, ModelVersionState, Prediction
from .retry import Deadline, RetryPolicy, call_async


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
        rpc: Callable[..., Awaitable[Any]] = getattr(self._stub, method)
        policy = self.retry if retry else RetryPolicy(attempts=1)
        return await call_async(
            lambda seconds: rpc(request, timeout=seconds), policy, deadline, method
        )

    async def _model(self, model: str | None, deadline: Deadline) -> str:
        if model:
            return model
        if self._default_model:
            return self._default_model
        request = pb.RepositoryIndexRequest()

        async def choose(seconds: float) -> str:
            return self._choose_model(await self._stub.RepositoryIndex(request, timeout=seconds))

        try:
            return await call_async(choose, self.retry, deadline, "RepositoryIndex")
        except InferenceError as error:
            raise self._unlisted(error) from None

    async def _info(self, model: str, version: str, deadline: Deadline) -> ModelInfo:
        key = (model, version)
        if key not in self._infos:
            meta = await self._call(
                "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), deadline
            )
            try:
                config = await self._call(
                    "ModelConfig", pb.ModelConfigRequest(name=model, version=version), deadline
                )
            except InferenceError as error:
                if error.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                config = None
            self._infos[key] = protocol.model_info(meta, config)
        return self._infos[key]

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
        return await self._ask(
            self._call("ServerLive", pb.ServerLiveRequest(), self._deadline(timeout), retry=False),
            "live",
        )

    async def is_ready(
        self, model: str | None = None, version: str = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or one model) is ready; False when the server cannot be reached."""
        deadline = self._deadline(timeout)
        if model is None:
            return await self._ask(
                self._call("ServerReady", pb.ServerReadyRequest(), deadline, retry=False), "ready"
            )
        request = pb.ModelReadyRequest(name=model, version=version)
        return await self._ask(self._call("ModelReady", request, deadline, retry=False), "ready")

    @staticmethod
    async def _ask(answer: Awaitable[Any], field: str) -> bool:
        try:
            return bool(getattr(await answer, field))
        except InferenceError as error:
            if error.code in _UNREACHABLE:
                return False
            raise

    async def wait_until_ready(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until the server (or a model) is ready; InferenceError DEADLINE_EXCEEDED if it does not get there."""
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            if await self.is_ready(model, timeout=max(min(deadline.remaining(), 2.0), 0.001)):
                return
            pause = min(0.05 * 2 ** min(attempt, 5), deadline.remaining())
            if pause <= 0:
                raise deadline.expired_error(
                    attempt, f"waiting for {model or 'the server'} at {self.target} to be ready"
                )
            await asyncio.sleep(pause)

    async def models(self, *, timeout: float | None = None) -> list[str]:
        """Names of the server's ready models, sorted."""
        index = await self._index(self._deadline(timeout), ready=True)
        return sorted({m.name for m in index if m.state.upper() == "READY"})

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
        key = (info.name, version)
        if key not in self._labels:
            [(response, rows)] = await self._infer(
                info, version, self._probe(info), info.num_classes or 1_000_000, deadline
            )
            self._labels[key] = self._labels_from(
                info, protocol.classifications(response, info.output.name, rows)
            )
        return self._labels[key]

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
        batch = imaging.prepare(images, info.input_shape, info.input_dtype)
        results = await self._infer(info, version, batch, 0, deadline)
        return np.concatenate([protocol.probabilities(r, info.output.name, n) for r, n in results])

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
        batch = imaging.prepare(images, info.input_shape, info.input_dtype)
        results = await self._infer(info, version, batch, top_k, deadline)
        return [row for r, n in results for row in protocol.classifications(r, info.output.name, n)]
