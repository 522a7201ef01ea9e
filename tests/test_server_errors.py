"""Errors as Triton answers them (docs/protocol.md, Errors): status code, message prefix, expected vs received."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb

from tests import server_harness as h


@pytest.fixture(scope="module")
def server():
    return h.main_server()


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def expect(api, request, code: grpc.StatusCode, *fragments: str) -> str:
    error = rpc_error(api.ModelInfer, request)
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()
    return error.details()


def test_unknown_model(api):
    expect(
        api,
        h.infer_request("nope", h.images(1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Request for unknown model: 'nope' is not found",
        "'fashion'",
        "'lenet'",
    )
    error = rpc_error(api.ModelReady, pb.ModelReadyRequest(name="nope"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(api.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "'nope' is not found" in error.details()
    )


def test_unknown_version(api):
    expect(
        api,
        h.infer_request("fashion", h.images(1), version="9"),
        grpc.StatusCode.NOT_FOUND,
        "'fashion' version 9 is not found",
        "available versions: 1, 2",
    )
    expect(
        api,
        h.infer_request("fashion", h.images(1), version="latest"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "failed to parse model version 'latest'",
    )
    error = rpc_error(api.ModelConfig, pb.ModelConfigRequest(name="lenet", version="3"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_wrong_datatype(api):
    x = h.images(1).astype(np.int32)
    expect(
        api,
        h.infer_request("fashion", x, datatype="INT32"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inference input 'input' data-type is 'INT32', but model 'fashion' expects 'UINT8' or 'FP32'",
    )


def test_wrong_shape_names_expected_and_received(api):
    x = h.images(1)[0]  # [28,28,1]: the batch dimension is missing
    details = expect(
        api,
        h.infer_request("fashion", x),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected shape for input 'input' for model 'fashion'. Expected [-1,28,28,1], got [28,28,1]",
    )
    assert "[1,28,28,1]" in details  # the hint says what to send
    expect(
        api,
        h.infer_request("fashion", h.images(2, shape=(32, 32, 3))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expected [-1,28,28,1], got [2,32,32,3]",
    )
    req = h.infer_request("fashion", h.images(1))
    req.inputs[0].shape[0] = 0
    req.raw_input_contents[0] = b""
    expect(api, req, grpc.StatusCode.INVALID_ARGUMENT, "got [0,28,28,1]", "at least 1")


def test_byte_size_mismatch(api):
    req = h.infer_request("fashion", h.images(2))
    req.raw_input_contents[0] = req.raw_input_contents[0][:-1]
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "input byte size mismatch for input 'input' for model 'fashion'. Expected 1568, got 1567",
    )
    req = h.infer_request("fashion", h.images(2).astype(np.float32))
    req.raw_input_contents[0] += b"\0\0\0\0"
    expect(api, req, grpc.StatusCode.INVALID_ARGUMENT, "Expected 6272, got 6276", "FP32")


def test_batch_too_big(api):
    x = h.images(1001)  # --max-request-images 1000
    expect(
        api,
        h.infer_request("fashion", x),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inference request batch-size must be <= 1000 for 'fashion', got 1001",
    )


def test_missing_extra_and_misnamed_inputs(api):
    req = pb.ModelInferRequest(model_name="fashion")
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 1 inputs but got 0 inputs for model 'fashion'",
        "'input' (UINT8 or FP32, shape [-1,28,28,1])",
    )
    req = h.infer_request("fashion", h.images(1))
    req.inputs.add(name="extra", datatype="UINT8", shape=[1])
    req.raw_input_contents.append(b"\0")
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 1 inputs but got 2 inputs",
        "['input', 'extra']",
    )
    req = h.infer_request("fashion", h.images(1))
    req.inputs[0].name = "image"
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected inference input 'image' for model 'fashion'",
        "only input is 'input'",
    )


def test_missing_data_and_raw_with_contents(api):
    req = h.infer_request("fashion", h.images(1))
    del req.raw_input_contents[:]
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "unable to find data for input tensor 'input' for model 'fashion' in request",
    )
    req = h.infer_request("fashion", h.images(1))
    req.inputs[0].contents.uint_contents.extend([0] * 784)
    expect(
        api,
        req,
        grpc.StatusCode.INVALID_ARGUMENT,
        "contents field must not be specified when using raw_input_contents for 'input' for model 'fashion'",
    )


@pytest.mark.parametrize(
    "datatype,field,values,fragments",
    [
        ("UINT8", "uint_contents", [1] * 700, ["Expected 784 in contents.uint_contents, got 700"]),
        ("UINT8", "uint_contents", [1] * 700 + [300] * 84, ["UINT8 values above 255"]),
        (
            "FP32",
            "int_contents",
            [1] * 784,
            ["values go in contents.fp32_contents", "int_contents"],
        ),
    ],
)
def test_typed_contents_checked(api, datatype, field, values, fragments):
    req = pb.ModelInferRequest(model_name="fashion")
    tensor = req.inputs.add(name="input", datatype=datatype, shape=[1, 28, 28, 1])
    getattr(tensor.contents, field).extend(values)
    expect(api, req, grpc.StatusCode.INVALID_ARGUMENT, *fragments)


def test_nan_input_refused_before_batching(api):
    x = h.images(2).astype(np.float32)
    x[1, 3, 3, 0] = np.nan
    expect(
        api, h.infer_request("fashion", x), grpc.StatusCode.INVALID_ARGUMENT, "contains NaN or Inf"
    )


def test_bad_outputs_and_parameters(api):
    x = h.images(1)
    expect(
        api,
        h.infer_request("fashion", x, outputs=[("logits", 0)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected inference output 'logits' for model 'fashion'",
        "'probabilities' (FP32, shape [-1,10])",
    )
    expect(
        api,
        h.infer_request("fashion", x, outputs=[("probabilities", -2)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'classification'",
        "must be >= 1",
        "got -2",
    )
    expect(
        api,
        h.infer_request("fashion", x, parameters={"sequence_id": 5}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'sequence_id'",
        "not a sequence",
    )
    expect(
        api,
        h.infer_request("fashion", x, parameters={"priority": "high"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'priority'",
        "int64 or uint64",
        "string_param",
    )
    expect(
        api,
        h.infer_request("fashion", x, parameters={"timeout": -5}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'timeout'",
        "got -5",
    )
    expect(
        api,
        h.infer_request("fashion", x, parameters={"priority": -1}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameter 'priority' for model 'fashion' must be >= 0 (1 is highest, 0 the default), got -1",
    )
    req = h.infer_request("fashion", x, outputs=[("probabilities", 0)])
    req.outputs[0].parameters["shared_memory_region"].string_param = "region0"
    expect(api, req, grpc.StatusCode.UNIMPLEMENTED, "shared memory is not supported")


def test_message_over_the_limit_is_resource_exhausted(api):
    x = h.images(1000).astype(np.float32)  # 3.1 MB > --max-message-bytes 3,000,000
    error = rpc_error(api.ModelInfer, h.infer_request("fashion", x))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


@pytest.mark.parametrize(
    "rpc,request_type",
    [
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest),
        ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest),
        ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest),
        ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest),
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest),
        ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest),
        ("TraceSetting", pb.TraceSettingRequest),
        ("LogSettings", pb.LogSettingsRequest),
    ],
)
def test_unserved_rpcs_are_unimplemented(api, rpc, request_type):
    error = rpc_error(getattr(api, rpc), request_type())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rpc in error.details() and "ModelInfer" in error.details()


@pytest.mark.parametrize(
    "rpc,request_type",
    [
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest),
    ],
)
def test_load_and_unload_need_explicit_mode(api, rpc, request_type):
    error = rpc_error(getattr(api, rpc), request_type(model_name="fashion"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'none'" in error.details() and "--model-control-mode explicit" in error.details()
    assert "\n" not in error.details()
    assert api.ModelReady(pb.ModelReadyRequest(name="fashion"), timeout=10).ready


def test_errors_are_counted_by_outcome(server, api):
    def invalid_count() -> float:
        for line in server.metrics().splitlines():
            if line.startswith(
                'convserve_requests_total{model="fashion",outcome="invalid",version="2"}'
            ):
                return float(line.split()[-1])
        return 0.0

    before = invalid_count()
    rpc_error(api.ModelInfer, h.infer_request("fashion", h.images(1), datatype="FP32"))
    assert invalid_count() == before + 1
