"""Where a forward pass spends its time: our kernel calls against ONNX Runtime's nodes.

    python -m convserve.core.bench_steps --model strided_rgb128 [--batch 32] [--repeats 3]

For one model (a benchmark model's name, a model file or an architecture document, as
`convserve.core.bench` takes them) and one batch, each engine runs in its own process,
`repeats` times and alternately, on the same weights. Ours: the planned model's forward pass,
then each of its kernel calls alone (`InferencePlan.kernel_times`), with the step it belongs
to and its output shape. ONNX Runtime (2 intra-op threads, as in `convserve.core.bench`): its
run, and each node's time from its own profiler (in a second session: the profiler adds a few
microseconds to every node, so at small batches the nodes add up to more than the run), with
the operator it runs. Both tables show medians over the processes, in microseconds and as a
share: of our pass (the calls alone add up to about it), of the sum of ORT's nodes. The batch goes
through as one chunk, so at most the model's chunk size (32 images; 256 rows for a dense-only
model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

WARMUP_RUNS = 20
TIMED_RUNS = 100


def _pass_us(run) -> float:
    """Median microseconds of a call of `run`, after WARMUP_RUNS calls, over TIMED_RUNS."""
    for _ in range(WARMUP_RUNS):
        run()
    seconds = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e6


def _ours(doc: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
    from convserve.core import runtime
    from convserve.core.model import Model

    model = Model(doc, weights, plan=True)
    if x.shape[0] > model._plan.chunk:
        chunk = model._plan.chunk
        return {"error": f"--batch must be at most {chunk} for this model (one chunk)"}
    model.warmup((x.shape[0],))  # plans: the kernel variants may change here
    plan = model._plan  # the core's own benchmark: the planned steps and kernel calls
    total = _pass_us(lambda: plan.run(x))
    rows = []
    for step, kernel, seconds in plan.kernel_times(x):
        shape = plan.steps[step].shape
        output = "x".join(map(str, shape)) if shape else "in place"
        label = f"{step}: {type(plan.steps[step]).__name__} -> {output}"
        rows.append([label, kernel, seconds * 1e6])
    return {
        "total_us": total,
        "rows": rows,
        "runtime": runtime.describe(),
        "plan": {str(layer): variant for layer, variant in model.kernel_plan.items()},
    }


def _ort(doc: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
    from convserve.core.bench import ort_session
    from convserve.core.interop.onnx_export import onnx_model

    graph = onnx_model(doc, weights)
    session = ort_session(graph)
    total = _pass_us(lambda: session.run(["output"], {"input": x}))
    # a second session with its profiler on, for the nodes' times (profiling adds a little to
    # each run, so the run time above comes from a session without it)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = ort_session(graph, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(WARMUP_RUNS + TIMED_RUNS):
            profiled.run(["output"], {"input": x})
        with open(profiled.end_profiling()) as f:
            events = json.load(f)
    nodes: dict[tuple[str, str], list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            key = (name[: -len("_kernel_time")], event.get("args", {}).get("op_name", "?"))
            nodes.setdefault(key, []).append(event["dur"])  # microseconds
    rows = [
        [name, op, statistics.median(times[WARMUP_RUNS:] or times)]
        for (name, op), times in nodes.items()
    ]
    return {"total_us": total, "rows": rows}


def worker(engine: str, model: str, batch: int) -> dict[str, Any]:
    from convserve.core.bench import _inputs, random_weights
    from convserve.core.bench_models import load_bench_model

    doc, weights = load_bench_model(model)
    weights = random_weights(doc) if weights is None else weights
    x = _inputs(doc, batch, 3)
    return _ours(doc, weights, x) if engine == "ours" else _ort(doc, weights, x)


def _table(header: tuple[str, str], runs: list[dict[str, Any]], total: float) -> list[str]:
    """A markdown table of the rows (label, kernel or operator, microseconds) of every run,
    each row's median over the runs and its share of `total`."""
    lines = [f"| {header[0]} | {header[1]} | us | share |", "| --- | --- | --- | --- |"]
    for i, (label, kind, _) in enumerate(runs[0]["rows"]):
        us = statistics.median(run["rows"][i][2] for run in runs)
        lines.append(f"| {label} | {kind} | {us:,.1f} | {us / total:.1%} |")
    return lines


def _same_plan(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The runs of the plan most of them chose (the first such when tied) and how many runs
    chose another: runs of different plans make different kernel calls, so their tables
    cannot be merged row by row. Each process plans unless the plan cache holds its plan."""
    keys = [json.dumps(run["plan"], sort_keys=True) for run in runs]
    chosen = max(keys, key=keys.count)
    kept = [run for run, key in zip(runs, keys) if key == chosen]
    return kept, len(runs) - len(kept)


def main(argv: list[str] | None = None) -> int:
    from convserve.core.architecture import parse_architecture
    from convserve.core.bench import _have_ort
    from convserve.core.bench_models import load_bench_model
    from convserve.core.errors import ModelError

    parser = argparse.ArgumentParser(
        prog="python -m convserve.core.bench_steps", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a benchmark model's name, a model file (.safetensors) or an architecture "
        "document (.json: random weights)",
    )
    parser.add_argument("--batch", type=int, default=32, help="images (default 32)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="worker processes per engine (default 3)"
    )
    parser.add_argument("--worker", choices=("ours", "ort"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch)))
        return 0
    try:
        doc, _ = load_bench_model(args.model)
        parse_architecture(doc)
    except ModelError as exc:
        parser.error(str(exc))
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    engines = ["ours", "ort"] if _have_ort() else ["ours"]
    if len(engines) == 1:
        print("onnxruntime/onnx not installed: measuring ours only")
    results: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
    for rep in range(args.repeats):
        for engine in engines:
            cmd = [sys.executable, "-m", "convserve.core.bench_steps", "--worker", engine]
            cmd += ["--model", args.model, "--batch", str(args.batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                print(f"{parser.prog}: the {engine} worker failed: {lines[-1]}", file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "error" in result:
                parser.error(result["error"])
            results[engine].append(result)
        print(f"  round {rep + 1} of {args.repeats} done", flush=True)
    ours, others = _same_plan(results["ours"])
    total = statistics.median(run["total_us"] for run in ours)
    print(f"\nours: {ours[0]['runtime']}")
    print(f"{args.model}, {args.batch} images; medians over {args.repeats} processes per engine")
    plan = ", ".join(f"{layer}: {variant}" for layer, variant in ours[0]["plan"].items())
    print(f"ours: the planned kernel variants (layer: variant): {plan or 'no choices'}")
    if others:
        print(f"  ({others} of our processes planned otherwise; left out of the table)")
    print(f"\nours: forward pass {total:,.1f} us; its kernel calls, each alone:")
    print("\n".join(_table(("step", "kernel"), ours, total)))
    if "ort" in results:
        runs = results["ort"]
        ort_total = statistics.median(run["total_us"] for run in runs)
        nodes = sum(
            statistics.median(run["rows"][i][2] for run in runs)
            for i in range(len(runs[0]["rows"]))
        )
        print(
            f"\nONNX Runtime: run {ort_total:,.1f} us (ORT / ours: {ort_total / total:.2f}x); its"
            " nodes as its profiler times them (which adds to each), shares of their sum:"
        )
        print("\n".join(_table(("node", "operator"), runs, nodes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
