"""`convserve serve --workers N`: worker processes sharing one port, metrics summed over them,
signals forwarded, a dead worker taking the server down (real processes on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import server_harness as h


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _start_workers(count: int) -> h.Server:
    server = h.Server(
        h.repository(),
        "--workers",
        str(count),
        "--warmup-batch-sizes",
        "1",
        "--drain-seconds",
        "0.5",
        "--grace-period",
        "10",
    )
    deadline = time.monotonic() + 240
    while len(_children(server.process.pid)) < count:
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    # a fresh channel lands on any worker: wait until ten in a row find one SERVING
    ready = 0
    while ready < 10:
        assert time.monotonic() < deadline, server.log()
        with grpc.insecure_channel(server.target) as channel:
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=2)
                    .status
                )
            except grpc.RpcError:
                status = None
        ready = ready + 1 if status == health_pb2.HealthCheckResponse.SERVING else 0
        time.sleep(0.05)
    return server


def test_fixed_port_is_required():
    env = h.server_env()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convserve",
            "serve",
            "--workers",
            "2",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-repository",
            str(h.repository()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "--workers 2 needs a fixed --port" in result.stderr


def test_workers_share_the_port_sum_metrics_and_drain():
    server = _start_workers(2)
    try:
        workers = _children(server.process.pid)
        assert len(workers) == 2
        expected = h.local_model("lenet", 1).predict(h.images(3, seed=5))
        sent = 0
        for _ in range(12):  # separate connections, spread over the workers by the kernel
            api, channel = h.stub(server.target)
            try:
                response = api.ModelInfer(h.infer_request("lenet", h.images(3, seed=5)), timeout=30)
            finally:
                channel.close()
            np.testing.assert_array_equal(h.probabilities(response), expected)
            sent += 1
        text = server.metrics()
        assert (
            h.metric(
                text, "convserve_requests_total", model="lenet", version="1", outcome="success"
            )
            == sent
        )
        assert (
            h.metric(text, "convserve_inference_images_total", model="lenet", version="1")
            == 3 * sent
        )
        assert h.metric(text, "convserve_server_ready") == 1
        assert h.metric(text, "convserve_queue_depth", model="lenet", version="1") == 0
    finally:
        code = server.stop(timeout=30)
    assert code == 0, server.log()
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert server.log().count("shutdown complete") == 2


def test_a_dead_worker_stops_the_server():
    server = _start_workers(2)
    victim = _children(server.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    try:
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    assert code != 0
    assert f"(pid {victim}) exited with -9; stopping the others" in server.log()
