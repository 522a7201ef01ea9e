"""Kernel speed on everyday architectures: the core against ONNX Runtime, and where the time goes.

    python benchmarks/bench_kernels.py [--models cifar10,vgg,...] [--batches 1,8,64,256] [--repeats 3]
    python benchmarks/bench_kernels.py --layers [--models ...] [--batches 8,64]
    python benchmarks/bench_kernels.py --one-thread [--models ...] [--batches 1,8,64,256]

The first form runs, per model and `repeats` times alternately, one worker process for the core
and one for ONNX Runtime (2 intra-op threads, same seeded weights), the method of
`python -m convserve.core.bench`, and prints medians, ratios ours/ORT, the geometric mean of
the ratios, and each engine's GFLOP/s (direct-convolution multiply-adds x 2 per second) next to
numpy's sgemm calibration. `--layers` times every kernel call of the core's plan on its own
(fastest of 30 calls; CPU time
when run with NUMBA_NUM_THREADS=1, which other processes on the machine barely disturb) and prints its share of the forward pass and its GFLOP/s.

`--one-thread` compares the kernels themselves where the cores are shared: both engines on one
thread in one process (NUMBA_NUM_THREADS=1, ORT with 1 intra-op thread), calls alternating, each
timed by the CPU time of the calling thread, which other processes barely disturb; it prints
the median ratio per cell and each engine's GFLOP/s. It says nothing about how the two scale
to more threads.

The machine may be shared: compare figures from one run only, and rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np


def architectures() -> dict[str, dict[str, Any]]:
    """The benchmark's models: the same presets and everyday architectures as
    `python -m convserve.core.bench` (defined once in `core/bench_models.py`)."""
    from convserve.core.bench_models import BENCH_MODEL_NAMES, bench_model

    return {name: bench_model(name) for name in BENCH_MODEL_NAMES}


def direct_flops(doc: dict[str, Any]) -> float:
    """Floating-point operations per image of a direct computation (2 per multiply-add)."""
    from convserve.core.bench import flops_per_image

    return flops_per_image(doc, {})[0]


# -- workers ----------------------------------------------------------------------------------
def worker(engine: str, name: str, batches: list[int]) -> dict[str, Any]:
    from convserve.core.bench import (
        _inputs,
        _time_rounds,
        ort_session,
        random_weights,
        sgemm_gflops,
    )

    doc = architectures()[name]
    weights = random_weights(doc)
    result: dict[str, Any] = {}
    if engine == "ours":
        from convserve.core.model import Model

        model = Model(doc, weights)
        model.warmup(tuple(batches))
        fn = model.forward
    else:
        from convserve.core.interop.onnx_export import onnx_model

        result["sgemm"] = sgemm_gflops()
        time.sleep(0.3)
        sess = ort_session(onnx_model(doc, weights))

        def fn(x: np.ndarray) -> np.ndarray:
            return sess.run(["output"], {"input": x})[0]

        for n in batches:
            fn(_inputs(doc, n, 1))
    result["out"] = fn(_inputs(doc, 4, 2)).tolist()
    result["img_s"] = {str(n): _time_rounds(fn, _inputs(doc, n, 3)) for n in batches}
    return result


def layer_times(name: str, batches: list[int]) -> None:
    """Time each kernel call of the core's plan on its own and print the table."""
    from convserve.core.bench import _inputs, random_weights
    from convserve.core.inference import bind_args
    from convserve.core.model import Model

    doc = architectures()[name]
    model = Model(doc, random_weights(doc))
    plan = model._plan
    # on one thread, its CPU time: what the kernel costs even when other processes share the cores
    clock = time.thread_time if plan.threads == 1 else time.perf_counter
    for n in batches:
        x = _inputs(doc, n, 3)
        plan.run(x)
        calls, shape, _ = plan._program(n, False, plan._threads_now())
        result = np.empty(shape, np.float32) if shape is not None else None
        times = []
        for call in calls:
            args = bind_args(call, x, result)
            call[0](*args)
            reps = []
            for _ in range(30):
                t = clock()
                call[0](*args)
                reps.append(clock() - t)
            times.append(min(reps))  # the least disturbed call on a shared machine
        total = sum(times)
        print(f"{name} batch {n}: {total * 1e3:.3f} ms, {n / total:,.0f} img/s")
        for call, t in zip(calls, times):
            print(f"  {call[0].__name__:24} {t * 1e6:9.1f} us {100 * t / total:5.1f} %")


def one_thread(names: list[str], batches: list[int], rounds: int) -> None:
    """Both engines on this thread, alternating calls, CPU time; prints the table."""
    from convserve.core.bench import _inputs, ort_session, random_weights
    from convserve.core.interop.onnx_export import onnx_model
    from convserve.core.model import Model

    ratios = []
    print("| model | " + " | ".join(f"batch {n}" for n in batches) + " |")
    print("|" + " --- |" * (1 + len(batches)))
    for name in names:
        doc = architectures()[name]
        weights = random_weights(doc)
        model = Model(doc, weights)
        sess = ort_session(onnx_model(doc, weights), threads=1)
        flops = direct_flops(doc)
        cells = []
        for n in batches:
            x = _inputs(doc, n, 3)
            engines = (model.forward, lambda x, s=sess: s.run(["output"], {"input": x})[0])
            times: list[list[float]] = [[], []]
            for _ in range(rounds):
                for fn, spent in zip(engines, times):
                    t = time.thread_time()
                    fn(x)
                    spent.append(time.thread_time() - t)
            ours, ort = (statistics.median(t[1:]) for t in times)  # the first call warms up
            ratios.append(ort / ours)
            cells.append(
                f"{ort / ours:.2f}x ({flops * n / ours / 1e9:.0f}/{flops * n / ort / 1e9:.0f} GF/s)"
            )
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    geo = math.exp(statistics.mean(math.log(r) for r in ratios))
    print(f"\ngeometric mean ours/ORT {geo:.2f}x; worst cell {min(ratios):.2f}x")
    print("cells: ratio of CPU times ORT/ours (GFLOP/s ours/ORT, direct-convolution equivalent)")


# -- driver -----------------------------------------------------------------------------------
def _run(engine: str, name: str, batches: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--models", name]
    cmd += ["--batches", ",".join(map(str, batches))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker for {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(architectures()))
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="per-kernel-call times")
    parser.add_argument("--one-thread", action="store_true", help="one thread, CPU time")
    parser.add_argument("--rounds", type=int, default=15, help="alternating calls (--one-thread)")
    parser.add_argument("--worker", choices=("ours", "ort"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, names[0], batches)))
        return 0
    if args.one_thread:
        if os.environ.get("NUMBA_NUM_THREADS") != "1":  # numba reads it at import: start afresh
            env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
            return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode
        one_thread(names, batches, args.rounds)
        return 0
    if args.layers:
        for name in names:
            layer_times(name, batches)
        return 0
    ratios = []
    sgemm = []
    print("| model | " + " | ".join(f"batch {n}" for n in batches) + " |")
    print("|" + " --- |" * (1 + len(batches)))
    for name in names:
        rates: dict[str, dict[int, list[float]]] = {"ours": {}, "ort": {}}
        diff = 0.0
        for _ in range(args.repeats):
            outs = {}
            for engine in ("ours", "ort"):
                res = _run(engine, name, batches)
                outs[engine] = np.array(res["out"])
                sgemm += [res["sgemm"]] if "sgemm" in res else []
                for n in batches:
                    rates[engine].setdefault(n, []).append(res["img_s"][str(n)])
            diff = max(diff, float(np.abs(outs["ours"] - outs["ort"]).max()))
        flops = direct_flops(architectures()[name])
        cells = []
        for n in batches:
            ours = statistics.median(rates["ours"][n])
            ort = statistics.median(rates["ort"][n])
            ratios.append(ours / ort)
            cells.append(
                f"{ours / ort:.2f}x ({ours:,.0f}/{ort:,.0f}; "
                f"{ours * flops / 1e9:.0f}/{ort * flops / 1e9:.0f} GF/s)"
            )
        print(f"| {name} | " + " | ".join(cells) + f" | max diff {diff:.1e}", flush=True)
    geo = math.exp(statistics.mean(math.log(r) for r in ratios))
    print(f"\ngeometric mean ours/ORT {geo:.2f}x; worst cell {min(ratios):.2f}x")
    print(f"numpy sgemm 1024^3: {min(sgemm):.0f}-{max(sgemm):.0f} GFLOP/s (ORT processes)")
    print("cells: ratio (img/s ours/ORT; GFLOP/s ours/ORT, direct-convolution equivalent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
