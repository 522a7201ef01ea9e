"""convserve on Ray Serve, for real: a local Ray cluster (2 CPUs) deploys a repository of two
models (2 replicas each, behind the ingress) with Ray Serve's gRPC proxy in front, next to a
`convserve serve` of the same repository.

Checks: tritonclient inference through Ray matches `Model.predict`; every RPC and every bad
request answers exactly as the direct server does (status and message); a replica killed under
load is restarted by Ray and our Client, retrying, sees no failed call; throughput with 1 and 2
replicas (printed, not asserted: the machine is shared). Skipped only without the `ray` extra.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip(
    "ray.serve", reason="the `ray` extra is not installed (pip install 'convserve[ray]')"
)

from convserve.proto import grpc_service_pb2 as pb  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests import server_harness as h  # noqa: E402

MODEL = "fashion"
LOAD_THREADS = 4


def make_settings(repository: Path, replicas: int, grpc_port: int):
    from convserve.ray.settings import resolve

    flags = dict(
        model_repository=str(repository),
        grpc_port=grpc_port,
        http_port=h.free_port(),
        min_replicas=replicas,
        max_replicas=replicas,
        num_cpus=2,
        replica_cpus=0.5,  # 2 models x 2 replicas on 2 CPUs
        instances=1,
        max_request_images=1000,
        max_message_bytes=h.MAX_MESSAGE_BYTES,
        warmup_batch_sizes=(1, 64),
    )
    return resolve(flags=flags, environ={})


def running_replicas() -> int:
    from ray import serve

    from convserve.ray.serving import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    deployment = app and app.deployments.get(f"model_{MODEL}")
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def replica_pids(calls: int = 24) -> set[int]:
    """Process ids of the model's replicas that answer (Serve spreads calls over them)."""
    from ray import serve

    from convserve.ray.serving import APP_NAME

    handle = serve.get_deployment_handle(f"model_{MODEL}", APP_NAME)
    pids = set()
    for response in [handle.pid.remote() for _ in range(calls)]:
        try:
            pids.add(response.result(timeout_s=10))
        except Exception:  # noqa: BLE001 - a replica that just died
            pass
    return pids


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def server_ready(target: str) -> bool:
    stub, channel = h.stub(target)
    try:
        return stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    except grpc.RpcError:
        return False
    finally:
        channel.close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-repo")
    for version, seed in ((1, 1), (2, 2)):
        h.write_model(
            root / MODEL / str(version) / "model.safetensors", "fashion_mnist", seed, MODEL
        )
    # a second model: calls go through the ingress that routes to each model's deployment
    h.write_model(root / "lenet" / "1" / "model.safetensors", "lenet5", 3, "lenet")
    return root


@pytest.fixture(scope="module")
def ray_app(repository):
    """The application on a local 2-CPU Ray cluster with 2 replicas; always shut down."""
    import ray
    from ray import serve

    from convserve.ray.serving import MESSAGE_SIZE_ENV, start

    os.environ.setdefault("NUMBA_CACHE_DIR", str(h.ROOT / ".numba_cache"))
    saved = os.environ.get(MESSAGE_SIZE_ENV)
    settings = make_settings(repository, 2, h.free_port())
    target = f"127.0.0.1:{settings.grpc_port}"
    try:
        start(settings)
        wait_for(lambda: server_ready(target), 180, "ServerReady through Ray's proxy")
        yield settings, target
    finally:
        if ray.is_initialized():  # serve.shutdown() would otherwise look for a cluster to join
            serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop(MESSAGE_SIZE_ENV, None)
        else:
            os.environ[MESSAGE_SIZE_ENV] = saved


@pytest.fixture(scope="module")
def direct(repository):
    flags = ("--max-request-images", "1000", "--max-message-bytes", str(h.MAX_MESSAGE_BYTES))
    with h.serving(
        repository, *flags, "--warmup-batch-sizes", "1,64", *h.quick_stop(), metrics=False
    ) as server:
        yield server


def test_tritonclient_through_ray_matches_model_predict(ray_app, repository):
    import tritonclient.grpc as triton
    from convserve.core import Model

    _, target = ray_app
    client = triton.InferenceServerClient(target)
    assert client.is_server_live() and client.is_server_ready()
    x = np.random.default_rng(5).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    for version in ("1", "2"):
        assert client.is_model_ready(MODEL, version)
        tensor = triton.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor], model_version=version)
        expected = Model.load(repository / MODEL / version / "model.safetensors").predict(x)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-7)
    metadata = client.get_model_metadata(MODEL)
    assert list(metadata.versions) == ["1", "2"] and metadata.inputs[0].shape == [-1, 28, 28, 1]
    assert client.get_model_config(MODEL).config.max_batch_size == 64
    client.close()


def test_our_client_and_health_through_ray(ray_app):
    from convserve.client import Client

    _, target = ray_app
    x = np.random.default_rng(6).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    with Client(target) as client:
        assert client.models() == sorted([MODEL, "lenet"])
        assert client.predict(x, MODEL).shape == (3, 10)
        assert client.predict(x, "lenet").shape == (3, 10)
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_stream_infer_is_unimplemented_through_ray(ray_app):
    _, target = ray_app
    stub, channel = h.stub(target)
    request = h.infer_request(MODEL, np.zeros((1, 28, 28, 1), np.uint8))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ModelStreamInfer(iter([request]), timeout=30))
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value.details()


def bad_requests() -> dict[str, tuple[str, object]]:
    """RPC name and request of calls that fail, and of answers compared field by field."""
    x = np.zeros((1, 28, 28, 1), np.uint8)
    nan = np.full((1, 28, 28, 1), np.nan, np.float32)
    short = h.infer_request(MODEL, x)
    short.raw_input_contents[0] = b"\0" * 5
    typed = h.infer_request(MODEL, x)
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.uint_contents.extend([300] * 784)
    return {
        "unknown model": ("ModelInfer", h.infer_request("nope", x)),
        "unknown version": ("ModelInfer", h.infer_request(MODEL, x, version="9")),
        "bad version": ("ModelInfer", h.infer_request(MODEL, x, version="v1")),
        "3-d shape": ("ModelInfer", h.infer_request(MODEL, x[0])),
        "datatype": ("ModelInfer", h.infer_request(MODEL, x.astype(np.int16), datatype="INT16")),
        "byte size": ("ModelInfer", short),
        "too many images": (
            "ModelInfer",
            h.infer_request(MODEL, np.zeros((1001, 28, 28, 1), np.uint8)),
        ),
        "typed contents": ("ModelInfer", typed),
        "NaN": ("ModelInfer", h.infer_request(MODEL, nan)),
        "output": ("ModelInfer", h.infer_request(MODEL, x, outputs=[("logits", 0)])),
        "sequence": ("ModelInfer", h.infer_request(MODEL, x, parameters={"sequence_id": 3})),
        "over the message limit": (
            "ModelInfer",
            h.infer_request(MODEL, np.zeros((1000, 28, 28, 1), np.float32)),
        ),
        "metadata of unknown model": ("ModelMetadata", pb.ModelMetadataRequest(name="nope")),
        "config of unknown version": (
            "ModelConfig",
            pb.ModelConfigRequest(name=MODEL, version="3"),
        ),
        "unserved RPC": ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest()),
        # answers, not errors
        "model ready v2": ("ModelReady", pb.ModelReadyRequest(name=MODEL, version="2")),
        "model ready v3": ("ModelReady", pb.ModelReadyRequest(name=MODEL, version="3")),
        "metadata": ("ModelMetadata", pb.ModelMetadataRequest(name=MODEL)),
        "config": ("ModelConfig", pb.ModelConfigRequest(name=MODEL, version="1")),
        "server metadata": ("ServerMetadata", pb.ServerMetadataRequest()),
        "index": ("RepositoryIndex", pb.RepositoryIndexRequest()),
        "classification": (
            "ModelInfer",
            h.infer_request(MODEL, x, outputs=[("probabilities", 3)], id="r7"),
        ),
    }


def answer(target: str, method: str, request) -> tuple:
    """(status code, details, response without timing parameters) of one call."""
    stub, channel = h.stub(target)
    try:
        response = getattr(stub, method)(request, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details(), None
    finally:
        channel.close()
    if method == "ModelInfer":
        for key in ("queue_us", "compute_us", "batch_size"):
            del response.parameters[key]
    return grpc.StatusCode.OK, "", response


def test_every_call_answers_as_the_direct_server(ray_app, direct):
    _, target = ray_app
    for case, (method, request) in bad_requests().items():
        through_ray = answer(target, method, request)
        assert through_ray == answer(direct.target, method, request), case
    assert answer(target, *bad_requests()["unknown model"])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert answer(target, *bad_requests()["over the message limit"])[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


class Load:
    """LOAD_THREADS threads calling Client.predict (with retries) until stopped."""

    def __init__(self, target: str, images: int):
        from convserve.client import Client
        from convserve.client.retry import RetryPolicy

        policy = RetryPolicy(attempts=12, initial_backoff=0.1, max_backoff=1.0)
        self.client = Client(target, retries=policy, timeout=60)
        self.x = np.random.default_rng(7).integers(0, 256, (images, 28, 28, 1), dtype=np.uint8)
        self.calls = self.failures = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(LOAD_THREADS)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.predict(self.x, MODEL)
                ok = True
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok = False
                self.errors.append(f"{type(exc).__name__}: {exc}")
            with self.lock:
                self.calls += ok
                self.failures += not ok

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        self.client.close()

    def rate(self, seconds: float) -> float:
        """Images per second over the next `seconds`."""
        before, t0 = self.calls, time.perf_counter()
        time.sleep(seconds)
        return (self.calls - before) * self.x.shape[0] / (time.perf_counter() - t0)


def test_killed_replica_is_restarted_and_no_call_fails(ray_app):
    _, target = ray_app
    before = wait_for(lambda: len(pids := replica_pids()) == 2 and pids, 60, "2 replicas")
    victim_pid = min(before)
    with Load(target, images=8) as load:
        time.sleep(1.0)
        os.kill(victim_pid, signal.SIGKILL)
        after = wait_for(
            lambda: running_replicas() == 2 and len(now := replica_pids()) == 2 and now,
            120,
            "Ray to restart the killed replica",
        )
        served_before = load.calls
        time.sleep(1.0)
    print(
        f"\nreplica pid {victim_pid} killed; Ray restarted it as pid(s) "
        f"{sorted(after - before)}; {load.calls} calls, "
        f"{load.failures} failed"
    )
    assert victim_pid not in after
    assert load.failures == 0, load.errors[:3]
    assert load.calls > served_before > 0


def test_two_replicas_serve_more_than_one(ray_app, repository):
    from ray import serve

    from convserve.ray.serving import APP_NAME, build

    settings, target = ray_app
    rates = {}
    for replicas in (1, 2):
        serve.run(build(make_settings(repository, replicas, settings.grpc_port)), name=APP_NAME)
        wait_for(
            lambda n=replicas: running_replicas() == n and len(replica_pids()) == n,
            120,
            f"{replicas} replica(s)",
        )
        with Load(target, images=64) as load:
            time.sleep(1.0)  # ramp up
            rates[replicas] = load.rate(4.0)
        assert load.failures == 0, load.errors[:3]
    print(
        f"\nthroughput through Ray Serve, 64-image requests, {LOAD_THREADS} client threads on "
        f"the same 2 shared cores: 1 replica {rates[1]:.0f} img/s, 2 replicas {rates[2]:.0f} "
        f"img/s ({rates[2] / rates[1]:.2f}x)"
    )
    assert rates[1] > 0 and rates[2] > 0
