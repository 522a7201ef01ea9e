"""Client against a real gRPC proxy on loopback that has no server behind it yet: it answers
NOT_FOUND, as Ray Serve's proxy does before its application is deployed."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest
from convserve.client import AsyncClient, Client, InferenceError
from convserve.proto import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


class Proxy:
    """Answers NOT_FOUND to every call until `deployed` is set, then as a ready server."""

    def __init__(self) -> None:
        self.deployed = threading.Event()
        self.calls = 0

    def _answer(self, response):
        def handle(request, context):
            self.calls += 1
            if not self.deployed.is_set():
                context.abort(grpc.StatusCode.NOT_FOUND, "Application metadata not set.")
            return response

        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(response, request_type):
            return grpc.unary_unary_rpc_method_handler(
                self._answer(response),
                request_deserializer=request_type.FromString,
                response_serializer=type(response).SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerReady": unary(pb.ServerReadyResponse(ready=True), pb.ServerReadyRequest),
                "ModelReady": unary(pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest),
                "ModelMetadata": unary(pb.ModelMetadataResponse(), pb.ModelMetadataRequest),
            },
        )


@pytest.fixture
def proxy():
    proxy = Proxy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((proxy.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield proxy, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_readiness_is_false_while_a_proxy_has_nothing_behind_it(proxy):
    proxy, target = proxy
    with Client(target, retries=0) as client:
        assert client.is_ready(timeout=5) is False
        assert client.is_ready("fashion_mnist", timeout=5) is False
        # Other calls keep the proxy's error: it is not a readiness question
        with pytest.raises(InferenceError) as info:
            client.metadata("fashion_mnist", timeout=5)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "Application metadata not set" in info.value.message
        with pytest.raises(InferenceError) as waited:
            client.wait_until_ready(timeout=0.5)
        assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        proxy.deployed.set()
        assert client.is_ready(timeout=5) and client.is_ready("fashion_mnist", timeout=5)


def test_waiting_for_readiness_lasts_until_the_proxy_has_a_server_behind_it(proxy):
    proxy, target = proxy
    threading.Timer(0.6, proxy.deployed.set).start()
    with Client(target, retries=0) as client:
        client.wait_until_ready(timeout=10)
    assert proxy.calls > 1  # it asked while the proxy answered NOT_FOUND, and went on asking

    proxy.deployed.clear()
    threading.Timer(0.6, proxy.deployed.set).start()

    async def wait() -> None:
        async with AsyncClient(target, retries=0) as client:
            await client.wait_until_ready("fashion_mnist", timeout=10)

    asyncio.run(wait())
    assert proxy.deployed.is_set()
