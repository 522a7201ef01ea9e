"""The importer's padding decisions against direct 1-D references on randomized sizes.

An ONNX window (explicit begin/end pads, ceil_mode) is computed literally; when
`resolve_window` maps it to our `valid`/`same` (with a zero-extended kernel for convolutions),
our TF-style arithmetic must give the same numbers."""

from __future__ import annotations

import numpy as np
from convserve.core.interop.builder import resolve_window, tf_window


def onnx_conv(x, w, s, begin, end):
    xp = np.concatenate([np.zeros(begin), x, np.zeros(end)])
    count = (len(xp) - len(w)) // s + 1
    return np.array([xp[i * s : i * s + len(w)] @ w for i in range(max(count, 0))])


def onnx_max(x, k, s, begin, end, ceil_mode):
    xp = np.concatenate([np.full(begin, -np.inf), x, np.full(end, -np.inf)])
    span = len(xp) - k
    count = -(-span // s) + 1 if ceil_mode else span // s + 1
    if ceil_mode and (count - 1) * s >= len(x) + begin:
        count -= 1
    return np.array([xp[i * s : i * s + k].max() for i in range(count)])  # overhang ignored


def ours_conv(x, w, s, padding):
    begin, out = tf_window(len(x), len(w), s, padding)
    xp = np.concatenate([np.zeros(begin), x, np.zeros(len(w) + s * out)])
    return np.array([xp[i * s : i * s + len(w)] @ w for i in range(out)])


def ours_max(x, k, s, padding):
    begin, out = tf_window(len(x), k, s, padding)
    xp = np.concatenate([np.full(begin, -np.inf), x, np.full(k + s * out, -np.inf)])
    return np.array([xp[i * s : i * s + k].max() for i in range(out)])


def test_resolved_windows_compute_what_onnx_computes():
    rng = np.random.default_rng(0)
    resolved = {"conv": 0, "grown": 0, "pool": 0}
    for _ in range(3000):
        n, k, s = int(rng.integers(1, 20)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
        begin, end = int(rng.integers(0, k)), int(rng.integers(0, k))
        if n + begin + end < k:
            continue
        x = rng.standard_normal(n)
        w = rng.standard_normal(k)
        conv = resolve_window((n, 1), (k, 1), (s, 1), (begin, end, 0, 0), grow=True)
        if conv is not None:
            grown = np.concatenate([w, np.zeros(conv.size[0] - k)])
            np.testing.assert_allclose(
                ours_conv(x, grown, s, conv.padding), onnx_conv(x, w, s, begin, end), atol=1e-12
            )
            resolved["conv"] += 1
            resolved["grown"] += conv.size[0] > k
        ceil_mode = bool(rng.integers(0, 2))
        pool = resolve_window((n, 1), (k, 1), (s, 1), (begin, end, 0, 0), ceil_mode=ceil_mode)
        if pool is not None and begin < k:
            assert pool.size == (k, 1)
            np.testing.assert_array_equal(
                ours_max(x, k, s, pool.padding), onnx_max(x, k, s, begin, end, ceil_mode)
            )
            resolved["pool"] += 1
    # the common cases resolve; growing the kernel covers begin pads TF would not choose
    assert min(resolved.values()) > 100, resolved


def test_pytorch_stride2_pad1_on_even_input_is_a_grown_same_kernel():
    window = resolve_window((28, 28), (3, 3), (2, 2), (1, 1, 1, 1), grow=True)
    assert window is not None and window.padding == "same" and window.size == (4, 4)
    assert window.out == (14, 14)
    assert resolve_window((28, 28), (3, 3), (2, 2), (1, 1, 1, 1)) is None  # pools cannot grow
    assert resolve_window((27, 27), (3, 3), (2, 2), (1, 1, 1, 1)).size == (3, 3)
