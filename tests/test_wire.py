"""The raw-bytes wrapper (server/wire.py), registered through `WrappingRegistrar` on a real
grpc.aio server on loopback, with small handlers standing in for a server bug, an unimplemented
base method and a slow answer."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from convserve.server.wire import Throttled, WrappingRegistrar, raw_requests
from grpc_health.v1 import health_pb2

METHOD = "/test.Service/"


async def buggy(request, context):
    raise RuntimeError("secret internal detail")


async def unimplemented(request, context):
    raise NotImplementedError("Method not implemented!")


async def slow(request, context):
    time.sleep(0.3)  # blocks (not cancellable), as a compute step would; the deadline passes
    raise ValueError("answer after the deadline")


async def echo(request, context):
    return health_pb2.HealthCheckResponse(status=len(request.service))


def handlers() -> dict[str, grpc.RpcMethodHandler]:
    def method(fn):
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )

    table = {"Buggy": buggy, "Unimplemented": unimplemented, "Slow": slow, "Echo": echo}
    return {name: method(fn) for name, fn in table.items()}


async def calls(caplog) -> dict[str, tuple[grpc.StatusCode, str]]:
    server = grpc.aio.server()
    WrappingRegistrar(server, [raw_requests()]).add_registered_method_handlers(
        "test.Service", handlers()
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = health_pb2.HealthCheckRequest(service="abc").SerializeToString()
            for name, data, timeout in [
                ("Buggy", good, 10),
                ("Unimplemented", good, 10),
                ("Slow", good, 0.1),
                ("Echo", good, 10),
                ("Echo", b"\xff", 10),
            ]:
                key = name if data == good else f"{name} garbage"
                try:
                    answer = await channel.unary_unary(METHOD + name)(data, timeout=timeout)
                    status = health_pb2.HealthCheckResponse.FromString(answer).status
                    results[key] = (grpc.StatusCode.OK, str(status))
                except grpc.aio.AioRpcError as exc:
                    results[key] = (exc.code(), exc.details())
            await asyncio.sleep(0.5)  # let the slow handler finish after its deadline
    finally:
        await server.stop(1)
    return results


def test_interceptor_statuses_and_log(caplog):
    caplog.set_level(logging.DEBUG, logger="convserve.server.wire")
    results = asyncio.run(calls(caplog))
    assert results["Echo"] == (grpc.StatusCode.OK, "3")
    code, details = results["Echo garbage"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse as grpc.health.v1.HealthCheckRequest" in details
    code, details = results["Buggy"]
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details
    assert details == f"{METHOD}Buggy: internal server error (details in the server log)"
    assert results["Unimplemented"][0] == grpc.StatusCode.UNIMPLEMENTED
    assert results["Slow"][0] == grpc.StatusCode.DEADLINE_EXCEEDED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # only the bug is logged as an error, with its traceback; the late answer is a DEBUG line
    assert len(errors) == 1 and errors[0].exc_info and "Buggy" in errors[0].getMessage()
    assert any("ended before its answer" in r.getMessage() for r in caplog.records)


def test_throttled_warnings_count_what_they_leave_out(caplog):
    caplog.set_level(logging.WARNING, logger="throttle-test")
    throttled = Throttled(logging.getLogger("throttle-test"), interval_s=3600)
    for _ in range(5):
        throttled.warning("m", "refused")
    throttled.warning("other", "refused other")
    assert [r.getMessage() for r in caplog.records] == ["refused", "refused other"]
    throttled._last["m"] -= 7200  # as if the interval had passed
    throttled.warning("m", "refused")
    assert caplog.records[-1].getMessage() == "refused (4 more since the last such line)"
