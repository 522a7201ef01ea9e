"""Structure-aware fuzzing (hypothesis) of every RPC against a real server on loopback.

Well-formed messages with hostile fields and mutated or random bytes, all sent raw. Every answer
must be a deliberate status with a one-line message free of Python exception text; afterwards
the server must still answer correctly and its log must hold no traceback.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import server_harness as h

SERVICE = "/inference.GRPCInferenceService/"
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
PYTHON_TEXT = ("Traceback", "Exception", "Error:", "<class ", 'File "')
FUZZ = settings(
    max_examples=600,
    deadline=None,
    database=None,
    derandomize=True,  # CI runs the same cases every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

names = st.sampled_from(
    ["fashion", "lenet", "", "nope", "Fashion", "fashion\0", "a" * 500]
) | st.text(max_size=20)
versions = st.sampled_from(["", "1", "2", "3", "0", "-1", "²", "٣", "1" * 30, " 1"]) | st.text(
    max_size=6
)
int64s = st.integers(-(2**63), 2**63 - 1)
rarely = st.integers(0, 3).map(lambda v: v == 3)  # hostile in about one example of four
uint64s = st.integers(0, 2**64 - 1)


@st.composite
def parameters(draw, keys) -> dict:
    chosen = draw(st.dictionaries(keys, st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5]), max_size=2))
    values = {}
    for key, kind in chosen.items():
        parameter = pb.InferParameter()
        if kind == 0:
            parameter.int64_param = draw(st.integers(-2, 100) | int64s)
        elif kind == 1:
            parameter.uint64_param = draw(uint64s)
        elif kind == 2:
            parameter.string_param = draw(st.text(max_size=10))
        elif kind == 3:
            parameter.bool_param = draw(st.booleans())
        elif kind == 4:
            parameter.double_param = draw(st.floats(allow_nan=True))
        values[key] = parameter
    return values


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    """Mostly near-valid requests for the served models, each with a few hostile fields."""
    model = draw(st.sampled_from(["fashion", "lenet"]))
    request = pb.ModelInferRequest(model_name=model)
    if draw(rarely):
        request.model_name = draw(names)
    if draw(rarely):
        request.model_version = draw(versions)
    request.id = draw(st.text(max_size=30))
    n = draw(st.sampled_from([1, 2, 3]))
    datatype = draw(st.sampled_from(["UINT8", "FP32"] * 4 + ["INT8", "BYTES", ""]))
    shape = [n, 28, 28, 1]
    if draw(rarely):
        shape = draw(st.lists(int64s, max_size=5))
    for _ in range(draw(st.sampled_from([1] * 8 + [0, 2]))):
        name = draw(st.sampled_from(["input"] * 8 + ["INPUT", "", "probabilities"]))
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = n * 784
    layout = draw(st.integers(0, 5))
    if layout <= 2:  # raw bytes of the right or a wrong size
        itemsize = 4 if datatype == "FP32" else 1
        size = count * itemsize + draw(st.sampled_from([0] * 8 + [-1, 1, -count]))
        if datatype == "FP32":
            value = draw(
                st.sampled_from(
                    [1.0, 255.0, 0.5, 1e-45, 3.4e38, -3.4e38, float("nan"), float("inf")]
                )
            )
            data = np.full(max(size, 0) // 4, value, "<f4").tobytes() + b"\0" * (max(size, 0) % 4)
        else:
            data = bytes([draw(st.integers(0, 255))]) * max(size, 0)
        request.raw_input_contents.append(data)
        if draw(rarely):
            request.raw_input_contents.append(draw(st.binary(max_size=8)))
    elif layout == 3 and request.inputs:  # typed contents
        contents = request.inputs[0].contents
        size = count + draw(st.sampled_from([0, 0, 1, -1]))
        if datatype == "FP32":
            contents.fp32_contents.extend([draw(st.floats(width=32))] * max(size, 0))
        else:
            contents.uint_contents.extend([draw(st.integers(0, 2**32 - 1))] * max(size, 0))
        if draw(rarely):
            contents.int_contents.append(1)
    for key, value in draw(
        parameters(st.sampled_from(["priority", "timeout", "sequence_id", "shared_memory_x", "k"]))
    ).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["probabilities", "", "x"])))
        for key, value in draw(
            parameters(st.sampled_from(["classification", "shared_memory_region", "y"]))
        ).items():
            output.parameters[key].CopyFrom(value)
    return request


def valid_bytes(model: str, n: int) -> bytes:
    shape = (n, 28, 28, 1)
    return h.infer_request(model, h.images(n, shape=shape[1:])).SerializeToString()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(
        valid_bytes(draw(st.sampled_from(["fashion", "lenet"])), draw(st.integers(1, 2)))
    )
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        op = draw(st.integers(0, 4))
        if op == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            del data[at:]
        elif op == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == 3:
            data[at : at + 1] = b"\xff" * draw(st.integers(1, 11))
        else:
            data += data[at : at + 64]
    return bytes(data)


@pytest.fixture(scope="module")
def server():
    return h.main_server()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def call(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        return grpc.StatusCode.OK, "", channel.unary_unary(method)(data, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""


def check(code: grpc.StatusCode, details: str) -> None:
    event(code.name)  # the status mix, shown by pytest --hypothesis-show-statistics
    assert code in DELIBERATE, (code, details)
    assert "\n" not in details and len(details) < 1000, details
    assert not any(text in details for text in PYTHON_TEXT), details


@FUZZ
@given(request=infer_requests())
def test_fuzz_infer_requests(channel, request):
    code, details, answer = call(channel, SERVICE + "ModelInfer", request.SerializeToString())
    check(code, details)
    if code == grpc.StatusCode.OK:
        response = pb.ModelInferResponse.FromString(answer)
        n = request.inputs[0].shape[0]
        assert response.outputs and all(o.shape[0] == n for o in response.outputs)
        for output, raw in zip(response.outputs, response.raw_output_contents):
            if output.datatype == "FP32":
                assert np.isfinite(np.frombuffer(raw, "<f4")).all()


@FUZZ
@given(data=mutated())
def test_fuzz_mutated_infer_bytes(channel, data):
    check(*call(channel, SERVICE + "ModelInfer", data)[:2])


OTHER = ["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"]


@settings(FUZZ, max_examples=400)
@given(
    method=st.sampled_from([*OTHER, "RepositoryIndex", "ServerMetadata", "ServerLive", "Check"]),
    name=names,
    version=versions,
    garbage=st.none() | st.binary(max_size=64),
)
def test_fuzz_other_rpcs(channel, method, name, version, garbage):
    if method in OTHER:
        message = getattr(pb, f"{method}Request")(name=name, version=version)
    elif method == "RepositoryIndex":
        message = pb.RepositoryIndexRequest(repository_name=name, ready=bool(version))
    elif method == "Check":
        message = health_pb2.HealthCheckRequest(service=name)
    else:
        message = getattr(pb, f"{method}Request")()
    path = "/grpc.health.v1.Health/Check" if method == "Check" else SERVICE + method
    check(*call(channel, path, message.SerializeToString() if garbage is None else garbage)[:2])


def test_server_is_well_after_fuzzing(server, channel):
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    api = pb_grpc.GRPCInferenceServiceStub(channel)
    x = h.images(3, seed=5)
    got = h.probabilities(api.ModelInfer(h.infer_request("fashion", x, version="1"), timeout=30))
    np.testing.assert_allclose(got, h.local_model("fashion", 1).predict(x), rtol=1e-4, atol=1e-6)
    assert "Traceback" not in server.log() and " ERROR " not in server.log()


def test_fuzz_script_short_run_prints_the_table(server):
    """loadtest/fuzz.py, the on-demand fuzzer, in a short run against the same server."""
    import importlib.util

    path = h.ROOT / "loadtest" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("convserve_loadtest_fuzz", path)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    lines: list[str] = []
    assert fuzz.run(server.target, 400, 8, seed=2, report=lines.append) == 0, lines
    header = next(line for line in lines if line.startswith("call "))
    assert "INVALID_ARGUMENT" in header and "OK" in header
    total = next(line for line in lines if line.startswith("all "))
    assert int(total.split()[-1]) == 400
    assert any("failures: 0; server healthy afterwards: True" in line for line in lines)
