"""The ceiling of a Python gRPC server: a `grpc.aio` server whose ModelInfer does no work.

    python loadtest/noop_server.py --port 8005 --model-repository models

Same generated stubs as `convserve serve`, none of its handler wrappers unless asked.
ModelInfer parses the ModelInferRequest with protobuf (grpc.aio's own deserializer, as an
ordinary servicer does) and returns one ModelInferResponse built at start-up: the
probabilities of one image of the served model, so a load generator that checks responses
gets the answer it expects for a single-image request. The health service answers SERVING,
and ModelStatistics returns no entries (counts 0). `bench_throughput.py --versus-noop` runs it
beside convserve under the same load, so the ratio of the two is measured side by side.

With `--thread-handoff` each ModelInfer also makes the trip every batching server with its
compute off the event loop makes, and nothing else: it queues an entry for a worker thread,
which takes everything queued at once (a "batch", computed in no time) and hands the finished
entries back to the event loop with one `call_soon_threadsafe`; the handler awaits its future.
The gap between this and the plain no-op server is the price of that trip alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

import numpy as np


def canned_response(model_file: Path | None, images: np.ndarray) -> bytes:
    """A serialized ModelInferResponse carrying the model's probabilities for `images`
    (zeros of 10 classes per image when no model file is given)."""
    from convserve.proto import grpc_service_pb2 as pb

    if model_file is not None:
        from convserve.core import Model

        probs = Model.load(model_file).predict(images)
        name, version = model_file.parent.parent.name, model_file.parent.name
    else:
        probs, name, version = np.zeros((len(images), 10), np.float32), "model", "1"
    response = pb.ModelInferResponse(model_name=name, model_version=version)
    response.outputs.add(name="probabilities", datatype="FP32", shape=probs.shape)
    response.raw_output_contents.append(np.ascontiguousarray(probs, "<f4").tobytes())
    return response.SerializeToString()


class NoopServicer:
    """ModelInfer answers the canned response; everything else of the service is UNIMPLEMENTED."""

    def __init__(self, response: bytes):
        from convserve.proto import grpc_service_pb2 as pb

        self._pb = pb
        self.response = pb.ModelInferResponse.FromString(response)
        self.calls = 0

    async def ModelInfer(self, request, context):
        self.calls += 1
        return self.response

    async def ModelStatistics(self, request, context):
        return self._pb.ModelStatisticsResponse()

    async def ServerLive(self, request, context):
        return self._pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return self._pb.ServerReadyResponse(ready=True)


class HandoffServicer(NoopServicer):
    """ModelInfer goes through a worker thread (see the module docstring) before it answers."""

    def __init__(self, response: bytes):
        super().__init__(response)
        self._queue: list[asyncio.Future] = []
        self._cond = threading.Condition()
        self._idle = False
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._work, daemon=True, name="handoff").start()

    async def ModelInfer(self, request, context):
        self.calls += 1
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        with self._cond:
            self._queue.append(future)
            if self._idle:
                self._cond.notify()
        await future
        return self.response

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                batch, self._queue = self._queue, []
            self._loop.call_soon_threadsafe(_finish, batch)


def _finish(batch: list[asyncio.Future]) -> None:
    for future in batch:
        if not future.done():
            future.set_result(None)


async def serve(
    host: str,
    port: int,
    response: bytes,
    port_file: Path | None,
    with_wrappers: bool,
    thread_handoff: bool = False,
) -> None:
    import grpc
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    options = [
        ("grpc.max_receive_message_length", 1 << 30),
        ("grpc.max_send_message_length", 1 << 30),
        ("grpc.http2.bdp_probe", 0),  # as convserve
    ]
    server = grpc.aio.server(options=options)
    registrar = server
    if with_wrappers:  # convserve's own, as it registers them: admission, raw-bytes parsing
        from convserve.server.admission import Admission, ByteBudget
        from convserve.server.wire import WrappingRegistrar, raw_requests

        admission = Admission(ByteBudget(1 << 32, 1 << 24), lambda *_: None, 1 << 20)
        registrar = WrappingRegistrar(server, [admission.wrap, raw_requests()])
    base = HandoffServicer if thread_handoff else NoopServicer
    servicer = type("NoopInferenceServicer", (base, pb_grpc.GRPCInferenceServiceServicer), {})(
        response
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registrar)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), registrar)  # SERVING
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if port_file is not None:
        port_file.write_text(str(bound))
    print(f"no-op server on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --port-file)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument(
        "--model-file",
        type=Path,
        help="model.safetensors whose answer for --seed's image is canned (default: zeros)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the image (uint8, 28x28x1)")
    parser.add_argument("--shape", default="28,28,1", help="H,W,C of the image")
    parser.add_argument(
        "--with-wrappers",
        action="store_true",
        help="put convserve's admission and raw-bytes parsing before the handlers (their cost)",
    )
    parser.add_argument(
        "--thread-handoff",
        action="store_true",
        help="answer each call only after a round trip through a worker thread (its cost)",
    )
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    image = np.random.default_rng(args.seed).integers(0, 256, (1, *shape), dtype=np.uint8)
    response = canned_response(args.model_file, image)
    try:
        asyncio.run(
            serve(
                args.host,
                args.port,
                response,
                args.port_file,
                args.with_wrappers,
                args.thread_handoff,
            )
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
