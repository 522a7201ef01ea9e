"""Activation functions: their names in the architecture JSON and the integer codes every
kernel (inference and training) takes. Defined here once; no numba."""

from __future__ import annotations

ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "softmax")
LINEAR, RELU, TANH, SIGMOID, SOFTMAX = range(len(ACTIVATIONS))
CODES: dict[str, int] = {name: code for code, name in enumerate(ACTIVATIONS)}
# Monotonic activations commute with max pooling (pool first, activate the pooled value).
MONOTONIC = frozenset({LINEAR, RELU, TANH, SIGMOID})
