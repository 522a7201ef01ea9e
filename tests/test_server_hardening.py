"""Hostile input against a real server: undecodable bytes on every RPC (ours, health, reflection),
non-ASCII versions, hostile model files with --skip-bad-models, huge FP32 pixels, deadline races
and a version folder deleted while serving. Deliberate statuses only, never UNKNOWN, and no
traceback in the log for a client's mistake (docs/hardening.md)."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests import server_harness as h
from tests.hostile_models import absurd_architecture, model_bytes, raw_file

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
MODULES = {SERVICE: pb, HEALTH: health_pb2, REFLECTION: reflection_pb2}
METHODS = [(service, method) for service in MODULES for method in service.methods]

# Bytes that are not a valid encoding of most messages (each checked locally below).
GARBAGE = {
    "truncated varint": b"\xff",
    "length past the end": b"\x0a\x05abc",
    "invalid UTF-8 string": b"\x0a\x02\xc3\x28",
    "field number 0": b"\x00\x01",
    "wire type 7": b"\x0f",
    "tag without value": b"\x08",
    "random": bytes(np.random.default_rng(13).integers(0, 256, 4096, dtype=np.uint8)),
}
BAD_VERSIONS = ["²", "٣", "1" * 5000, "0", "-1", " 1", "1.0", "0x1"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-repo")
    for version in ("1", "2", "²", "٣"):
        h.write_model(root / "fashion" / version / "model.safetensors", "fashion_mnist", seed=1)
    bad = {
        "broken": raw_file({"__metadata__": 1}),
        "listmeta": raw_file({"__metadata__": ["x"]}),
        "deep": raw_file(b"[" * 100_000),
        "absurd": model_bytes(
            absurd_architecture(),
            {"layers.2.kernel": np.zeros((1, 1), np.float32), "layers.2.bias": np.zeros(1, "f4")},
        ),
    }
    for name, data in bad.items():
        path = root / name / "1" / "model.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    return root


@pytest.fixture(scope="module")
def server(repository):
    flags = ("--skip-bad-models", "true", "--max-batch-size", "8", "--warmup-batch-sizes", "1,8")
    with h.serving(repository, *flags, *h.quick_stop()) as server:
        yield server


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def api(channel):
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


def client_mistake_lines(log: str) -> list[str]:
    """Log lines at ERROR or above, and traceback lines, other than skipped bad models."""
    return [
        line
        for line in log.splitlines()
        if ("Traceback" in line or " ERROR " in line or "CRITICAL" in line)
        and "skipping model" not in line
    ]


def test_bad_model_files_are_skipped_and_listed_unavailable(server, api):
    index = {
        (m.name, m.version): m for m in api.RepositoryIndex(pb.RepositoryIndexRequest()).models
    }
    expected = {
        "broken": "'__metadata__' must be an object",
        "listmeta": "'__metadata__' must be an object",
        "deep": "nested too deeply",
        "absurd": "above the limit",
    }
    for name, fragment in expected.items():
        entry = index[(name, "1")]
        assert entry.state == "UNAVAILABLE" and fragment in entry.reason, entry
        assert f"model file {server.repository / name / '1'}" in entry.reason
        assert not api.ModelReady(pb.ModelReadyRequest(name=name)).ready
        assert f"skipping model '{name}' version 1: model file" in server.log()
    assert index[("fashion", "1")].state == "READY" and index[("fashion", "2")].state == "READY"
    assert {v for n, v in index if n == "fashion"} == {"1", "2"}  # '²' and '٣' are not versions
    assert "ignoring" in server.log() and "ASCII digits" in server.log()
    assert client_mistake_lines(server.log()) == []


@pytest.mark.parametrize(
    ("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS]
)
def test_undecodable_bytes_get_invalid_argument(channel, service, method):
    path = f"/{service.full_name}/{method.name}"
    message = getattr(MODULES[service], method.input_type.name)
    for label, data in GARBAGE.items():
        try:
            message.FromString(data)
            parses = True
        except DecodeError:
            parses = False
        if method.client_streaming:
            call = channel.stream_stream(path)
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter([data]), timeout=10))
            error = info.value
        elif method.server_streaming:
            call = channel.unary_stream(path)
            try:
                for _ in call(data, timeout=2):
                    pass
            except grpc.RpcError as exc:
                error = exc
        else:
            try:
                channel.unary_unary(path)(data, timeout=10)
                error = None
            except grpc.RpcError as exc:
                error = exc
        code = error.code() if error is not None else grpc.StatusCode.OK
        assert code != grpc.StatusCode.UNKNOWN, (label, error.details())
        if not parses and not (method.client_streaming and method.name == "ModelStreamInfer"):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (label, code)
            assert error.details() == (
                f"{path}: the request does not parse as {method.input_type.full_name}: "
                "expected a serialized protobuf message of that type"
            )


def test_stream_infer_refuses_without_unknown(channel):
    call = channel.stream_stream(f"/{SERVICE.full_name}/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\xff"]), timeout=10))
    assert info.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT)


def test_versions_must_be_ascii_digits_in_every_rpc(api):
    calls = {
        "ModelInfer": lambda v: api.ModelInfer(
            h.infer_request("fashion", h.images(1), version=v), timeout=10
        ),
        "ModelReady": lambda v: api.ModelReady(pb.ModelReadyRequest(name="fashion", version=v)),
        "ModelMetadata": lambda v: api.ModelMetadata(
            pb.ModelMetadataRequest(name="fashion", version=v)
        ),
        "ModelConfig": lambda v: api.ModelConfig(pb.ModelConfigRequest(name="fashion", version=v)),
        "ModelStatistics": lambda v: api.ModelStatistics(
            pb.ModelStatisticsRequest(name="fashion", version=v)
        ),
    }
    for name, call in calls.items():
        for version in BAD_VERSIONS:
            with pytest.raises(grpc.RpcError) as info:
                call(version)
            error = info.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, version)
            assert "ASCII digits 0-9" in error.details(), (name, error.details())
            assert len(error.details()) < 400  # the 5000-digit version is cut short
        assert call("1") is not None and call("") is not None


def test_client_mistakes_log_no_traceback_and_few_warnings(server, channel):
    path = f"/{SERVICE.full_name}/ModelInfer"
    for _ in range(50):
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(path)(b"\xff", timeout=10)
    log = server.log()
    assert client_mistake_lines(log) == []
    warnings = [line for line in log.splitlines() if "refused an undecodable request" in line]
    # at most one line per method per 10 s; this module sends garbage to ~20 methods
    assert 1 <= len(warnings) <= 3 * len(METHODS), warnings


def test_huge_fp32_pixels_fail_only_their_own_request(server, api):
    local = h.local_model_at(server.repository / "fashion" / "1" / "model.safetensors")
    normal = h.images(4, seed=21).astype(np.float32)
    huge = np.full((1, 28, 28, 1), 3.4e38, np.float32)
    assert np.isfinite(huge).all()

    def send(x):
        try:
            return h.probabilities(
                api.ModelInfer(h.infer_request("fashion", x, version="1"), timeout=30)
            )
        except grpc.RpcError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:  # huge and normal requests share batches
        results = list(pool.map(send, [huge if i % 2 else normal for i in range(24)]))
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, grpc.RpcError), result
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "has pixel values up to 3.4e+38" in result.details()
            assert "could overflow its float32 arithmetic" in result.details()
        else:
            assert not isinstance(result, grpc.RpcError), result.details()
            np.testing.assert_allclose(result, local.predict(normal), rtol=1e-4, atol=1e-6)


def test_deadline_races_are_counted_not_logged(server, api):
    def timeouts() -> float:
        text = server.metrics()
        return h.metric(text, "convserve_requests_total", version="2", outcome="timeout")

    before = timeouts()
    x = h.images(8, seed=3)
    futures = [
        api.ModelInfer.future(h.infer_request("fashion", x), timeout=0.001 * (1 + i % 60))
        for i in range(240)
    ]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    time.sleep(0.5)
    assert timeouts() - before >= 1  # (the client's own timer can fire before a request leaves)
    log = server.log()
    assert "ExecuteBatchError" not in log and client_mistake_lines(log) == []
    assert h.probabilities(api.ModelInfer(h.infer_request("fashion", x), timeout=30)).shape == (
        8,
        10,
    )


def test_deleted_version_is_reported_unavailable_and_still_answers(server, api):
    shutil.rmtree(server.repository / "fashion" / "2")
    index = {
        (m.name, m.version): m for m in api.RepositoryIndex(pb.RepositoryIndexRequest()).models
    }
    entry = index[("fashion", "2")]
    assert entry.state == "UNAVAILABLE" and "was removed after loading" in entry.reason
    assert index[("fashion", "1")].state == "READY"
    ready_only = api.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert ("fashion", "2") not in {(m.name, m.version) for m in ready_only}
    response = api.ModelInfer(h.infer_request("fashion", h.images(1), version="2"), timeout=30)
    assert h.probabilities(response).shape == (1, 10)


def run_to_exit(repository, *flags: str) -> tuple[int, str]:
    server = h.Server(repository, *flags, metrics=False)
    try:
        code = server.process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        server.stop()
        raise
    server.log_file.close()
    return code, server.log()


def test_bad_model_without_skip_exits_nonzero_with_one_line(tmp_path):
    path = tmp_path / "broken" / "1" / "model.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(raw_file({"__metadata__": ["x"]}))
    code, log = run_to_exit(tmp_path)
    assert code != 0
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and f"model file {path}: the safetensors '__metadata__'" in lines[0]
    assert "Traceback" not in log


def test_absurd_max_batch_size_is_refused_at_load(tmp_path):
    h.write_model(tmp_path / "lenet" / "1" / "model.safetensors", "lenet5", seed=4)
    code, log = run_to_exit(tmp_path, "--max-batch-size", "1000000000")
    assert code != 0 and "Traceback" not in log
    assert "batch of 1,000,000,000 images" in log and "lower --max-batch-size" in log


def test_long_client_strings_are_cut_in_messages(api):
    long = "x" * 100_000
    request = h.infer_request("fashion", h.images(1))
    request.inputs[0].name = long
    with pytest.raises(grpc.RpcError) as info:
        api.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'" + "x" * 80 + "...'" in info.value.details() and len(info.value.details()) < 400
    with pytest.raises(grpc.RpcError) as info:
        api.ModelInfer(h.infer_request(long, h.images(1)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) < 400


def test_limit_options_reach_the_core(tmp_path):
    h.write_model(tmp_path / "lenet" / "1" / "model.safetensors", "lenet5", seed=4)
    code, log = run_to_exit(tmp_path, "--max-parameters", "1000")
    assert code != 0 and "Traceback" not in log
    assert (
        "parameter count is 61,706, above the limit of 1,000 (raise it with --max-parameters)"
        in log
    )


def test_streaming_rpcs_still_work_through_the_raw_parser(channel):
    from grpc_health.v1 import health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")] * 2
    answers = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    assert len(answers) == 2
    names = {s.name for s in answers[0].list_services_response.service}
    assert {SERVICE.full_name, HEALTH.full_name} <= names


def test_output_requested_many_times_is_refused(api):
    request = h.infer_request("fashion", h.images(1), outputs=[("probabilities", 0)] * 1000)
    with pytest.raises(grpc.RpcError) as info:
        api.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested 1000 times; request it at most twice" in info.value.details()


def test_tokens_are_checked_before_the_bytes_are_parsed(tmp_path):
    h.write_model(tmp_path / "repo" / "lenet" / "1" / "model.safetensors", "lenet5", seed=4)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    server = h.Server(
        tmp_path / "repo",
        "--auth-token-file",
        str(tokens),
        "--allow-insecure-token",
        "true",
        "--warmup-batch-sizes",
        "1",
        metrics=False,
    )
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(f"/{SERVICE.full_name}/ModelInfer")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff", timeout=10, metadata=(("authorization", "Bearer s3cret-token"),))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse as inference.ModelInferRequest" in info.value.details()
    finally:
        server.stop()


def test_undecodable_requests_are_counted(server, channel):
    def counts() -> tuple[float, float]:
        text = server.metrics()
        refused = h.metric(
            text, "convserve_refusals_total", method="ModelInfer", reason="undecodable"
        )
        rejected = h.metric(text, "convserve_requests_total", model="", outcome="rejected")
        return refused, rejected

    before = counts()
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = counts()
    assert after[0] - before[0] == 3 and after[1] - before[1] == 3, (before, after)
