"""`convserve evaluate` and `convserve visualize` on the bundled model and real Fashion-MNIST
images, and `Model.activations` against an independent NumPy forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.datasets import load_dataset
from PIL import Image

from convserve.cli import main
from tests.reference_numpy import forward
from tests.test_bundled_model import BUNDLED


@pytest.fixture(scope="module")
def model():
    return Model.load(BUNDLED)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """600 real test images as an .npz (a dataset spec the trainer reads)."""
    full = load_dataset("fashion-mnist")
    path = tmp_path_factory.mktemp("data") / "subset.npz"
    np.savez(path, x_train=full.x_train[:50], y_train=full.y_train[:50],
             x_test=full.x_test[:600], y_test=full.y_test[:600])  # fmt: skip
    return path, full.x_test[:600], full.y_test[:600]


def test_evaluate_json_matches_an_independent_computation(model, subset, tmp_path, capsys):
    path, x, y = subset
    heat = tmp_path / "confusion.png"
    code = main(["evaluate", str(BUNDLED), "--data", str(path), "--batch-size", "64", "--json",
                 "--confusion-matrix", str(heat)])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # independent: the NumPy reference forward pass, not the Numba kernels
    predicted = forward(model.architecture.to_dict(), model.weights, x, preprocess=True).argmax(
        axis=1
    )
    assert report["images"] == 600 and report["split"] == "test"
    assert report["accuracy"] == pytest.approx(float(np.mean(predicted == y)), abs=1e-12)
    for k, row in enumerate(report["classes"]):
        tp = np.sum((predicted == k) & (y == k))
        assert row["support"] == int(np.sum(y == k))
        assert row["precision"] == pytest.approx(tp / max(np.sum(predicted == k), 1))
        assert row["recall"] == pytest.approx(tp / max(np.sum(y == k), 1))
    assert np.trace(np.array(report["confusion_matrix"])) == int(np.sum(predicted == y))
    assert report["images_per_second"] > 0
    assert heat.stat().st_size > 10_000 and heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_text_report_and_train_split(subset, capsys):
    path, _, _ = subset
    assert main(["evaluate", str(BUNDLED), "--data", str(path), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "(train): 50 images" in out.splitlines()[0]
    for needle in ("accuracy", "precision", "recall", "f1", "Ankle boot", "confusion matrix",
                   "images/s"):  # fmt: skip
        assert needle in out


def test_evaluate_errors_are_one_line(subset, tmp_path, capsys):
    path, _, _ = subset
    only_train = tmp_path / "train_only.npz"
    np.savez(only_train, x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.zeros(3, np.int64))
    assert main(["evaluate", str(BUNDLED), "--data", str(only_train), "--split", "test"]) == 1
    assert "has no test split" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.safetensors"), "--data", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_evaluate_an_image_folder_maps_classes_by_name(model, tmp_path, capsys, monkeypatch):
    full = load_dataset("fashion-mnist")
    root = tmp_path / "photos"
    names = ["Trouser", "Bag"]  # two of the model's classes, in folders
    for name in names:
        (root / name).mkdir(parents=True)
        label = model.labels.index(name)
        for i, image in enumerate(full.x_test[full.y_test == label][:20]):
            Image.fromarray(image[..., 0]).save(root / name / f"{i}.png")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["evaluate", str(BUNDLED), "--data", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "train" and report["images"] == 40
    supports = {row["label"]: row["support"] for row in report["classes"]}
    assert supports["Trouser"] == 20 and supports["Bag"] == 20
    assert report["accuracy"] > 0.9


def test_activations_match_a_reference_and_leave_predict_alone(model):
    x = load_dataset("fashion-mnist").x_test[:3]
    before = model.predict(x)
    outputs = model.activations(x)
    assert sorted(outputs) == list(range(len(model.architecture.layers)))
    for layer in model.architecture.layers:
        assert outputs[layer.index].shape == (3, *layer.output_shape)
        doc = dict(model.architecture.to_dict())
        doc["layers"] = doc["layers"][: layer.index + 1]
        expected = forward(doc, model.weights, x, preprocess=True)
        np.testing.assert_allclose(outputs[layer.index], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs[len(outputs) - 1], before, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.predict(x), before)
    one = model.activations(x[0], [0])
    np.testing.assert_allclose(one[0][0], outputs[0][0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ModelError, match="outside 0-6"):
        model.activations(x, [7])


def test_visualize_writes_a_png(model, tmp_path, capsys):
    full = load_dataset("fashion-mnist")
    image = tmp_path / "boot.png"
    Image.fromarray(full.x_test[0][..., 0]).convert("RGB").resize((56, 56)).save(image)
    out = tmp_path / "inside.png"
    assert main(["visualize", str(BUNDLED), str(image), "--out", str(out)]) == 0
    assert out.stat().st_size > 50_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = tmp_path / "layer2.png"
    assert main(["visualize", str(BUNDLED), str(image), "--out", str(one), "--layer", "2"]) == 0
    assert 10_000 < one.stat().st_size < out.stat().st_size
    capsys.readouterr()
    assert main(["visualize", str(BUNDLED), str(image), "--out", str(one), "--layer", "5"]) == 1
    assert "choose a layer with feature maps: [0, 1, 2, 3]" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["visualize", str(BUNDLED), str(tmp_path / "bad.png"), "--out", str(one)]) == 1
    assert "not a readable image" in capsys.readouterr().err


def test_plot_commands_name_the_extra_without_matplotlib(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code = main(
        ["visualize", str(BUNDLED), str(tmp_path / "x.png"), "--out", str(tmp_path / "o.png")]
    )
    assert code == 1
    assert "pip install 'convserve[plot]'" in capsys.readouterr().err
    code = main(["evaluate", str(BUNDLED), "--data", "fashion-mnist",
                 "--confusion-matrix", str(tmp_path / "c.png")])  # fmt: skip
    assert code == 1 and "convserve[plot]" in capsys.readouterr().err
