"""The no-op baseline of the throughput benchmark (loadtest/noop_server.py), on loopback.

It must answer like a model server for the load generator (a ModelInferResponse with the canned
probabilities, health SERVING), with --with-wrappers run convserve's real handler wrappers, so
that their cost is measured on the real code (a request that does not parse is refused there),
and with --thread-handoff answer through a worker thread.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_harness import free_port, server_env, wait_until

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = ROOT / "models" / "fashion_mnist" / "1" / "model.safetensors"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtest" / "noop_server.py"), "--port", str(port), *flags],
        env=server_env(),
        stdout=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"

    def serving() -> bool:
        assert proc.poll() is None, "the no-op server exited"
        with grpc.insecure_channel(target) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
            except grpc.RpcError:
                return False
        return status.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, 120, "the no-op server to serve")
    return proc, target


def request(images: np.ndarray) -> bytes:
    req = pb.ModelInferRequest(model_name="fashion_mnist")
    req.inputs.add(name="input", datatype="FP32", shape=images.shape)
    req.raw_input_contents.append(images.astype("<f4").tobytes())
    return req.SerializeToString()


@pytest.mark.timeout(300)
def test_answers_the_models_probabilities_for_its_image():
    from convserve.core import Model

    proc, target = start("--model-file", str(MODEL_FILE), "--seed", "3")
    try:
        image = np.random.default_rng(3).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                INFER, response_deserializer=pb.ModelInferResponse.FromString
            )
            answers = [call(request(image), timeout=10) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(30)
    expected = Model.load(MODEL_FILE).predict(image)
    for answer in answers:
        assert answer.model_name == "fashion_mnist" and answer.model_version == "1"
        assert list(answer.outputs[0].shape) == [1, 10]
        got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(1, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(300)
def test_with_wrappers_refuses_what_does_not_parse():
    proc, target = start("--with-wrappers")
    try:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                INFER, response_deserializer=pb.ModelInferResponse.FromString
            )
            ok = call(request(np.zeros((1, 28, 28, 1), np.uint8)), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\xff\xff\xff", timeout=10)
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(ok.raw_output_contents[0]) == 40  # 10 FP32 zeros without a model file
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse as inference.ModelInferRequest" in refused.value.details()


@pytest.mark.timeout(300)
def test_thread_handoff_answers_every_concurrent_call():
    proc, target = start("--thread-handoff", "--with-wrappers")
    try:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                INFER, response_deserializer=pb.ModelInferResponse.FromString
            )
            futures = [
                call.future(request(np.zeros((1, 28, 28, 1), np.uint8)), timeout=30)
                for _ in range(50)
            ]
            answers = [f.result() for f in futures]
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(answers) == 50
    assert all(len(a.raw_output_contents[0]) == 40 for a in answers)
