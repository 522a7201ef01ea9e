"""Settings of `convserve ray-serve` / `convserve.ray:build_app` (no Ray cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convserve.ray.settings import SettingsError, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_servers_and_one_replica():
    settings = resolve(environ={})
    assert settings.server.max_batch_size == 64 and settings.server.max_queue_size == 1024
    assert (settings.address, settings.grpc_port, settings.min_replicas) == ("local", 9000, 1)
    assert settings.scaling() == {"num_replicas": 1}


def test_flag_beats_file_beats_variable(tmp_path):
    config = tmp_path / "ray.yaml"
    config.write_text(
        "min_replicas: 2\nmax-replicas: 6\nmax_batch_size: 32\nwarmup_batch_sizes: [1, 8]\n"
    )
    environ = {
        "CONVSERVE_MAX_REPLICAS": "9",
        "CONVSERVE_TARGET_ONGOING_REQUESTS": "8",
        "CONVSERVE_MIN_REPLICAS": "5",
    }
    settings = resolve(flags={"config": str(config), "min_replicas": 3}, environ=environ)
    assert settings.min_replicas == 3  # flag
    assert settings.max_replicas == 6  # file (either spelling)
    assert settings.target_ongoing_requests == 8.0  # variable
    assert settings.server.max_batch_size == 32 and settings.server.warmup_batch_sizes == (1, 8)
    assert settings.scaling() == {
        "autoscaling_config": {
            "min_replicas": 3,
            "initial_replicas": 3,
            "max_replicas": 6,
            "target_ongoing_requests": 8.0,
        }
    }


def test_builder_arguments_are_parsed_like_flags():
    settings = resolve(
        values={"min_replicas": "0", "max_replicas": "2", "skip_bad_models": "true"}, environ={}
    )
    assert settings.min_replicas == 0 and settings.max_replicas == 2
    assert settings.server.skip_bad_models is True
    assert settings.scaling()["autoscaling_config"]["initial_replicas"] == 1


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"min_replica": 2}, "unknown setting(s) min_replica"),
        (
            {"max_replicas": 0},
            "setting max_replicas from the application arguments: expected an integer >= 1",
        ),
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas (2) must be >= min_replicas (3)"),
        ({"target_ongoing_requests": "0"}, "expected a number > 0"),
        ({"config": "/no/such/file.yaml"}, "cannot read settings file /no/such/file.yaml"),
    ],
)
def test_bad_settings_are_named(values, fragment):
    with pytest.raises(SettingsError) as info:
        resolve(values=values, environ={})
    assert fragment in str(info.value)


def test_bad_variable_names_the_variable():
    with pytest.raises(SettingsError, match=r"\$CONVSERVE_GRPC_PORT: expected a port"):
        resolve(environ={"CONVSERVE_GRPC_PORT": "70000"})


def test_cli_refuses_bad_settings_without_starting_ray():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convserve",
            "ray-serve",
            "--min-replicas",
            "3",
            "--max-replicas",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "convserve ray-serve: max_replicas (2) must be >= min_replicas (3) and >= 1"
    )


def test_importing_convserve_ray_does_not_import_ray():
    code = "import sys, convserve.ray, convserve.ray.settings; print('ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr


def test_serve_config_example_is_valid_for_ray_serve():
    pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(document)
    app = schema.applications[0]
    assert app.import_path == "convserve.ray:build_app"
    settings = resolve(values=app.args, environ={})
    assert (settings.min_replicas, settings.max_replicas) == (1, 4)
    for path in document["grpc_options"]["grpc_servicer_functions"]:
        module, _, name = path.rpartition(".")
        assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_app_import_path_builds_from_variables(monkeypatch):
    pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
    from ray.serve import Application

    from convserve.ray.serving import model_deployment_options

    monkeypatch.setenv("CONVSERVE_MODEL_REPOSITORY", str(ROOT / "models"))
    monkeypatch.setenv("CONVSERVE_MAX_REPLICAS", "3")
    import convserve.ray

    assert isinstance(convserve.ray.app, Application)  # what `serve run convserve.ray:app` loads
    options = model_deployment_options(resolve())
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 32.0,
    }
    assert options["ray_actor_options"]["num_cpus"] == 1.0
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["NUMBA_NUM_THREADS"] == "1"
    # the replica holds its batcher's whole queue: QueueFull comes from convserve, as directly
    assert options["max_ongoing_requests"] == 1024 + 64
