"""Fuzz a running convserve server over gRPC and print the status-code table.

    python loadtest/fuzz.py --target 127.0.0.1:8001 --calls 100000

Each call is one of: a ModelInfer request that is well-formed protobuf with hostile fields
(wrong names, datatypes, shapes, sizes, parameters, versions, NaN/huge pixels, valid images),
the bytes of a valid request mutated (flipped, cut, spliced, repeated), random bytes, or a
hostile call to another RPC (metadata, readiness, config, statistics, repository index,
health). Every call is sent as raw bytes, so the server's own parsing is what is tested.
Every answer must be a deliberate status: UNKNOWN, INTERNAL or DATA_LOSS count as failures, as
does a status message with Python exception text or a server that stops answering health
checks. Exit status 0 when there was none. Needs only grpcio, NumPy and the protobufs.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from grpc_health.v1 import health_pb2

SERVICE = "/inference.GRPCInferenceService/"
FAILING = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
PYTHON_TEXT = ("Traceback", "Exception", "Error:", "<class ", 'File "')
DATATYPES = ["UINT8", "FP32", "INT8", "FP16", "BYTES", "", "uint8", "FP32\0", "ÜINT8"]
VERSIONS = ["", "1", "2", "0", "-1", "²", "٣", "1" * 40, " 1", "1.0", "99999999999999999999"]
PARAMETER_KEYS = ["priority", "timeout", "sequence_id", "shared_memory_region", "binary_data", "x"]


class Hostile:
    """Random hostile calls for the models the server reports (seeded, reproducible)."""

    def __init__(self, rng: np.random.Generator, models: dict[str, tuple[int, int, int]]):
        self.rng = rng
        self.models = models
        self.names = list(models) + ["nope", "", "a" * 300, "fa\0shion", "ﬁ"]
        self.valid = [self.valid_request(name).SerializeToString() for name in models]

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def text(self, max_len: int = 12) -> str:
        codes = self.rng.integers(1, 0x2FFF, int(self.rng.integers(0, max_len + 1)))
        return "".join(chr(c) for c in codes if not 0xD800 <= c < 0xE000)

    def pixels(self, n: int, shape: tuple[int, int, int], datatype: str) -> np.ndarray:
        if datatype == "UINT8":
            return self.rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        x = self.rng.uniform(0, 255, (n, *shape)).astype(np.float32)
        special = self.rng.integers(6)
        if special == 1:
            x.flat[int(self.rng.integers(x.size))] = self.pick([np.nan, np.inf, -np.inf])
        elif special == 2:
            x[...] = self.pick([3.4e38, -3.4e38, 1e30, 1e-45])
        return x

    def valid_request(self, name: str, n: int = 1, datatype: str = "UINT8") -> pb.ModelInferRequest:
        shape = self.models[name]
        request = pb.ModelInferRequest(model_name=name)
        request.inputs.add(name="input", datatype=datatype, shape=(n, *shape))
        request.raw_input_contents.append(self.pixels(n, shape, datatype).tobytes())
        return request

    def hostile_infer(self) -> bytes:
        name = self.pick(list(self.models))
        shape = self.models[name]
        rng = self.rng
        n = int(self.pick([1, 1, 2, 8, 0, -1]))
        datatype = self.pick(["UINT8", "FP32", "UINT8", "FP32", *DATATYPES])
        request = self.valid_request(name, max(n, 1), "FP32" if datatype == "FP32" else "UINT8")
        tensor = request.inputs[0]
        tensor.datatype = datatype
        choice = int(rng.integers(12))
        if choice == 0:
            request.model_name = self.pick(self.names)
        elif choice == 1:
            request.model_version = self.pick(VERSIONS)
        elif choice == 2:
            del tensor.shape[:]
            tensor.shape.extend(
                int(v) for v in rng.integers(-(2**62), 2**62, int(rng.integers(0, 6)))
            )
        elif choice == 3:
            tensor.shape[0] = n
        elif choice == 4:
            tensor.name = self.pick(["", "INPUT", "probabilities", self.text()])
        elif choice == 5:
            request.raw_input_contents[0] = request.raw_input_contents[0][
                : -int(rng.integers(1, 9))
            ]
        elif choice == 6:
            request.raw_input_contents.append(b"\0" * int(rng.integers(0, 9)))
        elif choice == 7:
            del request.raw_input_contents[:]
            count = int(np.prod(shape)) * max(n, 1) + int(rng.integers(-1, 2))
            if datatype == "FP32":
                tensor.contents.fp32_contents.extend(rng.uniform(0, 255, max(count, 0)).tolist())
            else:
                tensor.contents.uint_contents.extend(rng.integers(0, 300, max(count, 0)).tolist())
        elif choice == 8:
            parameter = request.parameters[self.pick(PARAMETER_KEYS)]
            kind = int(rng.integers(4))
            if kind == 0:
                parameter.int64_param = int(rng.integers(-(2**63), 2**63 - 1))
            elif kind == 1:
                parameter.uint64_param = int(rng.integers(0, 2**63)) * 2
            elif kind == 2:
                parameter.string_param = self.text()
            else:
                parameter.bool_param = True
        elif choice == 9:
            output = request.outputs.add(name=self.pick(["probabilities", "", self.text()]))
            output.parameters["classification"].int64_param = int(
                self.pick([1, 3, 0, -5, 2**40, 10**18])
            )
        elif choice == 10:
            request.inputs.add(name="input", datatype="UINT8", shape=tensor.shape)
        else:
            request.id = self.text(2000)
        return request.SerializeToString()

    def mutated(self) -> bytes:
        data = bytearray(self.pick(self.valid))
        rng = self.rng
        for _ in range(int(rng.integers(1, 5))):
            if not data:
                break
            at = int(rng.integers(len(data)))
            op = int(rng.integers(5))
            if op == 0:
                data[at] = int(rng.integers(256))
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = rng.bytes(int(rng.integers(1, 16)))
            elif op == 3:
                data[at : at + 1] = b"\xff" * int(rng.integers(1, 11))  # long varints
            else:
                data += data[at : at + 64]
        return bytes(data)

    def other_call(self) -> tuple[str, bytes]:
        name, version = self.pick(self.names), self.pick(VERSIONS)
        method = self.pick(
            ["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics", "RepositoryIndex"]
        )
        if method == "RepositoryIndex":
            message = pb.RepositoryIndexRequest(repository_name=self.text(), ready=True)
        else:
            message = getattr(pb, f"{method}Request")(name=name, version=version)
        if self.rng.integers(4) == 0:
            return "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(
                service=self.text(40)
            ).SerializeToString()
        return SERVICE + method, message.SerializeToString()

    def call(self) -> tuple[str, str, bytes]:
        """(kind, method path, request bytes) of the next call."""
        roll = self.rng.random()
        if roll < 0.45:
            return "infer", SERVICE + "ModelInfer", self.hostile_infer()
        if roll < 0.7:
            return "mutated", SERVICE + "ModelInfer", self.mutated()
        if roll < 0.8:
            method = self.pick(
                ["ModelInfer", "ModelReady", "ModelMetadata", "ServerMetadata", "ModelConfig"]
            )
            return "random", SERVICE + method, self.rng.bytes(int(self.rng.integers(0, 512)))
        return ("other", *self.other_call())


def discover(channel: grpc.Channel) -> dict[str, tuple[int, int, int]]:
    """Ready models and their image shapes, from RepositoryIndex and ModelMetadata."""
    index = channel.unary_unary(
        SERVICE + "RepositoryIndex",
        request_serializer=pb.RepositoryIndexRequest.SerializeToString,
        response_deserializer=pb.RepositoryIndexResponse.FromString,
    )(pb.RepositoryIndexRequest(ready=True), timeout=10)
    metadata = channel.unary_unary(
        SERVICE + "ModelMetadata",
        request_serializer=pb.ModelMetadataRequest.SerializeToString,
        response_deserializer=pb.ModelMetadataResponse.FromString,
    )
    models = {}
    for model in index.models:
        shape = metadata(pb.ModelMetadataRequest(name=model.name), timeout=10).inputs[0].shape
        models[model.name] = tuple(int(v) for v in shape[1:])
    return models


def healthy(channel: grpc.Channel) -> bool:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        return check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    except grpc.RpcError:
        return False


def run(
    target: str, calls: int, concurrency: int, seed: int, report: Callable[[str], None] = print
) -> int:
    """Send `calls` hostile calls with `concurrency` in flight; print the table; 0 if all good."""
    options = [
        ("grpc.max_send_message_length", 1 << 26),
        ("grpc.max_receive_message_length", 1 << 26),
    ]
    channel = grpc.insecure_channel(target, options=options)
    models = discover(channel)
    if not models:
        report(f"no ready model on {target}")
        return 2
    hostile = Hostile(np.random.default_rng(seed), models)
    table: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    slots = threading.Semaphore(concurrency)
    stubs: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def done(kind: str, method: str, future: grpc.Future) -> None:
        error = future.exception()
        code = grpc.StatusCode.OK if error is None else error.code()
        details = "" if error is None else (error.details() or "")
        with lock:
            table[(f"{kind} {method.rsplit('/', 1)[1]}", code.name)] += 1
            if code in FAILING or any(text in details for text in PYTHON_TEXT) or "\n" in details:
                failures.append(f"{kind} {method}: {code.name}: {details[:300]}")
        slots.release()

    t0 = time.monotonic()
    for i in range(calls):
        kind, method, data = hostile.call()
        stub = stubs.get(method) or stubs.setdefault(method, channel.unary_unary(method))
        slots.acquire()
        future = stub.future(data, timeout=30)
        future.add_done_callback(lambda f, k=kind, m=method: done(k, m, f))
        if (i + 1) % 20000 == 0:
            report(f"  {i + 1} calls sent, {time.monotonic() - t0:.0f} s")
    for _ in range(concurrency):
        slots.acquire()
    elapsed = time.monotonic() - t0
    alive = healthy(channel)
    channel.close()
    print_table(table, report)
    report(
        f"{calls} calls in {elapsed:.1f} s ({calls / elapsed:.0f}/s), concurrency {concurrency}, "
        f"seed {seed}; failures: {len(failures)}; server healthy afterwards: {alive}"
    )
    for line in failures[:20]:
        report(f"  FAIL {line}")
    return 0 if not failures and alive else 1


def print_table(table: collections.Counter, report: Callable[[str], None]) -> None:
    codes = sorted({code for _, code in table}, key=lambda c: grpc.StatusCode[c].value[0])
    rows = sorted({row for row, _ in table})
    width = max(len(r) for r in rows)
    report(f"{'call':<{width}}  " + "  ".join(f"{c:>18}" for c in codes) + "      total")
    for row in rows:
        counts = [table[(row, c)] for c in codes]
        report(f"{row:<{width}}  " + "  ".join(f"{n:>18}" for n in counts) + f"  {sum(counts):>9}")
    totals = [sum(table[(r, c)] for r in rows) for c in codes]
    report(f"{'all':<{width}}  " + "  ".join(f"{n:>18}" for n in totals) + f"  {sum(totals):>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:8001", help="server host:port")
    parser.add_argument("--calls", type=int, default=100_000, help="calls to send")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--seed", type=int, default=0, help="random seed (reproducible runs)")
    args = parser.parse_args(argv)
    return run(args.target, args.calls, args.concurrency, args.seed)


if __name__ == "__main__":
    sys.exit(main())
