"""Start-up, configuration, metrics and graceful shutdown of real `convserve serve` processes."""

from __future__ import annotations

import argparse
import signal
import time

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb
from convserve.server import config as cfg

from tests import server_harness as h

# A deliberately long warm-up, so that checks run while it is still going: 150 distinct batch
# sizes (a repeated size warms up once), about 67,000 images, seconds even on a fast machine.
LONG_WARMUP = ",".join(str(n) for n in range(150, 300))


# -- configuration ---------------------------------------------------------------------------
def parse(argv: list[str], environ: dict[str, str]) -> cfg.ServerConfig:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, environ)
    return cfg.config_from_args(parser.parse_args(argv))


def test_flags_environment_and_defaults():
    default = parse([], {})
    assert (default.port, default.metrics_port, default.max_batch_size, default.host) == (
        8001,
        8002,
        64,
        "0.0.0.0",
    )
    env = {
        "CONVSERVE_PORT": "9001",
        "CONVSERVE_MAX_BATCH_SIZE": "8",
        "CONVSERVE_MODEL_REPOSITORY": "/srv/models",
        "CONVSERVE_WARMUP_BATCH_SIZES": "1,4,8",
        "CONVSERVE_SKIP_BAD_MODELS": "true",
        "CONVSERVE_LOG_LEVEL": "debug",
    }
    from_env = parse([], env)
    assert (from_env.port, from_env.max_batch_size, from_env.model_repository) == (
        9001,
        8,
        "/srv/models",
    )
    assert (
        from_env.warmup_batch_sizes == (1, 4, 8)
        and from_env.skip_bad_models
        and from_env.log_level == "DEBUG"
    )
    flag_wins = parse(["--port", "9100", "--max-batch-size", "16"], env)
    assert (flag_wins.port, flag_wins.max_batch_size) == (9100, 16)
    assert {opt.env for opt in cfg.OPTIONS} >= {
        "CONVSERVE_PORT",
        "CONVSERVE_METRICS_PORT",
        "CONVSERVE_MODEL_REPOSITORY",
        "CONVSERVE_MAX_QUEUE_DELAY_US",
        "CONVSERVE_GRACE_PERIOD",
        "CONVSERVE_MAX_MESSAGE_BYTES",
    }


def test_bad_environment_value_names_the_variable(capsys):
    with pytest.raises(SystemExit):
        parse([], {"CONVSERVE_MAX_BATCH_SIZE": "zero"})
    assert "CONVSERVE_MAX_BATCH_SIZE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--port", "70000"], {})
    assert "0-65535" in capsys.readouterr().err


def test_default_repository_resolution(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "candidate_repositories", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(
        FileNotFoundError,
        match="no model repository: pass --model-repository DIR or set CONVSERVE_MODEL_REPOSITORY",
    ):
        cfg.resolve_repository(None)
    (tmp_path / "b").mkdir()
    assert cfg.resolve_repository(None) == (tmp_path / "b").resolve()
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        cfg.resolve_repository(str(tmp_path / "missing"))


# -- start-up --------------------------------------------------------------------------------
def test_corrupt_model_refuses_to_start_without_traceback(tmp_path):
    h.write_model(tmp_path / "good" / "1" / "model.safetensors", "lenet5", seed=5)
    bad = tmp_path / "broken" / "1" / "model.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    server = h.Server(tmp_path, "--metrics-port", "0", "--warmup-batch-sizes", "1", metrics=False)
    assert server.process.wait(120) == 2
    log = server.log()
    assert "cannot start: cannot load model 'broken' version 1" in log and "not valid JSON" in log
    assert "Traceback" not in log
    server.stop()


def test_skip_bad_models_serves_the_rest_and_lists_the_broken_one(tmp_path):
    h.write_model(tmp_path / "good" / "1" / "model.safetensors", "lenet5", seed=5)
    bad = tmp_path / "broken" / "1" / "model.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    server = h.Server(
        tmp_path, "--skip-bad-models", "true", "--warmup-batch-sizes", "1", metrics=False
    )
    try:
        server.wait_ready()
        api, channel = h.stub(server.target)
        index = {m.name: m for m in api.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["good"].state == "READY"
        assert (
            index["broken"].state == "UNAVAILABLE"
            and "not a safetensors file" in index["broken"].reason
        )
        with pytest.raises(grpc.RpcError) as info:
            api.ModelInfer(h.infer_request("broken", h.images(1)))
        assert (
            info.value.code() == grpc.StatusCode.NOT_FOUND
            and "has no available versions" in info.value.details()
        )
        assert h.probabilities(api.ModelInfer(h.infer_request("good", h.images(2)))).shape == (
            2,
            10,
        )
        channel.close()
        assert "skipping model 'broken' version 1" in server.log()
    finally:
        assert server.stop() == 0


def test_empty_repository_is_a_clear_error(tmp_path):
    server = h.Server(tmp_path, metrics=False)
    assert server.process.wait(60) == 2
    assert "holds no models: expected <model>/<version>/model.safetensors" in server.log()
    server.stop()


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_scrape_has_every_family():
    server = h.main_server()
    api, channel = h.stub(server.target)
    try:
        api.ModelInfer(h.infer_request("lenet", h.images(3, seed=31)))
    finally:
        channel.close()
    text = server.metrics()
    for family in (
        "convserve_requests_total",
        "convserve_inference_images_total",
        "convserve_request_duration_seconds_bucket",
        "convserve_queue_duration_seconds_bucket",
        "convserve_compute_duration_seconds_bucket",
        "convserve_batch_size_bucket",
        "convserve_queue_depth",
        "convserve_model_load_seconds",
        "convserve_model_warmup_seconds",
        "convserve_server_ready",
    ):
        assert family in text, family
    for outcome in ("success", "invalid", "rejected", "timeout", "cancelled", "error"):
        assert f'outcome="{outcome}"' in text
    assert (
        h.metric(text, "convserve_requests_total", model="lenet", version="1", outcome="success")
        >= 1
    )
    assert h.metric(text, "convserve_inference_images_total", model="lenet", version="1") >= 3
    assert h.metric(text, "convserve_batch_size_count", model="lenet", version="1") >= 1
    assert h.metric(text, "convserve_queue_depth", model="lenet", version="1") == 0
    assert h.metric(text, "convserve_model_warmup_seconds", model="fashion", version="2") > 0
    assert h.metric(text, "convserve_server_ready") == 1


# -- shutdown --------------------------------------------------------------------------------
def test_sigterm_drains_without_losing_accepted_requests(tmp_path):
    """SIGTERM: health NOT_SERVING at once; in-flight and drain-window requests succeed; then new
    calls are refused with UNAVAILABLE; exit code 0 within the grace period."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "fashion_mnist", seed=7)
    server = h.Server(
        tmp_path,
        "--max-batch-size",
        "1",
        "--warmup-batch-sizes",
        "1",
        "--drain-seconds",
        "1.5",
        "--grace-period",
        "60",
        metrics=False,
    ).wait_ready()
    api, channel = h.stub(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        x = h.images(300, seed=41)
        in_flight = [
            api.ModelInfer.future(
                h.infer_request("m", x[50 * i : 50 * i + 50], id=str(i)), timeout=60
            )
            for i in range(6)
        ]
        time.sleep(0.2)
        t_signal = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            != health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() - t_signal < 1.0, "health still SERVING after SIGTERM"
            time.sleep(0.02)
        assert not api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert api.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        assert time.monotonic() - t_signal < 1.0  # sent inside the 1.5 s drain window
        during_drain = api.ModelInfer(h.infer_request("m", x[:2], id="drain"), timeout=60)
        assert during_drain.id == "drain"
        results = [f.result(timeout=60) for f in in_flight]
        for i, response in enumerate(results):
            assert response.id == str(i) and h.probabilities(response).shape == (50, 10)
        while time.monotonic() - t_signal < 1.6:
            time.sleep(0.05)
        refused = None
        for _ in range(100):  # once the drain window is over, new calls are refused
            try:
                api.ModelInfer(h.infer_request("m", x[:1]), timeout=5)
            except grpc.RpcError as exc:
                refused = exc
                break
            time.sleep(0.05)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(60) == 0
        assert time.monotonic() - t_signal < 60
    finally:
        channel.close()
        server.stop()
    log = server.log()
    for line in (
        "SIGTERM received: health NOT_SERVING, draining",
        "refusing new requests",
        "shutdown complete",
    ):
        assert line in log
    assert "Traceback" not in log


def test_requests_in_flight_at_sigint_complete(tmp_path):
    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "fashion_mnist", seed=8)
    server = h.Server(
        tmp_path,
        "--max-batch-size",
        "4",
        "--warmup-batch-sizes",
        "1,4",
        "--drain-seconds",
        "0",
        "--grace-period",
        "30",
        metrics=False,
    ).wait_ready()
    api, channel = h.stub(server.target)
    try:
        x = h.images(400, seed=42)
        expected = h.local_model_at(tmp_path / "m" / "1" / "model.safetensors").predict(x)
        futures = [
            api.ModelInfer.future(h.infer_request("m", x[100 * i : 100 * i + 100]), timeout=60)
            for i in range(4)
        ]
        time.sleep(0.1)
        server.process.send_signal(signal.SIGINT)
        got = np.concatenate([h.probabilities(f.result(timeout=60)) for f in futures])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        assert server.process.wait(30) == 0
    finally:
        channel.close()
        server.stop()
    assert "SIGINT received" in server.log()


def test_not_ready_until_every_model_is_warm(tmp_path):
    """While models load and warm up: live, but not ready, health NOT_SERVING, inference UNAVAILABLE."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "fashion_mnist", seed=9)
    server = h.Server(
        tmp_path, "--warmup-batch-sizes", LONG_WARMUP, "--max-request-images", "2000", metrics=False
    )
    channel = grpc.insecure_channel(server.target)
    try:
        api = h.stub(server.target)[0]
        deadline = time.monotonic() + 120
        while True:  # wait for the listener (before the models are ready)
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()
            try:
                assert api.ServerLive(pb.ServerLiveRequest(), timeout=2).live
                break
            except grpc.RpcError:
                time.sleep(0.05)
        assert not api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert not api.ModelReady(pb.ModelReadyRequest(name="m"), timeout=5).ready
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as info:
            api.ModelInfer(h.infer_request("m", h.images(1)), timeout=5)
        assert (
            info.value.code() == grpc.StatusCode.UNAVAILABLE
            and "Server not ready" in info.value.details()
        )
        server.wait_ready()
        assert api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert h.probabilities(
            api.ModelInfer(h.infer_request("m", h.images(1)), timeout=30)
        ).shape == (1, 10)
        log = server.log()
        assert (
            log.index("listening on")
            < log.index("model 'm' version 1 ready")
            < log.index("ready: 1 model version")
        )
    finally:
        channel.close()
        server.stop()


def test_sigterm_during_warmup_exits_promptly(tmp_path):
    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "fashion_mnist", seed=10)
    server = h.Server(
        tmp_path, "--warmup-batch-sizes", LONG_WARMUP, "--max-request-images", "600", metrics=False
    )
    api = h.stub(server.target)[0]
    deadline = time.monotonic() + 60
    while True:  # listening, still warming up
        assert time.monotonic() < deadline and server.process.poll() is None, server.log()
        try:
            api.ServerLive(pb.ServerLiveRequest(), timeout=2)
            break
        except grpc.RpcError:
            time.sleep(0.05)
    assert not api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    t0 = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert time.monotonic() - t0 < 10
    log = server.log()
    assert "shutdown requested during start-up" in log and "Traceback" not in log
    server.stop()
