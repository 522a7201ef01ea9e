"""Real `convserve serve` subprocesses for the server tests (not a test module).

Servers are started once per test session (cached here, stopped at exit) so that the server
test modules share them: `main_server()` (fashion v1 + v2, lenet; dynamic batching, small
message limit) and `slow_server()` (--max-batch-size 1, --max-queue-size 4, for queue limits).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_MESSAGE_BYTES = 3_000_000  # small, so the RESOURCE_EXHAUSTED test needs only ~3 MB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    """Call `check()` until it returns something true (returned); fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def server_env() -> dict[str, str]:
    env = dict(
        os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    )
    for key in [k for k in env if k.startswith("CONVSERVE_")]:
        env.pop(key)
    return env


def write_model(path: Path, preset_name: str, seed: int, name: str | None = None) -> Path:
    from convserve.core import Model
    from convserve.core.presets import preset

    from tests.conftest import random_weights

    document = preset(preset_name)
    if name:
        document["name"] = name
    Model(document, random_weights(document, seed=seed)).save(path)
    return path


def make_repository(root: Path) -> Path:
    write_model(
        root / "fashion" / "1" / "model.safetensors", "fashion_mnist", seed=1, name="fashion"
    )
    write_model(
        root / "fashion" / "2" / "model.safetensors", "fashion_mnist", seed=2, name="fashion"
    )
    write_model(root / "lenet" / "1" / "model.safetensors", "lenet5", seed=3, name="lenet")
    return root


# Server logs and test repositories live in one folder per test session, removed when the session ends.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="convserve-tests-"))
atexit.register(
    shutil.rmtree, _SESSION_DIR, ignore_errors=True
)  # registered first, so it runs after _stop_all


class Server:
    """A `convserve serve` subprocess on free 127.0.0.1 ports, logging to a file."""

    def __init__(
        self,
        repository: Path,
        *flags: str,
        metrics: bool = True,
        env: dict | None = None,
        port: int | None = None,
        log_dir: Path | None = None,
        host: str = "127.0.0.1",
    ):
        self.repository = repository
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics else 0
        self.target = f"{host}:{self.port}"
        self.log_path = Path(
            tempfile.mkstemp(
                prefix=f"convserve-{self.port}-", suffix=".log", dir=log_dir or _SESSION_DIR
            )[1]
        )
        command = [
            sys.executable,
            "-m",
            "convserve",
            "serve",
            "--host",
            host,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--model-repository",
            str(repository),
            *flags,
        ]
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env or server_env()
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> Server:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}:\n{self.log()}"
                    )
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as response:
            return response.read().decode()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_file.close()
        return self.process.returncode


_started: list[Server] = []


@atexit.register
def _stop_all() -> None:
    for server in _started:
        server.stop()


@cache
def repository() -> Path:
    return make_repository(Path(tempfile.mkdtemp(prefix="repo-", dir=_SESSION_DIR)))


def quick_stop(grace_seconds: int = 10) -> tuple[str, ...]:
    """Shutdown flags for test servers: no drain wait, and a bounded grace period."""
    return ("--drain-seconds", "0", "--grace-period", str(grace_seconds))


@contextlib.contextmanager
def serving(repository: Path, *flags: str, **options):
    """A server on `repository`, ready inside the block and stopped when it ends."""
    server = Server(repository, *flags, **options)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _shared_server(*flags: str) -> Server:
    """A server on the session's repository, ready, and stopped when the session ends."""
    server = Server(repository(), *flags, *quick_stop())
    _started.append(server)
    return server.wait_ready()


@cache
def main_server() -> Server:
    return _shared_server(
        "--max-batch-size",
        "64",
        "--max-request-images",
        "1000",
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--warmup-batch-sizes",
        "1,64",
    )


@cache
def slow_server() -> Server:
    """One image per execution and at most 4 queued requests: queues fill up quickly. The
    built-in kernel choice (no planning) keeps its speed the same from run to run."""
    return _shared_server(
        "--max-batch-size",
        "1",
        "--max-queue-size",
        "4",
        "--warmup-batch-sizes",
        "1",
        "--plan-kernels",
        "false",
    )


@cache
def local_model(name: str, version: int):
    """The same model the server loaded, in this process (for expected outputs)."""
    from convserve.core import Model

    return Model.load(repository() / name / str(version) / "model.safetensors")


def images(n: int, seed: int = 0, shape=(28, 28, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def stub(target: str):
    import grpc
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 1 << 28),
            ("grpc.max_receive_message_length", 1 << 28),
        ],
    )
    return pb_grpc.GRPCInferenceServiceStub(channel), channel


def infer_request(
    model: str,
    x: np.ndarray,
    *,
    datatype: str | None = None,
    version: str = "",
    id: str = "",
    outputs=None,
    parameters: dict | None = None,
):
    """A ModelInferRequest with raw contents (datatype from x's dtype unless given)."""
    from convserve.proto import grpc_service_pb2 as pb

    datatype = datatype or {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[x.dtype]
    req = pb.ModelInferRequest(model_name=model, model_version=version, id=id)
    req.inputs.add(name="input", datatype=datatype, shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    for name, k in outputs or ():
        out = req.outputs.add(name=name)
        if k:
            out.parameters["classification"].int64_param = k
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            req.parameters[key].bool_param = value
        elif isinstance(value, int):
            req.parameters[key].int64_param = value
        else:
            req.parameters[key].string_param = str(value)
    return req


def probabilities(response) -> np.ndarray:
    index = [o.name for o in response.outputs].index("probabilities")
    shape = tuple(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


def parameters(response) -> dict[str, int]:
    return {k: v.int64_param for k, v in response.parameters.items()}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0.0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            if head.split("{")[0] == name:
                return float(value)
    return 0.0


def local_model_at(path: Path):
    from convserve.core import Model

    return Model.load(path)
