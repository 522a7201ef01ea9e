"""Training-time augmentation of preprocessed NHWC batches: random horizontal flips and random
shifts (pad with zeros, crop back at a random offset). Every draw comes from the caller's seeded
generator, so a run is reproducible."""

from __future__ import annotations

import numpy as np


def random_flip(x: np.ndarray, rng: np.random.Generator) -> None:
    """Mirror about half the images left-right, in place."""
    flipped = rng.random(len(x)) < 0.5
    x[flipped] = x[flipped, :, ::-1]


def random_shift(x: np.ndarray, rng: np.random.Generator, pixels: int) -> np.ndarray:
    """Each image moved by up to `pixels` rows and columns (independently, uniformly), the
    uncovered border filled with 0: the preprocessed value of a mean-valued pixel."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)))
    top = rng.integers(0, 2 * pixels + 1, n)
    left = rng.integers(0, 2 * pixels + 1, n)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    return np.ascontiguousarray(padded[np.arange(n)[:, None, None], rows, cols])
