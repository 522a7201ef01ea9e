"""The trainer's random shifts and weight averaging: what they do to a batch, that a run with
them is bit-for-bit reproducible, and that a resumed run continues the average."""

from __future__ import annotations

import numpy as np
import pytest
from convserve.core import ModelError
from convserve.core.training.augment import random_shift
from convserve.core.training.trainer import TrainConfig, fit

from tests.test_trainer import TINY, data  # noqa: F401  (the module-scoped real-data fixture)

AUGMENTED = dict(epochs=2, batch_size=32, lr=1e-2, seed=7, flip=True, shift=2, ema=0.9)


def _flat(result):
    return np.concatenate([v.reshape(-1) for _, v in sorted(result.model.weights.items())])


def test_random_shift_moves_each_image_within_the_bound_and_fills_zeros():
    x = np.zeros((200, 9, 9, 1), np.float32)
    x[:, 4, 4, 0] = 1.0  # one bright pixel in the middle
    shifted = random_shift(x, np.random.default_rng(0), 2)
    assert shifted.shape == x.shape and shifted.flags.c_contiguous
    rows, cols = np.nonzero(shifted[..., 0].reshape(200, 9, 9).sum(axis=0))
    assert np.all(np.abs(rows - 4) <= 2) and np.all(np.abs(cols - 4) <= 2)
    moves = {tuple(np.argwhere(img[..., 0] == 1.0)[0]) for img in shifted}
    assert len(moves) == 25  # every offset in [-2, 2] x [-2, 2] occurs among 200 images
    assert np.all(shifted.sum(axis=(1, 2, 3)) == 1.0)
    edge = np.ones((1, 5, 5, 1), np.float32)
    assert random_shift(edge, np.random.default_rng(3), 2).sum() <= 25


def test_shift_and_ema_runs_are_bit_identical_and_differ_from_plain(data):  # noqa: F811
    quiet = dict(progress=False, log=lambda line: None)
    first = fit(data, TINY, **quiet, **AUGMENTED)
    second = fit(data, TINY, **quiet, **AUGMENTED)
    assert np.array_equal(_flat(first), _flat(second))
    assert first.history == [
        {**h, "seconds": first.history[i]["seconds"],
         "images_per_second": first.history[i]["images_per_second"]}
        for i, h in enumerate(second.history)
    ]  # fmt: skip
    plain = fit(data, TINY, **quiet, **{**AUGMENTED, "ema": 0.0})
    assert not np.array_equal(_flat(first), _flat(plain))
    assert first.history[-1]["val_accuracy"] > 0.4  # it still learns (chance 0.10)


def test_resume_continues_the_weight_average(data, tmp_path):  # noqa: F811
    quiet = dict(progress=False, log=lambda line: None)
    straight = fit(data, TINY, tmp_path / "a.safetensors", **quiet, **AUGMENTED)
    one = fit(data, TINY, tmp_path / "b.safetensors", **quiet, **{**AUGMENTED, "epochs": 1})
    resumed = fit(data, None, tmp_path / "b.safetensors", resume=one.checkpoint, **quiet, epochs=2)
    assert np.array_equal(_flat(straight), _flat(resumed))


def test_bad_settings_are_refused():
    with pytest.raises(ModelError, match="shift must be"):
        TrainConfig(shift=-1)
    with pytest.raises(ModelError, match="ema must be"):
        TrainConfig(ema=1.0)
