"""The bundled default model: trained by our trainer, it classifies the 10,000 real
Fashion-MNIST test images with the accuracy models/fashion_mnist/TRAINING.md reports (93.11 %)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from convserve.core import Model
from convserve.core.datasets import load_dataset

BUNDLED = (
    Path(__file__).resolve().parents[1] / "models" / "fashion_mnist" / "1" / "model.safetensors"
)


def test_bundled_model_accuracy_on_the_real_test_set():
    model = Model.load(BUNDLED)
    assert (
        model.name == "fashion_mnist"
        and model.input_shape == (28, 28, 1)
        and model.num_classes == 10
    )
    test = load_dataset("fashion-mnist")
    predictions = np.concatenate(
        [
            model.predict(test.x_test[i : i + 1000]).argmax(axis=1)
            for i in range(0, len(test.x_test), 1000)
        ]
    )
    accuracy = float(np.mean(predictions == test.y_test))
    # the shipped file's true figure: 9,311 of 10,000 (TRAINING.md)
    assert accuracy >= 0.9311, f"bundled model accuracy {accuracy:.4f} on the 10,000 test images"
