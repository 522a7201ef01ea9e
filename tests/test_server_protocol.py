"""The Open Inference Protocol as served by a real `convserve serve` on loopback."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb

from tests import server_harness as h


@pytest.fixture(scope="module")
def server():
    return h.main_server()


def test_health_live_ready_and_model_ready(api, server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert api.ServerLive(pb.ServerLiveRequest()).live
    assert api.ServerReady(pb.ServerReadyRequest()).ready
    assert api.ModelReady(pb.ModelReadyRequest(name="fashion")).ready
    assert api.ModelReady(pb.ModelReadyRequest(name="fashion", version="1")).ready
    assert not api.ModelReady(pb.ModelReadyRequest(name="fashion", version="7")).ready
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="inference.ModelInferRequest"
                ),
            ]
        )
        answers = list(stub.ServerReflectionInfo(requests, timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the proto can be fetched


def test_server_metadata_advertises_only_what_is_implemented(api):
    meta = api.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "convserve" and meta.version
    # written out independently of server/servicer.py, so a change there must be deliberate
    expected = "classification schedule_policy parameters model_configuration statistics"
    assert set(meta.extensions) == {*expected.split(), "model_repository"}


def test_model_metadata_has_batch_dimension(api):
    meta = api.ModelMetadata(pb.ModelMetadataRequest(name="fashion"))
    assert meta.name == "fashion" and list(meta.versions) == ["1", "2"]
    assert meta.platform == "convserve_numba"
    (inp,), (out,) = meta.inputs, meta.outputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("input", "UINT8", [-1, 28, 28, 1])
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [-1, 10])


def test_model_config_is_what_image_client_needs(api):
    config = api.ModelConfig(pb.ModelConfigRequest(name="lenet")).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "lenet",
        "convserve_numba",
        "convserve",
        64,
    )
    (inp,), (out,) = config.input, config.output
    assert inp.format == pb.ModelInput.FORMAT_NHWC and list(inp.dims) == [28, 28, 1]
    assert inp.data_type == pb.TYPE_UINT8 and inp.name == "input"
    assert out.data_type == pb.TYPE_FP32 and list(out.dims) == [10] and out.name == "probabilities"
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 0


def test_infer_uint8_raw_matches_the_core(api):
    x = h.images(5, seed=11)
    response = api.ModelInfer(h.infer_request("fashion", x, id="req-42"))
    assert (response.model_name, response.model_version, response.id) == ("fashion", "2", "req-42")
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [5, 10])
    assert len(response.raw_output_contents) == 1
    got = h.probabilities(response)
    np.testing.assert_allclose(got, h.local_model("fashion", 2).predict(x), rtol=1e-5, atol=1e-7)
    params = h.parameters(response)
    assert set(params) == {"queue_us", "compute_us", "batch_size"}
    assert params["batch_size"] >= 5 and params["compute_us"] > 0 and params["queue_us"] >= 0


def test_version_selection(api):
    x = h.images(2, seed=12)
    v1 = api.ModelInfer(h.infer_request("fashion", x, version="1"))
    latest = api.ModelInfer(h.infer_request("fashion", x))
    assert (v1.model_version, latest.model_version) == ("1", "2")
    np.testing.assert_allclose(
        h.probabilities(v1), h.local_model("fashion", 1).predict(x), rtol=1e-5, atol=1e-7
    )
    assert not np.allclose(h.probabilities(v1), h.probabilities(latest))


def test_fp32_and_typed_contents_give_the_same_answer(api):
    x = h.images(3, seed=13)
    raw_u8 = h.probabilities(api.ModelInfer(h.infer_request("fashion", x)))
    raw_f32 = h.probabilities(api.ModelInfer(h.infer_request("fashion", x.astype(np.float32))))
    typed = []
    for datatype, field, values in (
        ("UINT8", "uint_contents", x.ravel().tolist()),
        ("FP32", "fp32_contents", x.astype(np.float32).ravel().tolist()),
    ):
        req = pb.ModelInferRequest(model_name="fashion")
        tensor = req.inputs.add(name="input", datatype=datatype, shape=x.shape)
        getattr(tensor.contents, field).extend(values)
        typed.append(h.probabilities(api.ModelInfer(req)))
    expected = h.local_model("fashion", 2).predict(x)
    for got in (raw_u8, raw_f32, *typed):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def _classes(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def test_classification_extension(api):
    x = h.images(4, seed=14)
    req = h.infer_request("fashion", x, outputs=[("probabilities", 0), ("probabilities", 3)])
    response = api.ModelInfer(req)
    assert [o.datatype for o in response.outputs] == ["FP32", "BYTES"]
    assert list(response.outputs[1].shape) == [4, 3]
    probs = h.probabilities(response)
    strings = _classes(response.raw_output_contents[1])
    assert len(strings) == 12
    labels = h.local_model("fashion", 2).labels
    for row in range(4):
        order = np.argsort(-probs[row], kind="stable")[:3]
        for j, idx in enumerate(order):
            score, index, label = strings[row * 3 + j].decode().split(":", 2)
            assert int(index) == idx and label == labels[idx]
            assert score == f"{probs[row, idx]:f}"
    # k larger than the number of classes is clipped, as in Triton
    big = api.ModelInfer(h.infer_request("fashion", x[:1], outputs=[("probabilities", 50)]))
    assert list(big.outputs[0].shape) == [1, 10] and len(_classes(big.raw_output_contents[0])) == 10


def test_priority_and_timeout_parameters_are_accepted(api):
    x = h.images(1, seed=15)
    req = h.infer_request(
        "fashion", x, parameters={"priority": 1, "timeout": 10_000_000, "custom": "ignored"}
    )
    req.parameters["priority"].uint64_param = 2  # tritonclient sends priority as uint64
    response = api.ModelInfer(req)
    assert h.probabilities(response).shape == (1, 10)


def test_large_request_runs_in_chunks_in_order(api):
    x = h.images(150, seed=16)  # > --max-batch-size 64: three chunks (64, 64, 22)
    response = api.ModelInfer(h.infer_request("fashion", x))
    got = h.probabilities(response)
    assert got.shape == (150, 10)
    np.testing.assert_allclose(got, h.local_model("fashion", 2).predict(x), rtol=1e-5, atol=1e-7)
    assert h.parameters(response)["batch_size"] == 64


def test_model_statistics_and_repository_index(api):
    before = api.ModelStatistics(pb.ModelStatisticsRequest(name="lenet", version="1")).model_stats[
        0
    ]
    api.ModelInfer(h.infer_request("lenet", h.images(6, seed=17)))
    after = api.ModelStatistics(pb.ModelStatisticsRequest(name="lenet", version="1")).model_stats[0]
    assert (after.name, after.version) == ("lenet", "1")
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.execution_count > before.execution_count
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference > 0 and any(b.batch_size == 6 for b in after.batch_stats)
    every = api.ModelStatistics(pb.ModelStatisticsRequest())
    assert {(s.name, s.version) for s in every.model_stats} == {
        ("fashion", "1"),
        ("fashion", "2"),
        ("lenet", "1"),
    }
    index = api.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("fashion", "1", "READY"),
        ("fashion", "2", "READY"),
        ("lenet", "1", "READY"),
    }
