"""The trainer end to end on a tiny model and a few hundred real Fashion-MNIST images:
learning, saved model, reproducibility, checkpoints, resume, Ctrl-C, reports, command line."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.datasets import Dataset, load_dataset
from convserve.core.presets import FASHION_MNIST_LABELS
from convserve.core.training import checkpoint as checkpoint_module
from convserve.core.training.checkpoint import load_checkpoint
from convserve.core.training.network import Network
from convserve.core.training.trainer import TrainConfig, TrainingInterrupted, fit

from convserve.cli import main

TINY = {
    "name": "tiny",
    "input": {"shape": [28, 28, 1], "scale": 1 / 255},
    "labels": FASHION_MNIST_LABELS,
    "layers": [
        {
            "type": "conv2d",
            "filters": 4,
            "kernel_size": [3, 3],
            "strides": [2, 2],
            "activation": "relu",
        },
        {"type": "max_pooling2d", "pool_size": [2, 2]},
        {"type": "flatten"},
        {"type": "dense", "units": 10, "activation": "softmax"},
    ],
}


def quiet_fit(*args, **kwargs):
    """`fit` without the progress bar and log lines."""
    return fit(*args, progress=False, log=lambda line: None, **kwargs)


SETTINGS = dict(epochs=3, batch_size=32, lr=1e-2, seed=5)


@pytest.fixture(scope="module")
def data():
    full = load_dataset("fashion-mnist")
    return Dataset(
        full.x_train[:384],
        full.y_train[:384],
        full.x_test[:128],
        full.y_test[:128],
        source="fashion-mnist",
    )


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model.safetensors"
    result = quiet_fit(data, TINY, out, **SETTINGS)
    return out, result


def _weights(result):
    return np.concatenate([v.reshape(-1) for _, v in sorted(result.model.weights.items())])


def test_learns_and_writes_everything(trained, data):
    out, result = trained
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.5  # chance is 0.10
    assert all(h["seconds"] > 0 and h["images_per_second"] > 0 for h in history)
    assert out.is_file()
    assert out.with_name("model.checkpoint.safetensors").is_file()
    csv_lines = out.with_name("model.history.csv").read_text().splitlines()
    assert (
        csv_lines[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(csv_lines) == 4
    )
    assert out.with_name("model.history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [
        p for p in out.parent.iterdir() if p.name.startswith(".")
    ]  # no temporary files left


def test_saved_model_gives_the_measured_predictions(trained, data):
    out, result = trained
    model = Model.load(out)
    predictions = model.predict(data.x_test).argmax(axis=1)
    assert np.array_equal(predictions, result.val_predictions)
    assert np.mean(predictions == data.y_test) == pytest.approx(result.history[-1]["val_accuracy"])
    confusion = result.confusion
    assert confusion.sum() == len(data.y_test)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(
        result.history[-1]["val_accuracy"]
    )
    assert np.array_equal(confusion.sum(axis=1), np.bincount(data.y_test, minlength=10))


def test_same_seed_gives_bit_identical_weights(trained, data):
    _, first = trained
    again = quiet_fit(data, TINY, **SETTINGS)
    assert np.array_equal(_weights(again), _weights(first))
    assert again.history[-1]["loss"] == first.history[-1]["loss"]
    other = quiet_fit(data, TINY, **{**SETTINGS, "seed": 6})
    assert not np.array_equal(_weights(other), _weights(first))


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(trained, data, tmp_path):
    _, full = trained
    ckpt = tmp_path / "c.safetensors"
    quiet_fit(data, TINY, checkpoint=ckpt, **{**SETTINGS, "epochs": 2})
    _, tensors, state = load_checkpoint(ckpt)
    assert (
        state["epoch"] == 2
        and state["step"] == 0
        and set(tensors) == {"params", "adam.m", "adam.v"}
    )
    resumed = quiet_fit(data, resume=ckpt, epochs=3)
    assert np.array_equal(_weights(resumed), _weights(full))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(
    trained, data, tmp_path, monkeypatch
):
    _, full = trained
    ckpt = tmp_path / "c.safetensors"
    calls = {"n": 0}
    original = Network.loss_and_grad

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 17:  # epoch 2, step 5 (12 steps per epoch)
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Network, "loss_and_grad", interrupting)
    previous = signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # as in an interactive shell
    try:
        with pytest.raises(TrainingInterrupted) as info:
            quiet_fit(data, TINY, checkpoint=ckpt, **SETTINGS)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.checkpoint == ckpt and "--resume" in str(info.value)
    monkeypatch.setattr(Network, "loss_and_grad", original)
    _, _, state = load_checkpoint(ckpt)
    assert (state["epoch"], state["step"]) == (1, 5)
    resumed = quiet_fit(data, resume=ckpt)
    assert np.array_equal(_weights(resumed), _weights(full))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_checkpoint_writes_are_atomic(data, tmp_path, monkeypatch):
    ckpt = tmp_path / "c.safetensors"
    quiet_fit(data, TINY, checkpoint=ckpt, **{**SETTINGS, "epochs": 1})
    before = ckpt.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        quiet_fit(data, TINY, checkpoint=ckpt, **{**SETTINGS, "epochs": 1, "seed": 9})
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_bad_checkpoint_and_mismatched_architecture(data, tmp_path, trained):
    out, _ = trained
    with pytest.raises(ModelError, match="expected 'convserve-checkpoint/1'"):
        quiet_fit(data, resume=out)  # a model file, not a checkpoint
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelError, match="junk.safetensors"):
        quiet_fit(data, resume=tmp_path / "junk.safetensors")
    ckpt = out.with_name("model.checkpoint.safetensors")
    with pytest.raises(ModelError, match="architecture differs"):
        quiet_fit(data, "lenet5", resume=ckpt)


def test_sgd_nesterov_step_schedule_dropout_flip_and_validation_split(data, tmp_path):
    doc = json.loads(json.dumps(TINY))
    doc["layers"].insert(2, {"type": "dropout", "rate": 0.2})
    no_test = Dataset(data.x_train, data.y_train, source="subset")
    config = TrainConfig(
        epochs=3,
        batch_size=32,
        optimizer="sgd",
        lr=0.05,
        nesterov=True,
        weight_decay=1e-4,
        schedule="step",
        step_epochs=2,
        gamma=0.1,
        flip=True,
        seed=1,
        validation_split=0.25,
    )
    result = quiet_fit(no_test, doc, history_path=tmp_path / "h.json", config=config)
    history = json.loads((tmp_path / "h.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.05, 0.005])
    assert history[-1]["loss"] < history[0]["loss"]
    assert result.confusion.sum() == 96  # 25 % of 384 held out
    again = quiet_fit(no_test, doc, config=config)
    assert np.array_equal(_weights(again), _weights(result))


def test_command_line_end_to_end(data, tmp_path, capsys):
    np.savez(
        tmp_path / "d.npz",
        x_train=data.x_train[:, :, :, 0],
        y_train=data.y_train,
        x_test=data.x_test[:, :, :, 0],
        y_test=data.y_test,
    )
    (tmp_path / "arch.json").write_text(json.dumps(TINY))
    out = tmp_path / "m.safetensors"
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "d.npz"),
            "--architecture",
            str(tmp_path / "arch.json"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "0.003",
            "--seed",
            "2",
            "--schedule",
            "cosine",
            "--history",
            str(tmp_path / "h.csv"),
            "--no-plot",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (
        "epoch 2/2: loss" in captured.out
        and "val_accuracy" in captured.out
        and " s (" in captured.out
    )
    assert "confusion matrix" in captured.out
    assert "epoch 1/2" in captured.err  # the progress bar
    assert Model.load(out).name == "tiny"
    assert not (tmp_path / "m.history.png").exists()
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "d.npz"),
            "--architecture",
            "nonexistent.json",
            "--out",
            str(out),
        ]
    )
    assert (
        code == 1 and "convserve train: architecture 'nonexistent.json'" in capsys.readouterr().err
    )
