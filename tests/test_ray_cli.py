"""`convserve ray-serve` as users run it: a local Ray cluster in the command, the bundled model
served through Ray Serve's gRPC proxy, `convserve classify` against it, SIGTERM stops it all."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip(
    "ray.serve", reason="the `ray` extra is not installed (pip install 'convserve[ray]')"
)

from tests import server_harness as h  # noqa: E402


def test_ray_serve_command_serves_classify_and_stops_on_sigterm(tmp_path):
    from convserve.client import Client

    port = h.free_port()
    log_path = tmp_path / "ray-serve.log"
    command = [
        sys.executable,
        "-m",
        "convserve",
        "ray-serve",
        "--model-repository",
        str(h.ROOT / "models"),
        "--grpc-port",
        str(port),
        "--http-port",
        str(h.free_port()),
        "--num-cpus",
        "2",
        "--log-level",
        "WARNING",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=h.server_env()
        )
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, retries=0) as client:
            deadline = time.monotonic() + 180
            while not client.is_ready(timeout=5):
                assert process.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, "not ready in 180 s"
                time.sleep(0.5)
        classify = subprocess.run(
            [sys.executable, "-m", "convserve", "classify", "--target", target]
            + [str(h.ROOT / "examples" / "sneaker_9.png")],
            capture_output=True,
            text=True,
            timeout=60,
            env=h.server_env(),
        )
        assert classify.returncode == 0, classify.stderr
        assert "sneaker_9.png" in classify.stdout
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    with Client(target, retries=0) as client:  # the cluster and its proxy are gone
        assert not client.is_live(timeout=2)


def test_ray_serve_joins_a_running_cluster_and_leaves_the_app_running(tmp_path):
    from convserve.client import Client

    gcs, port = h.free_port(), h.free_port()
    # Token authentication (docs/ray.md) is Ray's business; this test is about joining
    env = dict(h.server_env(), RAY_AUTH_MODE="disabled")
    head_log = open(tmp_path / "head.log", "wb")
    # `ray start --block` keeps the head in this process tree: SIGTERM to it stops that cluster only
    # its own temp dir: the head's address record (ray_current_cluster) must not outlive the test
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
        + ["--port", str(gcs), "--num-cpus", "2", "--include-dashboard=false"]
        + ["--disable-usage-stats", "--temp-dir", temp_dir],
        stdout=head_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    command = [sys.executable, "-m", "convserve", "ray-serve", "--address", f"127.0.0.1:{gcs}"]
    command += ["--model-repository", str(h.ROOT / "models"), "--grpc-port", str(port)]
    command += ["--http-port", str(h.free_port())]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head takes a few seconds to accept drivers
            joined = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
            if joined.returncode != 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert "keeps running after this command" in joined.stderr
        with Client(f"127.0.0.1:{port}") as client:  # the command has returned; the app serves
            # (the proxy may take a moment to learn the route: until then it answers NOT_FOUND)
            client.wait_until_ready(timeout=30)
            assert client.classify(h.images(2), top_k=1)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    with Client(f"127.0.0.1:{port}", retries=0) as client:
        assert not client.is_live(timeout=2)
