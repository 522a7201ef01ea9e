"""`convserve ray-serve` as users run it: a local Ray cluster in the command, the bundled model
served through Ray Serve's gRPC proxy, `convserve classify` against it, SIGTERM stops it all."""

from __future__ import annotations

import signal
import subprocess
import sys
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
