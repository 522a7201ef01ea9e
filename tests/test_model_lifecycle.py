"""Model lifecycle against real servers: poll and explicit modes under continuous load.

Each scenario runs 8 client threads on the model's latest version the whole time and checks
every answer against the version that gave it; the verdict is 0 failed calls. Worst-second
latencies around each swap are printed (run with -s) but never asserted (shared CPUs).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import grpc
import pytest
from convserve.proto import grpc_service_pb2 as pb
from convserve.server import config as cfg
from convserve.server.model_config import (
    ModelConfigError,
    ModelSettings,
    VersionPolicy,
    read_settings,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import server_harness as h
from tests.lifecycle_load import Traffic, publish
from tests.server_harness import wait_until

POLL_SECS = 0.5
SWITCH_TIMEOUT = 120.0  # poll + warm-up on 2 shared cores, with generous slack
FLAGS = ("--instances", "1", "--warmup-batch-sizes", "1,8", "--max-batch-size", "8")
FLAGS += ("--drain-seconds", "0", "--grace-period", "20")


def write(seed: int):
    return lambda path: h.write_model(path, "lenet5", seed=seed, name="m")


def corrupt(path: Path) -> None:
    """A truncated model file: a copy cut short."""
    donor = path.parent / "donor.safetensors"
    h.write_model(donor, "lenet5", seed=99, name="m")
    data = donor.read_bytes()
    donor.unlink()
    path.write_bytes(data[: len(data) // 2])


def index(api) -> dict[str, tuple[str, str]]:
    rows = api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    return {f"{r.name}/{r.version}": (r.state, r.reason) for r in rows}


def report(label: str, traffic: Traffic, at: float) -> None:
    worst, calls = traffic.worst_second(at)
    print(f"\n{label}: worst second around the swap {worst * 1000:.0f} ms max ({calls} calls)")


class HealthSampler:
    """Records readiness (health service "readiness") every 50 ms in a thread."""

    def __init__(self, target: str):
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(self._channel)

        def run():
            while not self._stop.is_set():
                req = health_pb2.HealthCheckRequest(service="readiness")
                self.statuses.append(stub.Check(req, timeout=10).status)
                time.sleep(0.05)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(20)
        self._channel.close()
        return self.statuses


# -- config.json --------------------------------------------------------------------------
DEFAULTS = ModelSettings(64, 0, 2, 1024, VersionPolicy())


@pytest.mark.parametrize(
    "document,expected",
    [
        ({}, DEFAULTS),
        ({"max_batch_size": 8, "instances": 1}, ModelSettings(8, 0, 1, 1024, VersionPolicy())),
        ({"version_policy": "all"}, ModelSettings(64, 0, 2, 1024, VersionPolicy("all"))),
        (
            {"version_policy": {"latest": 3}, "max_queue_size": 0, "max_queue_delay_us": 100},
            ModelSettings(64, 100, 2, 0, VersionPolicy("latest", latest=3)),
        ),
        (
            {"version_policy": {"specific": [3, 1, 3]}, "labels": {"stable": 1}},
            ModelSettings(
                64, 0, 2, 1024, VersionPolicy("specific", specific=(1, 3)), {"stable": 1}
            ),
        ),
    ],
)
def test_config_json_overrides_the_defaults(tmp_path, document, expected):
    (tmp_path / "config.json").write_text(json.dumps(document))
    assert read_settings(tmp_path, DEFAULTS) == expected


def test_no_config_json_means_the_defaults(tmp_path):
    assert read_settings(tmp_path, DEFAULTS) is DEFAULTS


@pytest.mark.parametrize(
    "text,message",
    [
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"max_batch_sise": 8}', "unknown key 'max_batch_sise'"),
        ('{"max_batch_size": 0}', "max_batch_size must be an integer >= 1"),
        ('{"instances": true}', "instances must be an integer >= 1"),
        ('{"max_queue_size": 1.5}', "max_queue_size must be an integer >= 0"),
        ('{"version_policy": {"latest": 0}}', "version_policy latest must be"),
        ('{"version_policy": {"specific": []}}', "version_policy must be"),
        ('{"version_policy": "newest"}', "version_policy must be"),
        ('{"labels": {"2": 1}}', "looks like a version number"),
        ('{"labels": {"a": "x"}}', "label 'a' must be an integer"),
        ("[" * 60_000, "not valid JSON"),
        ('{"labels": {"' + "x" * 70_000 + '": 1}}', "larger than"),
    ],
    ids=lambda value: value[:24] if isinstance(value, str) else None,
)
def test_a_bad_config_json_is_refused_with_one_line(tmp_path, text, message):
    # ids: pytest would print the 60 kB documents
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelConfigError) as info:
        read_settings(tmp_path, DEFAULTS)
    assert message in str(info.value) and "config.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_version_policies_select_versions():
    versions = [1, 2, 5, 9]
    assert VersionPolicy().select(versions) == {9}
    assert VersionPolicy("latest", latest=2).select(versions) == {5, 9}
    assert VersionPolicy("all").select(versions) == {1, 2, 5, 9}
    assert VersionPolicy("specific", specific=(2, 3)).select(versions) == {2}


def test_control_mode_flags():
    parser = __import__("argparse").ArgumentParser()
    cfg.add_arguments(parser, {})
    args = parser.parse_args(
        ["--model-control-mode", "EXPLICIT", "--load-model", "a", "--load-model", "b,c"]
    )
    config = cfg.config_from_args(args, {})
    assert config.model_control_mode == "explicit"
    assert config.load_model == ("a", "b", "c")
    assert config.repository_poll_secs == 5.0
    assert cfg.to_flags(config).count("--load-model") == 3
    env = cfg.config_from_args(parser.parse_args([]), {"CONVSERVE_LOAD_MODEL": "x,y"})
    assert env.load_model == ("x", "y")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-control-mode", "sometimes"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--repository-poll-secs", "0"])


# -- poll mode ----------------------------------------------------------------------------
def test_poll_mode_swaps_versions_under_load_without_a_failed_call(tmp_path):
    repo = tmp_path / "repo"
    model_dir = repo / "m"
    v1 = publish(model_dir, 1, write(1))
    server = h.Server(
        repo, "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_SECS), *FLAGS
    )
    try:
        server.wait_ready()
        api, channel = h.stub(server.target)
        traffic = Traffic(server.target, "m", repo)
        traffic.expect(1, v1)
        health = HealthSampler(server.target)
        traffic.start()
        traffic.wait_for_version("1", 30)

        # add version 2 (renamed into place, other weights): latest 1 moves to it
        (tmp_path / "v2").mkdir()
        traffic.expect(2, write(2)(tmp_path / "v2" / "model.safetensors"))
        t_add = time.monotonic()
        publish(model_dir, 2, lambda path: shutil.copy(tmp_path / "v2" / "model.safetensors", path))
        switched = traffic.wait_for_version("2", SWITCH_TIMEOUT)
        print(f"\npoll: answers switched to version 2 {switched:.2f} s after the rename")
        report("poll add v2", traffic, t_add + switched)
        wait_until(lambda: "m/1" not in index(api) or index(api)["m/1"][0] != "READY", 30, "v1 out")

        # remove version 1, then add a corrupt version 3: version 2 keeps serving
        shutil.rmtree(model_dir / "1")
        wait_until(lambda: "m/1" not in index(api), 30, "version 1 gone from the index")
        t_bad = time.monotonic()
        publish(model_dir, 3, corrupt)
        state = wait_until(
            lambda: index(api).get("m/3", ("", ""))[0] == "UNAVAILABLE" and index(api)["m/3"],
            SWITCH_TIMEOUT,
            "version 3 UNAVAILABLE",
        )
        assert state[1] and "\n" not in state[1], state
        assert index(api)["m/2"][0] == "READY"
        assert "kept serving" in index(api)["m/2"][1]
        time.sleep(3 * POLL_SECS)  # a few more polls: the same bad file is not retried
        assert traffic.last_version() == "2"
        report("poll corrupt v3", traffic, t_bad)
        assert server.log().count("skipping model 'm' version 3") == 1

        # the unsafe way: version 4 copied in place slowly; it loads once the copy is complete
        (tmp_path / "v4").mkdir()
        full = tmp_path / "v4" / "model.safetensors"
        traffic.expect(4, write(4)(full))
        data = full.read_bytes()
        target = model_dir / "4" / "model.safetensors"
        target.parent.mkdir()
        with open(target, "wb") as f:
            f.write(data[: len(data) // 3])
            f.flush()
            time.sleep(4 * POLL_SECS)  # polls see the partial file
            f.write(data[len(data) // 3 :])
        t_unsafe = time.monotonic()
        traffic.wait_for_version("4", SWITCH_TIMEOUT)
        report("poll unsafe v4", traffic, t_unsafe)

        # a config.json change reloads the served version with the new settings
        t_config = time.monotonic()
        (model_dir / "config.json").write_text(
            json.dumps({"max_batch_size": 4, "labels": {"stable": 4}})
        )

        def config():
            return api.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10).config

        wait_until(lambda: config().max_batch_size == 4, SWITCH_TIMEOUT, "config applied")
        assert config().parameters["label:stable"].string_value == "4"
        labelled = api.ModelInfer(h.infer_request("m", traffic.image, version="stable"))
        assert labelled.model_version == "4"
        report("poll config.json", traffic, t_config)
        # a bad config.json is refused with one line; the model keeps its previous config
        (model_dir / "config.json").write_text('{"max_batch_size": "eight"}')
        wait_until(lambda: "config.json refused" in server.log(), 30, "bad config refused")
        time.sleep(3 * POLL_SECS)
        assert config().max_batch_size == 4
        assert server.log().count("config.json refused") == 1

        # a changed file of a served version (replaced atomically) is rebuilt and swapped in
        staged = tmp_path / "v4b.safetensors"
        write(5)(staged)
        traffic.expect(4, staged)
        t_replace = time.monotonic()
        os.replace(staged, target)
        traffic.wait_for_version("4", SWITCH_TIMEOUT, build=1)
        report("poll replaced v4 file", traffic, t_replace)

        traffic.stop()
        statuses = health.stop()
        failures = traffic.failures()
        print(f"poll: {len(traffic.calls)} calls, {len(failures)} failed")
        assert not failures, failures[:5]
        assert len(traffic.calls) > 100
        assert statuses and all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses)
        metrics = server.metrics()
        assert "convserve_model_versions_loaded 1.0" in metrics
        # version 3 (corrupt) failed once; the partial copy of version 4 at least once
        failed = re.search(
            r'convserve_model_transitions_total\{action="load",model="m",outcome="failure"\} (\S+)',
            metrics,
        )
        assert failed and float(failed.group(1)) >= 2
        assert 'action="unload",model="m",outcome="success"' in metrics
        stats = api.ModelStatistics(pb.ModelStatisticsRequest(name="m"), timeout=10)
        assert [s.version for s in stats.model_stats] == ["4"]
        channel.close()
    finally:
        assert server.stop() == 0, server.log()


# -- explicit mode through tritonclient --------------------------------------------------
def test_explicit_mode_through_tritonclient_under_load(tmp_path):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    model_dir = repo / "m"
    v1 = publish(model_dir, 1, write(1))
    publish(repo / "other", 1, lambda p: h.write_model(p, "fashion_mnist", seed=7, name="other"))
    (repo / "other" / "config.json").write_text('{"instances": 6}')  # a slower load
    server = h.Server(repo, "--model-control-mode", "explicit", "--load-model", "m", *FLAGS)
    try:
        server.wait_ready()
        client = tc.InferenceServerClient(server.target)
        api, channel = h.stub(server.target)
        rows = {(m["name"], m.get("version", "")): m for m in _index(client)}
        assert rows[("m", "1")]["state"] == "READY"
        assert rows[("other", "1")].get("state", "") == ""  # on disk, never loaded
        traffic = Traffic(server.target, "m", repo)
        traffic.expect(1, v1)
        traffic.start()
        traffic.wait_for_version("1", 30)

        # version 2 appears on disk: nothing changes until load_model
        v2 = publish(model_dir, 2, write(2))
        traffic.expect(2, v2)
        time.sleep(1.0)
        assert traffic.last_version() == "1"
        t_load = time.monotonic()
        client.load_model("m")
        load_seconds = time.monotonic() - t_load
        traffic.wait_for_version("2", 10)  # in effect when load_model returns
        report(f"explicit load v2 (load_model took {load_seconds:.2f} s)", traffic, t_load)

        shutil.rmtree(model_dir / "1")
        client.load_model("m")
        assert ("m", "1") not in {(m["name"], m.get("version", "")) for m in _index(client)}

        publish(model_dir, 3, corrupt)
        t_bad = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.load_model("m")
        assert "version 3" in str(info.value)
        rows = {(m["name"], m.get("version", "")): m for m in _index(client)}
        assert rows[("m", "3")]["state"] == "UNAVAILABLE" and rows[("m", "3")]["reason"]
        assert rows[("m", "2")]["state"] == "READY"
        assert client.is_model_ready("m")
        report("explicit corrupt v3", traffic, t_bad)
        traffic.stop()
        failures = traffic.failures()
        print(f"explicit: {len(traffic.calls)} calls, {len(failures)} failed")
        assert not failures, failures[:5]

        # an unload during a load: the unload waits for the load, then unloads
        overlapped = False
        for _ in range(5):  # until the unload is sent while the index shows LOADING
            loading = threading.Thread(target=client.load_model, args=("other",))
            loading.start()
            while loading.is_alive() and not overlapped:
                overlapped = index(api).get("other/1", ("", ""))[0] == "LOADING"
            if overlapped:
                tc.InferenceServerClient(server.target).unload_model("other")
            loading.join(120)
            if overlapped:
                break
        assert overlapped, "the load of 'other' was never caught in progress"
        assert "model 'other': unload waits for the operation under way" in server.log()
        rows = {(m["name"], m.get("version", "")): m for m in _index(client)}
        assert rows[("other", "1")]["state"] == "UNAVAILABLE", rows
        assert rows[("other", "1")]["reason"] == "unloaded"
        assert not client.is_model_ready("other")

        # an unload waits for the requests in flight: long requests queued before it succeed
        big = h.infer_request("m", h.images(8000, seed=9))
        answers: list = []
        senders = [
            threading.Thread(target=lambda: answers.append(api.ModelInfer(big, timeout=120)))
            for _ in range(4)
        ]
        for sender in senders:
            sender.start()

        def all_received_some_queued() -> bool:
            # Every request reached the server (queued now or already answered) and some are
            # still queued, so the unload below must wait for them. All 4 queued at once is
            # not guaranteed: the first may be computed before a slow machine sends the last.
            found = re.search(
                r'convserve_queue_depth\{model="m",version="2"\} (\S+)', server.metrics()
            )
            depth = int(float(found.group(1))) if found else 0
            return depth >= 1 and depth + len(answers) == 4

        wait_until(all_received_some_queued, 60, "all 4 long requests received, some queued")
        client.unload_model("m")
        for sender in senders:
            sender.join(120)
        assert len(answers) == 4 and {a.model_version for a in answers} == {"2"}
        assert all(h.probabilities(a).shape == (8000, 10) for a in answers)

        # an unloaded model answers a clear error; m's versions are gone from the metrics
        with pytest.raises(grpc.RpcError) as err:
            api.ModelInfer(h.infer_request("m", traffic.image), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (
            "has no available versions" in err.value.details() and "unloaded" in err.value.details()
        )
        assert "convserve_model_versions_loaded 0.0" in server.metrics()
        assert 'convserve_queue_depth{model="m"' not in server.metrics()
        # health stays SERVING with no model in explicit mode (models come by RPC)
        assert api.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        # loading an unknown model or a path is refused with one line
        with pytest.raises(InferenceServerException) as info:
            client.load_model("../repo")
        assert "a model name is a folder" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.load_model("nope")
        assert "no such model folder" in str(info.value)
        channel.close()
        client.close()
    finally:
        assert server.stop() == 0, server.log()


def test_poll_mode_converges_on_every_worker(tmp_path):
    publish(tmp_path / "m", 1, write(1))
    server = h.Server(
        tmp_path,
        "--model-control-mode",
        "poll",
        "--repository-poll-secs",
        str(POLL_SECS),
        "--workers",
        "2",
        *FLAGS,
    )
    try:
        server.wait_ready()
        wait_until(lambda: server.log().count("model 'm' version 1 loaded") == 2, 120, "2 workers")
        publish(tmp_path / "m", 2, write(2))
        wait_until(
            lambda: all(
                f"[worker {i}]: model 'm' version 2 loaded" in server.log() for i in (0, 1)
            ),
            SWITCH_TIMEOUT,
            "version 2 loaded on both workers",
        )
        wait_until(
            lambda: "convserve_model_versions_loaded 2.0" in server.metrics(),
            60,
            "one version per worker after the swap",
        )
    finally:
        assert server.stop() == 0, server.log()


def _index(client) -> list[dict]:
    return client.get_model_repository_index(as_json=True).get("models", [])


def test_explicit_mode_refuses_several_workers(tmp_path):
    publish(tmp_path / "m", 1, write(1))
    command = [sys.executable, "-m", "convserve", "serve", "--model-repository", str(tmp_path)]
    command += ["--model-control-mode", "explicit", "--workers", "2", "--port", str(h.free_port())]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=h.server_env()
    )
    assert result.returncode == 2
    assert "--model-control-mode explicit needs --workers 1" in result.stderr
    assert "Traceback" not in result.stderr


# -- memory is released on unload ---------------------------------------------------------
def test_unload_releases_the_model(tmp_path):
    from convserve.server.app import model_defaults
    from convserve.server.lifecycle import ModelLifecycle
    from convserve.server.metrics import ServerMetrics
    from convserve.server.repository import ModelRepository
    from convserve.server.served import VersionFactory
    from prometheus_client import generate_latest

    publish(tmp_path / "m", 1, write(1))
    config = cfg.ServerConfig(instances=2, warmup_batch_sizes=(1,), model_control_mode="explicit")
    metrics = ServerMetrics()

    async def scenario():
        lifecycle = ModelLifecycle(
            ModelRepository(tmp_path),
            VersionFactory(config, metrics, lambda jobs: None),
            "explicit",
            model_defaults(config),
            metrics,
        )
        await lifecycle.load("m")
        served = lifecycle.repository.get("m")
        model, batcher = weakref.ref(served.model), served.batcher
        del served
        await lifecycle.unload("m")
        return model, batcher, lifecycle

    model, batcher, lifecycle = asyncio.run(scenario())
    gc.collect()
    assert model() is None  # weights and buffers are freed
    assert not batcher.alive and not any(t.is_alive() for t in batcher._threads)
    assert lifecycle.repository.served_versions() == []
    text = generate_latest(metrics.registry).decode()
    assert 'convserve_queue_depth{model="m"' not in text  # the gauge reading the queue is gone
    assert "convserve_model_versions_loaded 0.0" in text
