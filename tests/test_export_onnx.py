"""`convserve export`: ONNX Runtime runs the exported model with our results, in both layouts,
and importing the export gives back the same model; the import/export/summary commands as a
user runs them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from convserve.core.interop.convert import export_model, import_model
from convserve.core.model import Model
from convserve.core.presets import preset

from tests.conftest import random_weights

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOLERANCE = 1e-4


def preset_model(name: str, seed: int) -> Model:
    doc = preset(name)
    channels = doc["input"]["shape"][2]
    rng = np.random.default_rng(seed)
    doc["input"].update(
        scale=1 / 255,
        mean=rng.uniform(0, 0.5, channels).tolist(),
        std=rng.uniform(0.2, 1, channels).tolist(),
    )
    return Model(doc, random_weights(doc, seed))


@pytest.mark.parametrize("name", ["fashion_mnist", "lenet5", "cifar10"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_export_runs_in_onnxruntime_and_round_trips(tmp_path, name, layout):
    model = preset_model(name, seed=len(name))
    model.save(tmp_path / "m.safetensors")
    diff, runtime = export_model(tmp_path / "m.safetensors", tmp_path / "m.onnx", layout=layout)
    assert diff is not None and diff <= TOLERANCE and runtime.startswith("ONNX Runtime")

    # ONNX Runtime on raw pixels, independently of the exporter's own check
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(5).integers(0, 256, (4, *model.input_shape)).astype(np.uint8)
    feed = pixels.astype(np.float32)
    if layout == "nchw":
        feed = np.ascontiguousarray(feed.transpose(0, 3, 1, 2))
    (expected,) = session.run(["output"], {"input": feed})
    assert np.abs(model.predict(pixels) - expected).max() <= TOLERANCE

    import_model(tmp_path / "m.onnx", tmp_path / "back.safetensors")
    back = Model.load(tmp_path / "back.safetensors")
    assert back.architecture == model.architecture  # layers, input, preprocessing, labels, name
    assert sorted(back.weights) == sorted(model.weights)
    for key, value in model.weights.items():
        assert np.array_equal(back.weights[key], value), key


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convserve", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_export_import_summary(tmp_path, reference_model):
    reference_model.save(tmp_path / "m.safetensors")
    done = run("export", str(tmp_path / "m.safetensors"), "--onnx", str(tmp_path / "m.onnx"))
    assert done.returncode == 0, done.stderr
    assert "NHWC" in done.stdout and "max |difference|" in done.stdout
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"item {i}" for i in range(10)) + "\n")
    done = run(
        "import", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "i.safetensors"),
        "--name", "imported", "--labels", str(labels),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "verified against ONNX Runtime" in done.stdout
    summary = run("summary", str(tmp_path / "i.safetensors"))
    assert summary.returncode == 0, summary.stderr
    assert 'Model: "imported"' in summary.stdout and "item 9" in summary.stdout
    assert "Source: m.onnx (ONNX opset 17, written by convserve), imported 20" in summary.stdout


def test_cli_input_options_and_refusals_are_one_line(tmp_path, reference_document):
    doc = dict(reference_document, input={"shape": [28, 28, 1]})  # no preprocessing
    model = Model(doc, random_weights(doc))
    model.save(tmp_path / "plain.safetensors")
    assert (
        run(
            "export", str(tmp_path / "plain.safetensors"), "--onnx", str(tmp_path / "p.onnx")
        ).returncode
        == 0
    )
    out = tmp_path / "scaled.safetensors"
    done = run(
        "import", str(tmp_path / "p.onnx"), "--out", str(out),
        "--input-scale", "1/255", "--input-mean", "0.5", "--input-std", "0.25", "--labels", "a,b,c,d,e,f,g,h,i,j",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scaled = Model.load(out)
    assert scaled.architecture.scale == pytest.approx(1 / 255)
    assert scaled.architecture.mean == (0.5,) and scaled.architecture.std == (0.25,)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
    expected = model.predict(((pixels / 255 - 0.5) / 0.25).astype(np.float32))
    assert np.abs(scaled.predict(pixels) - expected).max() <= TOLERANCE

    # the exported fashion model scales its input already: --input-* would change it
    reference_model_path = tmp_path / "ref.safetensors"
    Model(reference_document, random_weights(reference_document)).save(reference_model_path)
    run("export", str(reference_model_path), "--onnx", str(tmp_path / "ref.onnx"))
    cases = [
        (
            (
                "import",
                str(tmp_path / "ref.onnx"),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--input-scale",
                "2",
            ),
            "already scales",
        ),
        (
            (
                "import",
                str(tmp_path / "p.onnx"),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--labels",
                "a,b",
            ),
            "labels",
        ),
        (
            ("import", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x.safetensors")),
            "cannot read",
        ),
        (
            ("import", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "x.safetensors")),
            "cannot read",
        ),
        (
            ("export", str(tmp_path / "missing.safetensors"), "--onnx", str(tmp_path / "x.onnx")),
            "no such file",
        ),
    ]
    for args, fragment in cases:
        done = run(*args)
        assert done.returncode == 1, (args, done.stdout)
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"convserve {args[0]}: ") and fragment in done.stderr, (
            done.stderr
        )
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.onnx").exists()
