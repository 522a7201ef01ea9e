"""`convserve serve --workers N`: worker processes sharing one port, metrics summed over them,
signals forwarded, a dead worker restarted while the other serves (real processes on 127.0.0.1)."""

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
    _wait_all_serving(server, deadline)
    return server


def _wait_all_serving(server: h.Server, deadline: float) -> None:
    """A fresh channel lands on any worker: wait until ten in a row find one SERVING."""
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
        assert _gone(pid)
    assert server.log().count("shutdown complete") == 2


def _gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its parent, or reaped)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _infer_on_fresh_connections(server: h.Server, count: int) -> int:
    """`count` lenet requests, each on a new connection (so on any live worker); successes.

    A connection the kernel hands to a worker's listening socket just as that worker dies is
    reset (UNAVAILABLE), and a replacement still warming up answers UNAVAILABLE: clients retry
    UNAVAILABLE (ours does), so this does too, on a new connection, with the backoff of our
    client's default retry policy (5 attempts, 0.1 s doubling)."""
    expected = h.local_model("lenet", 1).predict(h.images(2, seed=6))
    ok = 0
    for _ in range(count):
        for attempt in range(5):
            api, channel = h.stub(server.target)
            try:
                request = h.infer_request("lenet", h.images(2, seed=6))
                response = api.ModelInfer(request, timeout=30)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if attempt == 4:
                    raise AssertionError(
                        f"5 attempts on new connections failed: {error.details()}\n"
                        f"server log (end):\n{server.log()[-4000:]}"
                    ) from error
                time.sleep(0.1 * 2**attempt)
                continue
            finally:
                channel.close()
            np.testing.assert_array_equal(h.probabilities(response), expected)
            ok += 1
            break
    return ok


def test_a_dead_worker_is_restarted_while_the_others_serve():
    """SIGKILL one of two workers: the other keeps answering, the supervisor restarts the dead
    one (a new pid), /metrics still counts every success (the dead worker's included) and reads
    ready again, and SIGTERM then stops everything with exit code 0."""
    server = _start_workers(2)
    try:
        sent = _infer_on_fresh_connections(server, 6)
        before = _children(server.process.pid)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        # Until the killed process is gone its listening socket still takes a share of new
        # connections (and resets them); from then on, while the dead worker is being replaced,
        # every new connection lands on the survivor.
        deadline = time.monotonic() + 60
        while not _gone(victim):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sent += _infer_on_fresh_connections(server, 6)
        deadline = time.monotonic() + 240
        while True:
            now = _children(server.process.pid)
            if len(now) == 2 and victim not in now:
                break
            assert server.process.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        while server.log().count("]: ready: ") < 3:  # the two first workers and the replacement
            assert server.process.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        _wait_all_serving(server, deadline)
        sent += _infer_on_fresh_connections(server, 6)
        text = server.metrics()
        assert (
            h.metric(
                text, "convserve_requests_total", model="lenet", version="1", outcome="success"
            )
            == sent
        )
        assert h.metric(text, "convserve_server_ready") == 1
        assert h.metric(text, "convserve_queue_depth", model="lenet", version="1") == 0
    finally:
        code = server.stop(timeout=30)
    assert code == 0, server.log()
    log = server.log()
    assert f"(pid {victim}) died (signal SIGKILL)" in log
    assert "restarting worker 0" in log
    assert log.count("shutdown complete") == 2  # the survivor and the replacement


def test_a_worker_that_cannot_start_stops_the_server_with_its_code(tmp_path):
    """Exit code 2 (a bad model file): restarting cannot help, so the supervisor exits 2."""
    bad = tmp_path / "bad" / "1" / "model.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a model file")
    server = h.Server(tmp_path, "--workers", "2", "--warmup-batch-sizes", "1")
    try:
        code = server.process.wait(timeout=120)
    finally:
        server.stop()
    assert code == 2, server.log()
    assert "could not start (exit code 2); stopping the others" in server.log()
    assert "restarting worker" not in server.log()
