"""Training speed of the reference model at batch 64: convserve's trainer against PyTorch.

Each measurement runs in its own process (one runtime per process), interleaved, repeated;
prints per-step medians and the implied seconds per 60,000-image epoch. The machine is shared
and noisy: compare the two in the same run, never against a number from another day.

    python benchmarks/bench_training.py [--steps 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STEPS_PER_EPOCH = 938  # ceil(60000 / 64)

OURS = r"""
import json, sys, time, numpy as np
from convserve.core.datasets import load_dataset
from convserve.core.presets import preset
from convserve.core.architecture import parse_architecture
from convserve.core.training.network import Network
from convserve.core.training.optim import Adam
steps = int(sys.argv[1])
ds = load_dataset("fashion-mnist")
net = Network(parse_architecture(preset("fashion_mnist")))
net.initialize(np.random.default_rng(0))
opt = Adam(net.size)
order = np.random.default_rng(0).permutation(60000)
def step(i):
    idx = order[(i % 900) * 64:(i % 900 + 1) * 64]
    x = net.preprocess(ds.x_train[idx])
    net.loss_and_grad(x, ds.y_train[idx])
    opt.step(net.params, net.grads, 1e-3)
for i in range(5): step(i)
times = []
for i in range(steps):
    t = time.perf_counter(); step(i); times.append(time.perf_counter() - t)
print(json.dumps({"median": float(np.median(times)), "mean": float(np.mean(times))}))
"""

TORCH = r"""
import json, sys, time, numpy as np, torch
from torch import nn
torch.set_num_threads(2)
sys.path.insert(0, ".")
from convserve.core.datasets import load_dataset
steps = int(sys.argv[1])
ds = load_dataset("fashion-mnist")
x_all = torch.from_numpy(ds.x_train[..., 0].astype(np.float32) / 255).unsqueeze(1)
y_all = torch.from_numpy(ds.y_train)
model = nn.Sequential(nn.Conv2d(1, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), 1e-3)
loss_fn = nn.CrossEntropyLoss()
order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
def step(i):
    idx = order[(i % 900) * 64:(i % 900 + 1) * 64]
    opt.zero_grad(); loss = loss_fn(model(x_all[idx]), y_all[idx]); loss.backward(); opt.step()
for i in range(5): step(i)
times = []
for i in range(steps):
    t = time.perf_counter(); step(i); times.append(time.perf_counter() - t)
print(json.dumps({"median": float(np.median(times)), "mean": float(np.mean(times))}))
"""


def run(code: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"convserve": [], "torch": []}
    for r in range(args.repeats):
        for name, code in (("convserve", OURS), ("torch", TORCH)):
            if name == "torch" and args.no_torch:
                continue
            started = time.time()
            res = run(code, args.steps)
            results[name].append(res["median"])
            print(
                f"run {r + 1} {name:9s}: {res['median'] * 1e3:6.1f} ms/step median, {res['mean'] * 1e3:6.1f} mean "
                f"-> {res['median'] * STEPS_PER_EPOCH:5.1f} s/epoch ({time.time() - started:.0f} s)",
                flush=True,
            )
    for name, values in results.items():
        if values:
            med = statistics.median(values)
            print(
                f"{name:9s}: median of {len(values)} runs {med * 1e3:.1f} ms/step = {med * STEPS_PER_EPOCH:.1f} s per epoch "
                f"(range {min(values) * STEPS_PER_EPOCH:.1f}-{max(values) * STEPS_PER_EPOCH:.1f})"
            )
    if results["torch"]:
        print(
            f"ratio torch/convserve: {statistics.median(results['torch']) / statistics.median(results['convserve']):.2f}x"
        )


if __name__ == "__main__":
    main()
