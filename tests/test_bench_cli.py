"""`python -m convserve.core.bench` on a user's own model, run as a user would: a model file with
its weights, an architecture document with random ones, and clear errors for what it cannot
bench."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from convserve.core.architecture import parse_architecture
from convserve.core.bench_models import BENCH_MODEL_NAMES, load_bench_model
from convserve.core.errors import ModelError
from convserve.core.model import Model

from tests import reference_numpy as ref
from tests.conftest import random_weights


def _doc(name: str, shape: list[int], layers: list[dict]) -> dict:
    return {
        "name": name,
        "input": {
            "shape": shape,
            "scale": 1 / 255,
            "mean": [0.5] * shape[-1],
            "std": [0.25] * shape[-1],
        },
        "layers": [
            *layers,
            {"type": "flatten"},
            {"type": "dense", "units": 10, "activation": "softmax"},
        ],
        "labels": [str(i) for i in range(10)],
    }


SMALL_CONV = _doc(
    "small_conv",
    [12, 12, 1],
    [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "max_pooling2d", "pool_size": 2},
    ],
)
STRIDED_TANH = _doc(
    "strided_tanh",
    [16, 16, 3],
    [
        {
            "type": "conv2d",
            "filters": 16,
            "kernel_size": 5,
            "strides": 2,
            "padding": "same",
            "activation": "tanh",
        }
    ],
)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convserve.core.bench", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_model_file_brings_its_own_weights_and_a_document_gets_random_ones(tmp_path):
    weights = random_weights(SMALL_CONV, seed=3)
    path = tmp_path / "mine.safetensors"
    Model(SMALL_CONV, weights).save(path)
    doc, loaded = load_bench_model(str(path))
    assert doc["name"] == "small_conv" and loaded is not None
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        np.testing.assert_array_equal(loaded[name], tensor)

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(STRIDED_TANH))
    assert load_bench_model(str(arch)) == (STRIDED_TANH, None)
    named, random = load_bench_model("lenet5")
    assert named["name"] == "lenet5" and random is None


def test_the_bench_runs_a_users_model_file_and_architecture_document(tmp_path):
    path = tmp_path / "mine.safetensors"
    Model(SMALL_CONV, random_weights(SMALL_CONV, seed=3)).save(path)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(STRIDED_TANH))
    out = tmp_path / "figures.json"
    done = bench(
        "--models", f"{path},{arch}", "--batches", "1,4", "--repeats", "1", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    cells = {(c["model"], c["batch"]): c for c in figures["cells"]}
    assert set(cells) == {(m, b) for m in (str(path), str(arch)) for b in (1, 4)}
    for cell in cells.values():
        assert cell["ours_ms"] > 0 and cell["ort_ms"] > 0 and cell["ratio"] > 0
    # both engines computed the same model: the file's weights in both, or the same random ones
    for spec in (str(path), str(arch)):
        assert figures["max_abs_diff_vs_ort"][spec] < 1e-5
        assert f"{spec}: kernel plan" in done.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not a benchmark model"),
        ("{not json", "not valid JSON"),
        (
            json.dumps({"name": "x", "input": {"shape": [8, 8, 1]}, "layers": [{"type": "warp"}]}),
            "warp",
        ),
    ],
)
def test_what_the_bench_cannot_run_is_one_clear_line(tmp_path, content, message):
    spec = "no_such_model"
    if content is not None:
        spec = str(tmp_path / "arch.json")
        (tmp_path / "arch.json").write_text(content)
    done = bench("--models", spec, "--batches", "1", "--repeats", "1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    with pytest.raises(ModelError, match=message):
        parse_architecture(load_bench_model(spec)[0])


@pytest.mark.parametrize("name", BENCH_MODEL_NAMES)
def test_every_benchmark_model_runs_and_matches_the_reference(name):
    """Each model the benchmark runs by default is a valid document, and the core's forward pass
    on it (the heuristic's kernels) matches the NumPy reference on a few images."""
    doc, weights = load_bench_model(name)
    weights = weights or random_weights(doc, seed=3)
    arch = parse_architecture(doc)
    x = np.random.default_rng(4).standard_normal((3, *arch.input_shape)).astype(np.float32)
    got = Model(doc, weights, plan=False).forward(x)
    np.testing.assert_allclose(got, ref.forward(doc, weights, x), atol=1e-4, rtol=1e-5)
