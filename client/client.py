"""The synchronous client: `Client`.

from convserve.client import Client
with Client("localhost:8001") as client:
    probabilities = client.predict("examples/sneaker_9.png")
    best = client.classify(images, top_k=3)
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from .base import ClientBase
from .errors import InferenceError
from .plan import Call, Concurrently, Effect, Plan, Running, Sleep
from .retry import call as retried

T = TypeVar("T")


class Client(ClientBase):
    """A blocking client for convserve (or any Open Inference Protocol server with image models).

    `target` is "host:port", several of them (a list or comma-separated; requests are spread
    with gRPC's round_robin policy), or a gRPC name such as "dns:///convserve:8001"; by default
    $CONVSERVE_TARGET or "localhost:8001". `timeout` is each call's deadline in seconds (every
    attempt and chunk included), `retries` how often UNAVAILABLE is retried (or a RetryPolicy),
    `concurrency` how many chunks of a large input are in flight at once. Failed calls raise
    InferenceError.

    Security: TLS is on when any `tls_*` file is given: `tls_ca_file` is the PEM CA that signed
    the server's certificate (default: the system's CAs), `tls_cert_file` and `tls_key_file`
    the client's certificate and key for mutual TLS. `token` is sent as `authorization: Bearer
    <token>` (default: $CONVSERVE_TOKEN; "" sends none); without TLS only to a loopback target.
    `credentials` (gRPC channel credentials) replaces the `tls_*` files for full control.
    """

    def _connect(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(
                self.target, self._credentials, options=self._options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- lifecycle

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the driver

    def _run(self, plan: Plan[T]) -> T:
        """Drive `plan` to its result, performing its effects with blocking calls."""
        running = Running(plan)
        while not running.done:
            try:
                reply, failure = self._perform(running.effect), None
            except InferenceError as error:
                reply, failure = None, self._explain(error)
            # resumed outside the except block, so a failure the plan raises is not chained
            running.resume(reply, failure)
        return running.result

    def _perform(self, effect: Effect) -> Any:
        """Perform one effect of a plan with blocking calls; its reply."""
        match effect:
            case Call():
                rpc, call = getattr(self._stub, effect.method), effect

                def attempt(seconds: float) -> Any:
                    return call.answer(rpc(call.request, timeout=seconds, metadata=call.metadata))

                return retried(attempt, call.policy, call.deadline, call.method)
            case Concurrently(calls):
                if len(calls) == 1 or self.concurrency == 1:
                    return [self._perform(make()) for make in calls]
                return list(self._thread_pool().map(lambda make: self._perform(make()), calls))
            case Sleep(seconds):
                time.sleep(seconds)

    def _thread_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.concurrency, thread_name_prefix="convserve-client"
                )
            return self._pool
