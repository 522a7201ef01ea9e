"""Evaluate a model on a labelled dataset: accuracy, per-class precision/recall/F1, the confusion
matrix and throughput, as text for people and JSON for scripts (`convserve evaluate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from convserve.core.datasets import DataError, Dataset
from convserve.core.model import Model
from convserve.core.training.report import confusion_matrix, format_confusion


@dataclass
class Evaluation:
    """Counts[true, predicted] over `labels`, and the time the predictions took."""

    labels: list[str]
    confusion: np.ndarray
    seconds: float
    batch_size: int
    split: str = ""
    source: str = ""

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.images, 1))

    def per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F1, support) per class; 0 where a ratio has nothing to divide."""
        hits = np.diag(self.confusion).astype(np.float64)
        predicted, support = self.confusion.sum(axis=0), self.confusion.sum(axis=1)
        precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
        recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
        total = precision + recall
        f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
        return precision, recall, f1, support

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        precision, recall, f1, support = self.per_class()
        return {
            "source": self.source,
            "split": self.split,
            "images": self.images,
            "accuracy": self.accuracy,
            "classes": [
                {
                    "label": label,
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, label in enumerate(self.labels)
            ],
            "confusion_matrix": self.confusion.tolist(),
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "batch_size": self.batch_size,
        }

    def format(self) -> str:
        precision, recall, f1, support = self.per_class()
        width = max(12, *(len(label) for label in self.labels)) + 4
        lines = [
            f"{self.source} ({self.split}): {self.images:,} images",
            f"accuracy {self.accuracy:.2%} ({int(np.trace(self.confusion)):,} / {self.images:,})",
            "",
            f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
        ]
        for i, label in enumerate(self.labels):
            lines.append(
                f"{i:>2} {label:<{width - 3}}{precision[i]:>10.4f}{recall[i]:>10.4f}"
                f"{f1[i]:>10.4f}{int(support[i]):>10,}"
            )
        lines.append(
            f"{'macro average':<{width}}{precision.mean():>10.4f}{recall.mean():>10.4f}"
            f"{f1.mean():>10.4f}{self.images:>10,}"
        )
        lines += ["", format_confusion(self.confusion, self.labels), ""]
        lines.append(
            f"throughput: {self.images_per_second:,.0f} images/s "
            f"({self.seconds:.3f} s, batch size {self.batch_size})"
        )
        return "\n".join(lines)


def select_split(dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The images and labels of `split` (test, val or train; `auto`: test, else val, else train)."""
    parts = {
        "test": (dataset.x_test, dataset.y_test),
        "val": (dataset.x_val, dataset.y_val),
        "train": (dataset.x_train, dataset.y_train),
    }
    if split == "auto":
        split = next(name for name, (x, _) in parts.items() if x is not None)
    if split not in parts:
        raise DataError(f"unknown split {split!r}; choose test, val or train")
    x, y = parts[split]
    if x is None:
        have = ", ".join(name for name, (v, _) in parts.items() if v is not None)
        raise DataError(f"{dataset.source}: has no {split} split (it has: {have})")
    return x, y, split


def labels_for_model(dataset: Dataset, y: np.ndarray, model: Model) -> np.ndarray:
    """Map the data's class numbers to the model's: by name when the data names its classes."""
    names = dataset.class_names
    if names is None or names == model.labels:
        return y
    missing = [name for name in names if name not in model.labels]
    if missing:
        raise DataError(
            f"{dataset.source}: class folder(s) {missing} are not among the model's labels {model.labels}"
        )
    return np.array([model.labels.index(name) for name in names], np.int64)[y]


def evaluate_model(
    model: Model, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> Evaluation:
    """Predict every image in batches of `batch_size`; time only the predictions."""
    if len(images) == 0:
        raise DataError("nothing to evaluate: the split is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= model.num_classes:
        raise DataError(
            f"label {low if low < 0 else high} is outside the model's classes 0-{model.num_classes - 1}"
        )
    model.predict(images[:1])  # compile or load the kernels outside the timing
    predictions = np.empty(len(images), np.int64)
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        scores = model.predict(images[start : start + batch_size])
        predictions[start : start + len(scores)] = scores.argmax(axis=1)
    seconds = time.perf_counter() - started
    confusion = confusion_matrix(labels, predictions, model.num_classes)
    return Evaluation(model.labels, confusion, seconds, batch_size)
