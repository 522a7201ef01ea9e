"""Layer-path benchmark: how fast each convolution variant runs for the same work.

    python -m convserve.core.bench_layers [--batch 32] [--repeats 3]

Times single convolution layers (64 filters over a 32-channel input) through the plan's own
kernel calls: the fused direct path (3x3 'valid' + 2x2 max pool, one kernel), the Winograd
path, and the variants that take other paths ('same' padding, stride 2, 5x5, average pooling,
no pooling). Every layer's time covers all the steps it needs (padding copy, convolution,
separate pooling) and is divided by its multiply-adds as a direct convolution computes them, so
"ns per 1,000 MACs" compares equal work. Each variant runs in its own process (`--repeats`
times, alternating); the table shows medians and the ratio to the fused direct path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

# name: (input h, w, conv layer options, pooling layer or None, use Winograd)
VARIANTS: dict[str, tuple[int, int, dict[str, Any], dict[str, Any] | None, bool]] = {
    "3x3 valid + max pool (fused, direct)": (
        30,
        30,
        {"kernel_size": 3},
        {"type": "max_pooling2d"},
        False,
    ),
    "3x3 valid + max pool (Winograd)": (
        30,
        30,
        {"kernel_size": 3},
        {"type": "max_pooling2d"},
        True,
    ),
    "3x3 same + max pool (Winograd)": (
        28,
        28,
        {"kernel_size": 3, "padding": "same"},
        {"type": "max_pooling2d"},
        True,
    ),
    "3x3 valid, no pool (Winograd)": (30, 30, {"kernel_size": 3}, None, True),
    "3x3 valid, no pool (direct)": (30, 30, {"kernel_size": 3}, None, False),
    "3x3 same + max pool (direct)": (
        28,
        28,
        {"kernel_size": 3, "padding": "same"},
        {"type": "max_pooling2d"},
        False,
    ),
    "3x3 stride 2": (57, 57, {"kernel_size": 3, "strides": 2}, None, True),
    "5x5 valid + max pool": (32, 32, {"kernel_size": 5}, {"type": "max_pooling2d"}, True),
    "5x5 valid + max pool (direct)": (
        32,
        32,
        {"kernel_size": 5},
        {"type": "max_pooling2d"},
        False,
    ),
    "5x5 same + max pool": (
        28,
        28,
        {"kernel_size": 5, "padding": "same"},
        {"type": "max_pooling2d"},
        True,
    ),
    "5x5 same + max pool (direct)": (
        28,
        28,
        {"kernel_size": 5, "padding": "same"},
        {"type": "max_pooling2d"},
        False,
    ),
    "3x3 valid + average pool": (30, 30, {"kernel_size": 3}, {"type": "average_pooling2d"}, True),
    "3x3 valid + average pool (direct)": (
        30,
        30,
        {"kernel_size": 3},
        {"type": "average_pooling2d"},
        False,
    ),
}
CHANNELS, FILTERS = 32, 64


def _document(name: str) -> dict[str, Any]:
    h, w, conv, pool, _ = VARIANTS[name]
    layers = [{"type": "conv2d", "filters": FILTERS, "activation": "relu", **conv}]
    if pool:
        layers.append({**pool, "pool_size": 2})
    layers += [{"type": "flatten"}, {"type": "dense", "units": 2}]
    return {
        "name": "layer",
        "input": {"shape": [h, w, CHANNELS]},
        "labels": ["a", "b"],
        "layers": layers,
    }


def worker(name: str, batch: int) -> dict[str, Any]:
    """ns per 1,000 direct multiply-adds of the variant's conv (and pooling) steps."""
    from convserve.core.architecture import parse_architecture
    from convserve.core.bench import random_weights
    from convserve.core.inference import bind_args
    from convserve.core.layers.dense import DenseChainStep, DenseStep
    from convserve.core.model import Model

    doc = _document(name)
    arch = parse_architecture(doc)
    model = Model(doc, random_weights(doc), winograd=VARIANTS[name][4])
    plan = model._plan
    x = np.random.default_rng(0).standard_normal((batch, *arch.input_shape)).astype(np.float32)
    plan.run(x)
    calls, result_shape, *_ = plan._programs[(batch, False, plan._threads_now())]
    result = np.empty(result_shape, np.float32)
    conv = arch.layers[0]
    oh, ow, _ = conv.output_shape
    macs = batch * oh * ow * FILTERS * conv.kernel_size[0] * conv.kernel_size[1] * CHANNELS
    dense_steps = sum(1 for s in plan.steps if isinstance(s, (DenseStep, DenseChainStep)))
    timed = calls[
        : len(calls) - dense_steps
    ]  # padding copy, conv, separate pool: not the dense head
    rounds = []
    for _ in range(9):
        start = time.perf_counter()
        reps = 20
        for _ in range(reps):
            for call in timed:
                call[0](*bind_args(call, x, result))
        rounds.append((time.perf_counter() - start) / reps)
    seconds = statistics.median(rounds)
    return {
        "ns_per_kmac": seconds * 1e12 / macs,
        "steps": [getattr(c[0], "__name__", "?") for c in timed],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convserve.core.bench_layers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="worker processes per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch)))
        return 0
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    steps: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        for name in VARIANTS:
            cmd = [
                sys.executable,
                "-m",
                "convserve.core.bench_layers",
                "--worker",
                name,
                "--batch",
                str(args.batch),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"worker for {name!r} failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(res["ns_per_kmac"])
            steps[name] = res["steps"]
        print(f"  round {rep + 1} of {args.repeats} done", flush=True)
    base = statistics.median(results["3x3 valid + max pool (fused, direct)"])
    print(
        f"\nbatch {args.batch}, {CHANNELS} input channels, {FILTERS} filters; median of {args.repeats} processes\n"
    )
    print("| layer | steps | ns per 1,000 MACs | vs fused direct |")
    print("| --- | --- | --- | --- |")
    for name in VARIANTS:
        v = statistics.median(results[name])
        print(f"| {name} | {' + '.join(steps[name])} | {v:.1f} | {v / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
