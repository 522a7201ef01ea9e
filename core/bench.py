"""Forward-pass benchmark: the Numba core against ONNX Runtime, each in its own process.

    python -m convserve.core.bench [--models fashion_mnist,lenet5,cifar10] [--batches 1,8,64,256] [--repeats N]

For every model (a preset with seeded He-initialised weights) the driver starts, `repeats`
times and alternately, one worker process for our core and one for ONNX Runtime (2 intra-op
threads, the same weights exported to ONNX). Each worker times 7 rounds of about 40 ms of work
per batch size and reports its median; the table shows the median over processes and the ratio
ours/ORT. The ORT worker first measures numpy's sgemm GFLOP/s as a calibration of how busy the
machine is. Both workers also classify the same 16 images; the driver prints the largest
difference between their outputs. Without onnxruntime, only our figures are printed.

onnx/onnxruntime are imported only inside the functions that need them (never by the core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from convserve.core.interop.onnx_export import onnx_model

ROUND_SECONDS = 0.04
ROUNDS = 7


# -- weights and ONNX Runtime ----------------------------------------------------------------
def random_weights(doc: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """He-normal kernels and small random biases for an architecture document (seeded)."""
    from convserve.core.architecture import parse_architecture

    arch = parse_architecture(doc)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in arch.weight_shapes().items():
        if name.endswith(".kernel"):
            fan_in = math.prod(shape[:-1])
            weights[name] = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(
                np.float32
            )
        else:
            weights[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return weights


def ort_session(model_bytes: bytes, threads: int = 2):
    """An ONNX Runtime CPU session with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


# -- workers (one engine per process) --------------------------------------------------------
def _inputs(doc: dict[str, Any], n: int, seed: int) -> np.ndarray:
    from convserve.core.architecture import parse_architecture

    shape = parse_architecture(doc).input_shape
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _time_rounds(fn, x: np.ndarray) -> float:
    """Median img/s over ROUNDS rounds of about ROUND_SECONDS each."""
    n = x.shape[0]
    t = time.perf_counter()
    fn(x)
    per_call = max(time.perf_counter() - t, 1e-6)
    calls = max(1, int(ROUND_SECONDS / per_call))
    rates = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        rates.append(n * calls / (time.perf_counter() - t))
    return statistics.median(rates)


def sgemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """numpy float32 matmul GFLOP/s (best of `repeats`): how fast the machine is right now."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.T.copy()
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def worker(engine: str, model: str, batches: list[int], outputs_path: str) -> dict[str, Any]:
    from convserve.core.presets import preset

    doc = preset(model)
    weights = random_weights(doc)
    result: dict[str, Any] = {"engine": engine, "model": model}
    if engine == "ours":
        from convserve.core import runtime
        from convserve.core.model import Model

        m = Model(doc, weights)
        m.warmup(tuple(batches) + (16,))
        fn = m.forward
        result["runtime"] = runtime.describe()
    else:
        result["sgemm_gflops"] = sgemm_gflops()
        time.sleep(0.3)  # let OpenBLAS threads stop spinning before ORT runs
        sess = ort_session(onnx_model(doc, weights))

        def fn(x: np.ndarray) -> np.ndarray:
            return sess.run(["output"], {"input": x})[0]

        for n in batches + [16]:
            fn(_inputs(doc, n, 1))
    np.save(outputs_path, fn(_inputs(doc, 16, 2)))
    result["img_s"] = {str(n): _time_rounds(fn, _inputs(doc, n, 3)) for n in batches}
    return result


# -- driver ---------------------------------------------------------------------------------
def _run_worker(engine: str, model: str, batches: list[int], outputs_path: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "convserve.core.bench",
        "--worker",
        engine,
        "--models",
        model,
        "--batches",
        ",".join(map(str, batches)),
        "--outputs",
        outputs_path,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker for {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _have_ort() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convserve.core.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", default="fashion_mnist,lenet5,cifar10")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument(
        "--repeats", type=int, default=3, help="worker processes per engine and model"
    )
    parser.add_argument("--worker", choices=("ours", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--outputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.worker:
        print(json.dumps(worker(args.worker, models[0], batches, args.outputs)))
        return 0

    from convserve.core.presets import PRESET_NAMES

    unknown = [m for m in models if m not in PRESET_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(PRESET_NAMES)}")
    engines = ["ours", "ort"] if _have_ort() else ["ours"]
    if engines == ["ours"]:
        print("onnxruntime/onnx not installed: measuring ours only")
    rates: dict[tuple[str, str, int], list[float]] = {}
    calib: list[float] = []
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for rep in range(args.repeats):
                outs = {}
                for engine in engines:
                    path = os.path.join(tmp, f"{model}-{engine}-{rep}.npy")
                    res = _run_worker(engine, model, batches, path)
                    outs[engine] = np.load(path)
                    if "sgemm_gflops" in res:
                        calib.append(res["sgemm_gflops"])
                    if "runtime" in res and rep == 0 and model == models[0]:
                        print(f"ours: {res['runtime']}")
                    for n in batches:
                        rates.setdefault((model, engine, n), []).append(res["img_s"][str(n)])
                    print(
                        f"  {model} rep {rep + 1} {engine:4}: "
                        + ", ".join(f"b{n} {res['img_s'][str(n)]:,.0f}" for n in batches),
                        flush=True,
                    )
                if "ort" in outs:
                    diffs[model] = max(
                        diffs.get(model, 0.0), float(np.abs(outs["ours"] - outs["ort"]).max())
                    )
    print()
    if calib:
        print(
            f"calibration: numpy sgemm 1024^3 {min(calib):.0f}-{max(calib):.0f} GFLOP/s "
            f"(median {statistics.median(calib):.0f}) in the ORT processes"
        )
    print(f"median img/s over {args.repeats} processes per engine\n")
    header = "| model | engine | " + " | ".join(f"batch {n}" for n in batches) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(batches)))
    for model in models:
        med = {e: [statistics.median(rates[(model, e, n)]) for n in batches] for e in engines}
        print(f"| {model} | ours | " + " | ".join(f"{v:,.0f}" for v in med["ours"]) + " |")
        if "ort" in med:
            print(f"| {model} | ORT | " + " | ".join(f"{v:,.0f}" for v in med["ort"]) + " |")
            print(
                f"| {model} | ours/ORT | "
                + " | ".join(f"{a / b:.2f}x" for a, b in zip(med["ours"], med["ort"]))
                + " |"
            )
    for model, d in diffs.items():
        print(f"{model}: max |ours - ORT| over 16 images = {d:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
