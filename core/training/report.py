"""Training reports: history as CSV or JSON, loss/accuracy curves as PNG, a confusion matrix."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.modelfile import atomic_write

HISTORY_FIELDS = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "images_per_second",
)


def write_history(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """`.json` writes a list of per-epoch objects; anything else writes CSV with a header."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        payload = json.dumps(history, indent=1).encode()
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        payload = buffer.getvalue().encode()
    atomic_write(path, payload)


def plot_history(path: str | os.PathLike, history: list[dict[str, Any]], title: str = "") -> None:
    """Two panels, loss and accuracy per epoch, for training and validation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'convserve[plot]'") from exc
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], "o-", label=f"training {label}")
        if any(h.get(f"val_{key}") is not None for h in history):
            ax.plot(
                epochs, [h.get(f"val_{key}") for h in history], "s-", label=f"validation {label}"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), np.int64)
    np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return counts


def format_confusion(counts: np.ndarray, names: list[str] | tuple[str, ...]) -> str:
    """A text table: rows are true classes, columns predicted (numbered), with per-class recall."""
    width = max(5, len(str(int(counts.max()))) + 1)
    name_width = max(len(n) for n in names) + 4
    header = " " * name_width + "".join(f"{j:>{width}}" for j in range(len(names))) + "  recall"
    lines = ["confusion matrix (rows: true class, columns: predicted class)", header]
    for i, name in enumerate(names):
        total = counts[i].sum()
        recall = counts[i, i] / total if total else 0.0
        row = "".join(f"{int(v):>{width}}" for v in counts[i])
        lines.append(f"{i:>2} {name:<{name_width - 3}}{row}  {recall:6.1%}")
    return "\n".join(lines)
