"""The trainer's label smoothing, flag-placed dropout and stochastic weight averaging (SWA), on a
small model and real Fashion-MNIST images: the loss and its gradient against finite differences,
what each flag changes in the run and in the saved file, reproducibility and resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.training import kernels as K
from convserve.core.training.dropout import with_dropout
from convserve.core.training.trainer import TrainConfig, fit

from convserve.cli import main
from tests.reference_numpy import activation as ref_activation
from tests.test_trainer import TINY, data  # noqa: F401  (the module-scoped real-data fixture)
from tests.test_training_gradients import _numeric_gradient

HIDDEN = copy.deepcopy(TINY)  # TINY with a hidden dense layer, so both dropout flags apply
HIDDEN["name"] = "hidden"
HIDDEN["layers"].insert(3, {"type": "dense", "units": 16, "activation": "relu"})
BASE = dict(epochs=2, batch_size=32, lr=1e-2, seed=3)
QUIET = dict(progress=False, log=lambda line: None)


def _flat(model: Model) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for _, v in sorted(model.weights.items())])


def _smoothed_loss(logits, labels, eps):
    dlogits = np.empty_like(logits)
    total, correct = K.softmax_cross_entropy(
        logits, np.ascontiguousarray(labels, np.int64), dlogits, eps
    )
    return total / len(logits), int(correct), dlogits


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.4])
def test_label_smoothing_value_and_gradient_against_finite_differences(eps):
    rng = np.random.default_rng(900)
    logits = rng.normal(size=(7, 6)) * 3
    labels = rng.integers(0, 6, 7)
    loss, correct, grad = _smoothed_loss(logits, labels, eps)
    targets = np.full((7, 6), eps / 6)
    targets[np.arange(7), labels] += 1 - eps
    log_p = np.log(ref_activation(logits, "softmax"))
    assert loss == pytest.approx(-np.mean(np.sum(targets * log_p, axis=1)), rel=1e-12)
    assert correct == int(np.sum(logits.argmax(1) == labels))
    numeric = _numeric_gradient(logits, lambda: _smoothed_loss(logits, labels, eps)[0])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    plain, _, plain_grad = _smoothed_loss(logits, labels, 0.0)
    assert loss != plain and not np.allclose(grad, plain_grad)


def test_dropout_flags_place_layers_and_leave_the_saved_file_as_without_them(data):  # noqa: F811
    trained, origin = with_dropout(HIDDEN, 0.3, 0.2)
    kinds = [(layer["type"], layer.get("rate")) for layer in trained["layers"]]
    assert kinds == [
        ("conv2d", None),
        ("max_pooling2d", None),
        ("flatten", None),
        ("dropout", 0.3),
        ("dense", None),
        ("dropout", 0.2),
        ("dense", None),
    ]
    assert origin == [0, 1, 2, None, 3, None, 4]
    assert with_dropout(HIDDEN, 0.0, 0.0) == (HIDDEN, [0, 1, 2, 3, 4])
    flagged = fit(data, HIDDEN, **QUIET, **BASE, dropout_before_dense=0.3, dropout_after_dense=0.2)
    # the same run as an architecture with those dropout layers written into it
    written = fit(data, trained, **QUIET, **BASE)
    plain = fit(data, HIDDEN, **QUIET, **BASE)
    assert flagged.model.architecture.to_dict() == plain.model.architecture.to_dict()
    assert set(flagged.model.weights) == set(plain.model.weights)
    for name, value in written.model.weights.items():
        index, rest = name.split(".")[1:]
        assert np.array_equal(flagged.model.weights[f"layers.{origin[int(index)]}.{rest}"], value)
    assert not np.array_equal(_flat(plain.model), _flat(flagged.model))
    assert flagged.history[-1]["val_accuracy"] > 0.4  # it still learns (chance 0.10)


def test_swa_saves_the_mean_of_the_epoch_end_weights(data):  # noqa: F811
    constant = dict(BASE, epochs=3)
    ends = [_flat(fit(data, TINY, **QUIET, **{**constant, "epochs": n}).model) for n in (2, 3)]
    swa = fit(data, TINY, **QUIET, **constant, swa_start=2)
    np.testing.assert_allclose(_flat(swa.model), (ends[0] + ends[1]) / 2, rtol=1e-5, atol=1e-6)
    again = fit(data, TINY, **QUIET, **constant, swa_start=2)
    assert np.array_equal(_flat(swa.model), _flat(again.model))
    # validation after epoch 1 (before averaging) is the plain run's; after epoch 3 the average's
    plain = fit(data, TINY, **QUIET, **constant)
    assert swa.history[0]["val_loss"] == plain.history[0]["val_loss"]
    assert swa.history[-1]["val_loss"] != plain.history[-1]["val_loss"]


def test_resume_continues_swa_and_label_smoothing(data, tmp_path):  # noqa: F811
    settings = dict(BASE, epochs=3, swa_start=1, label_smoothing=0.1, flip=True)
    straight = fit(data, TINY, tmp_path / "a.safetensors", **QUIET, **settings)
    one = fit(data, TINY, tmp_path / "b.safetensors", **QUIET, **{**settings, "epochs": 2})
    resumed = fit(data, None, tmp_path / "b.safetensors", resume=one.checkpoint, **QUIET, epochs=3)
    assert np.array_equal(_flat(straight.model), _flat(resumed.model))
    unsmoothed = fit(data, TINY, **QUIET, **{**settings, "label_smoothing": 0.0})
    assert not np.array_equal(_flat(straight.model), _flat(unsmoothed.model))
    # the reported training loss is the smoothed one: higher than the plain loss at a confident fit
    assert straight.history[-1]["loss"] > unsmoothed.history[-1]["loss"]


def test_command_line_flags_reach_the_trainer(data, tmp_path, capsys):  # noqa: F811
    np.savez(tmp_path / "d.npz", x_train=data.x_train[:, :, :, 0], y_train=data.y_train)
    out = tmp_path / "m.safetensors"
    args = ["train", "--data", str(tmp_path / "d.npz"), "--architecture", "fashion_mnist",
            "--out", str(out), "--epochs", "2", "--seed", "4", "--no-plot", "--quiet",
            "--label-smoothing", "0.1", "--dropout-before-dense", "0.4",
            "--dropout-after-dense", "0.2", "--swa-start", "1", "--schedule", "cosine"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    model = Model.load(out)
    assert [layer["type"] for layer in model.architecture.to_dict()["layers"]] == [
        "conv2d", "max_pooling2d", "conv2d", "max_pooling2d", "flatten", "dense", "dense"
    ]  # fmt: skip
    config = TrainConfig(**_checkpoint_config(out))
    assert (config.label_smoothing, config.dropout_before_dense) == (0.1, 0.4)
    assert (config.dropout_after_dense, config.swa_start) == (0.2, 1)
    assert main([*args[:-4], "--swa-start", "3"]) == 1
    assert "swa_start must be an epoch in 1..2" in capsys.readouterr().err


def _checkpoint_config(out):
    from convserve.core.training.checkpoint import load_checkpoint

    _, _, state = load_checkpoint(out.with_name("m.checkpoint.safetensors"))
    return state["config"]


def test_bad_settings_are_refused(data):  # noqa: F811
    with pytest.raises(ModelError, match="label_smoothing must be"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(ModelError, match="dropout_before_dense must be"):
        TrainConfig(dropout_before_dense=-0.1)
    with pytest.raises(ModelError, match="one weight average"):
        TrainConfig(ema=0.99, swa_start=1)
    with pytest.raises(ModelError, match="swa_start must be an epoch"):
        TrainConfig(epochs=5, swa_start=6)
    no_dense = copy.deepcopy(TINY)
    no_dense["layers"] = no_dense["layers"][:2] + [
        {"type": "conv2d", "filters": 10, "kernel_size": [6, 6]},
        {"type": "flatten"},
        {"type": "activation", "activation": "softmax"},
    ]
    with pytest.raises(ModelError, match="need a dense layer"):
        fit(data, no_dense, **QUIET, **BASE, dropout_after_dense=0.2)
