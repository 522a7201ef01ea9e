"""Softmax cross-entropy, fused: one pass gives the loss, the accuracy and dL/dlogits."""

from __future__ import annotations

import numpy as np
from convserve.core.training import kernels as K


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Mean loss over the batch, number of correct argmax predictions, and d(mean loss)/d(logits)."""
    logits = np.ascontiguousarray(logits)
    dlogits = np.empty_like(logits)
    total, correct = K.softmax_cross_entropy(
        logits, np.ascontiguousarray(labels, np.int64), dlogits
    )
    return total / len(logits), int(correct), dlogits
