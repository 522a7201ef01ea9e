"""Readiness and liveness as Kubernetes probes read them, and the connection options.

Readiness (health services "readiness", "" and ServerReady) is SERVING only when every loaded
model version can compute; warming up, reloading and draining make it NOT_SERVING. Liveness
("liveness") stays SERVING through all of those and fails only when a batcher died.
"""

from __future__ import annotations

import argparse
import signal
import time

import grpc
import pytest
from convserve.proto import grpc_service_pb2 as pb
from convserve.server import config as cfg
from convserve.server.batcher import DynamicBatcher
from convserve.server.connections import connection_options
from convserve.server.readiness import liveness, readiness
from convserve.server.repository import ModelRepository
from convserve.server.servicer import ServerState
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import server_harness as h
from tests.test_server_lifecycle import LONG_WARMUP

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def parse(argv: list[str], environ: dict[str, str] | None = None) -> cfg.ServerConfig:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, environ or {})
    return cfg.config_from_args(parser.parse_args(argv))


# -- readiness from the real state objects ----------------------------------------------------
def test_readiness_follows_warm_up_reload_a_dead_batcher_and_drain(tmp_path):
    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "lenet5", seed=1)
    h.write_model(tmp_path / "n" / "1" / "model.safetensors", "lenet5", seed=2)
    state, repository = ServerState(), ModelRepository(tmp_path)

    verdict = readiness(state, repository)
    assert not verdict.ready and "warming up" in verdict.reason
    assert liveness(state, repository)

    repository.load(lambda entry: DynamicBatcher(entry.model.predict, name=entry.name), (1,))
    state.ready = True
    assert readiness(state, repository).ready and liveness(state, repository)

    state.reloading += 1  # a model version is being loaded and warmed while serving
    verdict = readiness(state, repository)
    assert not verdict.ready and "reloading" in verdict.reason
    assert liveness(state, repository)
    state.reloading -= 1
    assert readiness(state, repository).ready

    # A batcher that stopped outside a shutdown: no traffic, and the pod should be restarted.
    broken = repository.get("n")
    broken.batcher.close(timeout=10)
    verdict = readiness(state, repository)
    assert not verdict.ready and "'n' version 1" in verdict.reason
    assert not liveness(state, repository)

    state.exiting = True  # draining: not ready, but alive (no restart during a drain)
    verdict = readiness(state, repository)
    assert not verdict.ready and "draining" in verdict.reason
    assert liveness(state, repository)
    repository.get("m").batcher.close(timeout=10)


def check(stub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_services_through_warm_up_serving_and_drain(tmp_path):
    h.write_model(tmp_path / "m" / "1" / "model.safetensors", "fashion_mnist", seed=11)
    server = h.Server(
        tmp_path,
        "--warmup-batch-sizes",
        LONG_WARMUP,
        "--max-request-images",
        "600",
        "--drain-seconds",
        "3",
        "--grace-period",
        "20",
        metrics=False,
    )
    channel = grpc.insecure_channel(server.target)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        api = h.stub(server.target)[0]
        deadline = time.monotonic() + 120
        while True:  # the port listens before the models are warm
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()
            try:
                live = check(health, "liveness")
                break
            except grpc.RpcError:
                time.sleep(0.05)
        assert live == SERVING  # alive while warming: the startup probe waits for readiness
        for service in ("readiness", "", "inference.GRPCInferenceService"):
            assert check(health, service) == NOT_SERVING, service
        assert not api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready

        server.wait_ready()
        for service in ("readiness", "", "liveness"):
            assert check(health, service) == SERVING, service
        assert api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready

        server.process.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while check(health, "readiness") != NOT_SERVING:
            assert time.monotonic() - t0 < 2.5, "readiness still SERVING after SIGTERM"
            time.sleep(0.02)
        assert check(health, "liveness") == SERVING  # draining is no reason to restart
        assert not api.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert server.process.wait(30) == 0
    finally:
        channel.close()
        server.stop()
    assert "Traceback" not in server.log()


# -- connection age and keepalive ------------------------------------------------------------
def test_connection_options_defaults_and_flags():
    defaults = dict(connection_options(parse([])))
    assert defaults["grpc.max_connection_age_ms"] == 60_000
    assert "grpc.max_connection_age_grace_ms" not in defaults  # inf: running calls may finish
    assert defaults["grpc.keepalive_time_ms"] == 30_000
    assert defaults["grpc.keepalive_timeout_ms"] == defaults["grpc.http2.ping_timeout_ms"] == 10_000
    assert defaults["grpc.keepalive_permit_without_calls"] == 1
    assert defaults["grpc.http2.min_ping_interval_without_data_ms"] == 10_000

    config = parse(
        ["--max-connection-age-grace-secs", "2.5", "--keepalive-time-secs", "0"],
        {"CONVSERVE_MAX_CONNECTION_AGE_SECS": "300"},
    )
    options = dict(connection_options(config))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 2_500
    assert "grpc.keepalive_time_ms" not in options
    assert "grpc.max_connection_age_ms" not in dict(
        connection_options(parse(["--max-connection-age-secs", "0"]))
    )
    # round trip through the worker processes' flags
    assert parse(cfg.to_flags(config)) == config
    with pytest.raises(SystemExit):
        parse(["--max-connection-age-secs", "-1"])


def small_server(repository, *flags: str) -> h.Server:
    """A ready server of one small model, warmed for batch 1, no drain window, no metrics."""
    h.write_model(repository / "m" / "1" / "model.safetensors", "lenet5", seed=3)
    flags = ("--warmup-batch-sizes", "1", "--drain-seconds", "0", *flags)
    return h.Server(repository, *flags, metrics=False).wait_ready()


def test_server_closes_connections_at_their_max_age(tmp_path):
    """The server sends GOAWAY after --max-connection-age-secs: the client's channel goes IDLE
    (it reconnects, and re-resolves its name, on the next call) and calls keep working."""
    server = small_server(tmp_path, "--max-connection-age-secs", "1")
    api, channel = h.stub(server.target)
    states: list[grpc.ChannelConnectivity] = []
    try:
        assert api.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        channel.subscribe(states.append)
        deadline = time.monotonic() + 30
        while grpc.ChannelConnectivity.IDLE not in states:
            assert time.monotonic() < deadline, f"connection never closed: {states}"
            time.sleep(0.05)
        assert api.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # a new connection
    finally:
        channel.unsubscribe(states.append)
        channel.close()
        server.stop()


def test_keepalive_drops_a_peer_that_stops_answering(tmp_path):
    """A client that completes the HTTP/2 handshake and then goes silent (a vanished pod or
    node: no FIN, no RST) gets keepalive pings, and the server closes the connection when
    they go unanswered."""
    import socket

    server = small_server(
        tmp_path,
        *("--keepalive-time-secs", "1", "--keepalive-timeout-secs", "1"),
        *("--max-connection-age-secs", "0"),  # only keepalive may close the connection here
    )
    frames: list[int] = []  # HTTP/2 frame types received: 4 SETTINGS, 6 PING, 7 GOAWAY
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as peer:
            # client preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0)
            peer.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0")
            buffer, t0 = b"", time.monotonic()
            while True:
                chunk = peer.recv(65536)
                if not chunk:
                    break  # the server closed the connection
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    frames.append(kind)
                    if kind == 4 and not flags & 1:  # acknowledge the server's SETTINGS once
                        peer.sendall(b"\0\0\0\x04\x01\0\0\0\0")
                    buffer = buffer[9 + length :]
            closed_after = time.monotonic() - t0
        assert 6 in frames, f"no keepalive PING before the close: frames {frames}"
        assert 7 in frames, f"no GOAWAY before the close: frames {frames}"
        print(f"silent peer dropped {closed_after:.2f} s after its handshake")
    finally:
        server.stop()
