"""Replicas behind one DNS name, as behind a Kubernetes headless Service, all on loopback.

Three `convserve serve` processes listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3 on one port; a
DNS stand-in (tests/dns_stand_in.py) answers the name with their addresses. Our Client dials
`dns://<stand-in>/convserve.test:<port>` and balances per call (round_robin). Checked: every
replica gets calls; a replica killed with SIGKILL under load costs no failed call (the Client
retries UNAVAILABLE on the others); a fourth replica added behind the name gets calls within
the servers' --max-connection-age-secs plus its grace, because their GOAWAY makes the client
re-resolve the name.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from convserve.client import Client

from tests.client_load import ClientLoad
from tests.client_servers import statistics, write_repository
from tests.dns_stand_in import DnsStandIn
from tests.server_harness import Server, free_port, images, quick_stop

MODEL = "fashion_mnist"
NAME = "convserve.test"
AGE, GRACE = 3.0, 2.0  # the replicas' connection age and its grace, in seconds
REPLICA_FLAGS = (
    "--max-connection-age-secs",
    str(AGE),
    "--max-connection-age-grace-secs",
    str(GRACE),
    "--instances",
    "1",
    "--max-batch-size",
    "8",
    "--warmup-batch-sizes",
    "1,8",
    *quick_stop(grace_seconds=5),
)
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
NEW_HOST = "127.0.0.4"


def common_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (they all listen on it, like pods behind a Service)."""
    for _ in range(50):
        port = free_port()
        sockets = []
        try:
            for host in hosts:
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no port free on all of {hosts}")


def predict_load(client: Client) -> ClientLoad:
    """Four threads predicting 4 images (a random slice of 64) per call, checking the shape."""
    x = images(64, seed=5)

    def call(rng: np.random.Generator) -> None:
        start = int(rng.integers(0, 60))
        assert client.predict(x[start : start + 4], model=MODEL).shape == (4, 10)

    return ClientLoad(call)


def served(server: Server) -> int:
    """Successful inference requests the server has answered (its ModelStatistics)."""
    return statistics(server.target, MODEL)[1]


def wait_for(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until condition() held; raises AssertionError after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"condition not met within {timeout:g} s"
        time.sleep(step)
    return time.monotonic() - t0


@pytest.fixture
def repository(tmp_path):
    return write_repository(tmp_path / "repo", {MODEL: "fashion_mnist"})


def test_three_replicas_behind_one_name_sigkill_and_scale_up(repository, tmp_path):
    assert os.environ.get("GRPC_DNS_RESOLVER", "ares") != "native", (
        "gRPC's native resolver ignores the DNS server named in a target"
    )
    port = common_port([*HOSTS, NEW_HOST])
    replicas = [
        Server(repository, *REPLICA_FLAGS, metrics=False, port=port, host=host, log_dir=tmp_path)
        for host in HOSTS
    ]
    fourth = None
    try:
        for replica in replicas:
            replica.wait_ready()
        with DnsStandIn(NAME, HOSTS) as dns, Client(dns.target(port), timeout=30) as client:
            assert client.round_robin

            # 1. Calls are spread over every address behind the name.
            for _ in range(30):
                assert client.predict(images(1), model=MODEL).shape == (1, 10)
            before = [served(r) for r in replicas]
            assert min(before) >= 5, f"calls per replica: {before}"

            # 2. SIGKILL one replica under load: no call fails.
            victim = replicas[1]
            with predict_load(client) as load:
                wait_for(lambda: load.calls >= 40, timeout=60)
                assert served(victim) > before[1]  # the victim was taking part of the load
                victim.process.kill()
                killed_at = load.calls
                wait_for(lambda: load.calls >= killed_at + 150, timeout=120)
            assert victim.process.wait(10) == -9
            assert load.failures == [], f"{len(load.failures)} failed calls: {load.failures[:3]}"

            # 3. A fourth replica joins behind the name (the dead one leaves it): it gets calls
            # within the others' connection age plus grace, with no failed call meanwhile.
            fourth = Server(
                repository,
                *REPLICA_FLAGS,
                metrics=False,
                port=port,
                host=NEW_HOST,
                log_dir=tmp_path,
            ).wait_ready()
            with predict_load(client) as load:
                wait_for(lambda: load.calls >= 20, timeout=60)
                dns.set_addresses([HOSTS[0], HOSTS[2], NEW_HOST])
                # gRPC jitters the age by up to 10 %; 1 s more for polling on a busy machine
                bound = AGE * 1.1 + GRACE + 1.0
                took = wait_for(lambda: served(fourth) > 0, timeout=bound, step=0.1)
                wait_for(lambda: served(fourth) >= 10, timeout=30)
            assert load.failures == [], f"{len(load.failures)} failed calls: {load.failures[:3]}"
            print(f"fourth replica's first call {took:.2f} s after it joined the name")
            alive = [replicas[0], replicas[2], fourth]
            assert all(served(r) > 0 for r in alive)
    finally:
        for server in [*replicas, fourth]:
            if server is not None:
                server.stop()
