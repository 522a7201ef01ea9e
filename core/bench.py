"""Forward-pass benchmark: the Numba core against ONNX Runtime, each in its own process.

    python -m convserve.core.bench [--models a,b,...] [--batches 1,8,64,256] [--repeats N]
                                   [--compare-plan] [--json results.json]

The models (`bench_models.py`): the three presets, issue 14's VGG-style CIFAR net and everyday
architectures (stride-2 convs, the classic MNIST net, tanh with average pooling, 64x64 RGB, 1x1
convs, dense only); all by default. Each has seeded He-initialised weights. For every model the
driver starts, `repeats` times and alternately, one worker process per engine: our core with the
planner's kernel choice (`ours`), with the built-in heuristic choice (`unplanned`, with
--compare-plan) and ONNX Runtime (2 intra-op threads, the same weights exported to ONNX). Each
worker times 7 rounds of about 40 ms of work per batch size and reports its median; the table
shows per model and batch size the median over processes of the milliseconds per batch, the
ratio ORT time / our time (above 1: we are faster), and our achieved GFLOP/s, counted two ways:
as the direct convolution would compute it ("direct-eq") and as the kernels the plan chose
actually multiply (Winograd F(2x2, 3x3) does 16 products per 2x2 outputs and channel pair
instead of 36, F(4x4, 3x3) 36 per 4x4 outputs instead of 144, F(2x2, 5x5) 36 instead of 100).
Next to them the ceilings, measured in every process of ours (`kernels/peak.py`): our largest
micro-kernel on data in L1 on every thread, with "% peak", the actual GFLOP/s as a share of
it; the machine's FP32 peak (multiply-adds on registers alone), which the micro-kernel's own
loads and loop keep it under; and the rate at which all threads read a buffer of the model's
weights' size. "% roofline"
is the shortest time a batch could take, its actual multiply-adds at the peak or, if longer,
one read of the weights at that rate, as a share of our time (at one image, a dense net with
megabytes of weights is bound by the reads, not the multiply-adds).
numpy's 1024^3 sgemm GFLOP/s, measured in every ORT process, is printed too, as a gauge of how
busy the machine was (it is no ceiling: on AMD Zen 5 it reads less than half the peak). Then
the geometric mean of all ratios and the worst cell. Both engines classify the same 16 images;
the largest difference is printed. Without onnxruntime, only our figures are printed.

onnx/onnxruntime are imported only inside the functions that need them (never by the core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
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


def ort_session(model_bytes: bytes, threads: int = 2, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads; with `profile_prefix`, its
    profiler on, writing to a file of that prefix (`end_profiling` returns its name)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


# -- workers (one engine per process) --------------------------------------------------------
def _inputs(doc: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """n seeded standard-normal inputs (already preprocessed) of the model's input shape."""
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


def flops_per_image(doc: dict[str, Any], plan: dict[int, str]) -> tuple[float, float]:
    """(direct-equivalent, actual) floating-point operations per image of the conv and dense
    layers (2 per multiply-add) for a kernel plan {layer index: variant}: a Winograd layer does
    alpha*alpha products per tile of m x m outputs and channel pair (F(2x2, 3x3): 16 where
    direct does 36; F(4x4, 3x3): 36 for 144; F(2x2, 5x5): 36 for 100; a stride-2 conv over its
    input's phases: 36 over 4 * CI channels for 16 * kh * kw over CI; a stride-1 kernel in
    gh x gw blocks of 3x3: 36 over gh * gw * CI channels)."""
    from convserve.core.architecture import parse_architecture
    from convserve.core.layers.conv2d import WINOGRAD, tile_views
    from convserve.core.layers.fusion import blocks

    direct = actual = 0.0
    for block in blocks(parse_architecture(doc).layers, inference=True):
        layer = block.layer
        if layer.type == "dense":
            work = 2.0 * layer.input_shape[0] * layer.output_shape[0]
            direct, actual = direct + work, actual + work
        elif layer.type == "conv2d":
            oh, ow, co = layer.output_shape
            ci = layer.input_shape[2]
            kh, kw = layer.kernel_size
            work = 2.0 * oh * ow * co * kh * kw * ci
            direct += work
            variant = plan.get(layer.index, "")
            transform = WINOGRAD.get(variant)
            views = tile_views(variant, layer.kernel_size)  # a 3x3 conv over gh x gw views
            ci *= views[0] * views[1]
            if transform is not None:
                fused = block.pool is not None and block.pool.tiles_input
                m = transform.m
                rows, cols = (oh // 2 * 2, ow // 2 * 2) if fused else (oh, ow)  # conv pixels used
                tiles = math.ceil(rows / m) * math.ceil(cols / m)
                actual += 2.0 * transform.alpha**2 * tiles * ci * co
            else:
                actual += work
    return direct, actual


def worker(engine: str, model: str, batches: list[int], outputs_path: str) -> dict[str, Any]:
    from convserve.core.bench_models import load_bench_model

    doc, weights = load_bench_model(model)
    weights = random_weights(doc) if weights is None else weights
    result: dict[str, Any] = {"engine": engine, "model": model}
    if engine in ("ours", "unplanned"):
        from convserve.core import runtime
        from convserve.core.kernels.peak import fma_peak_gflops, peak_gflops, read_gbps
        from convserve.core.model import Model

        m = Model(doc, weights, plan=engine == "ours")
        start = time.perf_counter()
        m.warmup(tuple(batches) + (16,))
        result["warmup_s"] = time.perf_counter() - start
        result["peak_gflops"] = peak_gflops()
        result["fma_peak_gflops"] = fma_peak_gflops()
        result["weight_bytes"] = sum(w.nbytes for w in weights.values())
        result["read_gbps"] = read_gbps(result["weight_bytes"])
        result["plan"] = m.kernel_plan
        result["chunk"] = m.batch_chunk
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
class WorkerFailed(RuntimeError):
    """A worker process failed; the message gives its last line and how to rerun it."""


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
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise WorkerFailed(
            f"the {engine} worker for {model} failed: {lines[-1]}\n"
            f"(run it alone for its whole output: {' '.join(shlex.quote(a) for a in cmd)})"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _have_ort() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _median_table(
    rates: dict[tuple[str, str, int], list[float]],
    models: list[str],
    engines: list[str],
    batches: list[int],
) -> dict[str, dict[str, dict[int, float]]]:
    """{model: {engine: {batch: median ms per batch}}} from the img/s each process measured."""
    return {
        model: {
            e: {n: 1000.0 * n / statistics.median(rates[(model, e, n)]) for n in batches}
            for e in engines
        }
        for model in models
    }


def _peak_block() -> str:
    """The ceiling's block, pixels x channels (imported here: the parent process runs no kernel)."""
    from convserve.core.kernels import peak

    return f"{peak.PEAK_ROWS}x{peak.PEAK_COLS}"


def report(
    ms: dict[str, dict[str, dict[int, float]]],
    flops: dict[str, tuple[float, float]],
    plans: dict[str, dict[str, Any]],
    calib: list[float],
    batches: list[int],
    peaks: list[float] | None = None,
    reads: dict[str, tuple[int, list[float]]] | None = None,
    fma_peaks: list[float] | None = None,
    chunks: dict[str, int] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """The result table as markdown lines, and the same figures as a JSON-ready dict. `peaks`:
    the micro-kernel ceiling (GFLOP/s) each of our processes measured; `reads`: per model, the
    weights' bytes and the rate (GB/s) at which each of our processes read that many;
    `fma_peaks`: the machine's multiply-add peak each of our processes measured; `chunks`: per
    model, the most images our pass runs at once (`Model.batch_chunk`)."""
    engines = list(next(iter(ms.values())))
    has_ort, has_unplanned = "ort" in engines, "unplanned" in engines
    peak = statistics.median(peaks) if peaks else None
    read = {m: (size, statistics.median(rates)) for m, (size, rates) in (reads or {}).items()}
    lines = []
    if peaks:
        lines.append(
            f"ceiling, our {_peak_block()} micro-kernel in L1 on every thread: {min(peaks):.0f}-"
            f"{max(peaks):.0f} GFLOP/s (median {peak:.0f}) in our processes"
        )
    if fma_peaks:
        fma = statistics.median(fma_peaks)
        share = f"; the ceiling is {100 * peak / fma:.0f} % of it" if peak else ""
        lines.append(
            f"machine FP32 peak, multiply-adds on registers alone on every thread: "
            f"{min(fma_peaks):.0f}-{max(fma_peaks):.0f} GFLOP/s (median {fma:.0f}){share}"
        )
    for model, (size, rates) in (reads or {}).items():
        lines.append(
            f"{model}: weights {size / 1e6:.2f} MB, read by every thread at {min(rates):.0f}-"
            f"{max(rates):.0f} GB/s (median {read[model][1]:.0f})"
        )
    if calib:
        lines.append(
            f"numpy sgemm 1024^3: {min(calib):.0f}-{max(calib):.0f} GFLOP/s "
            f"(median {statistics.median(calib):.0f}) in the ORT processes"
        )
    head = ["model", "batch", "ours ms"]
    head += ["unplanned ms", "plan gain"] if has_unplanned else []
    head += ["ORT ms", "ours/ORT"] if has_ort else []
    head += ["GFLOP/s direct-eq", "GFLOP/s actual"]
    head += ["% peak"] if peak else []
    head += ["% roofline"] if peak and read else []
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    cells: list[dict[str, Any]] = []
    for model, by_engine in ms.items():
        direct, actual = flops[model]
        for n in batches:
            ours = by_engine["ours"][n]
            cell: dict[str, Any] = {"model": model, "batch": n, "ours_ms": ours}
            cell["gflops_direct"] = direct * n / ours / 1e6
            cell["gflops_actual"] = actual * n / ours / 1e6
            row = [model, str(n), f"{ours:.3f}"]
            if has_unplanned:
                cell["unplanned_ms"] = by_engine["unplanned"][n]
                cell["plan_gain"] = cell["unplanned_ms"] / ours
                row += [f"{cell['unplanned_ms']:.3f}", f"{cell['plan_gain']:.2f}x"]
            if has_ort:
                cell["ort_ms"] = by_engine["ort"][n]
                cell["ratio"] = cell["ort_ms"] / ours
                row += [f"{cell['ort_ms']:.3f}", f"{cell['ratio']:.2f}x"]
            row += [f"{cell['gflops_direct']:.0f}", f"{cell['gflops_actual']:.0f}"]
            if peak:
                cell["peak_share"] = cell["gflops_actual"] / peak
                row.append(f"{100 * cell['peak_share']:.0f}")
            if peak and model in read:
                # the shortest a batch can take: its multiply-adds at the peak or, if longer,
                # one read of the weights at their rate
                size, rate = read[model]
                cell["floor_ms"] = max(actual * n / peak / 1e6, size / rate / 1e6)
                cell["roofline_share"] = cell["floor_ms"] / ours
                row.append(f"{100 * cell['roofline_share']:.0f}")
            lines.append("| " + " | ".join(row) + " |")
            cells.append(cell)
    summary: dict[str, Any] = {"cells": cells, "plans": plans, "batches": batches}
    if chunks:
        summary["chunks"] = chunks
    if peaks:
        summary["peak_gflops"] = {"min": min(peaks), "max": max(peaks), "median": peak}
    if fma_peaks:
        summary["fma_peak_gflops"] = {
            "min": min(fma_peaks),
            "max": max(fma_peaks),
            "median": statistics.median(fma_peaks),
        }
    if reads:
        summary["weights_read"] = {
            m: {"bytes": size, "gbps_min": min(r), "gbps_max": max(r), "gbps_median": read[m][1]}
            for m, (size, r) in reads.items()
        }
    if calib:
        summary["sgemm_gflops"] = {
            "min": min(calib),
            "max": max(calib),
            "median": statistics.median(calib),
        }
    lines.append("")
    for key, what in (("ratio", "ours/ORT"), ("plan_gain", "planned/unplanned")):
        if cells and key in cells[0]:
            geo = math.exp(statistics.fmean(math.log(c[key]) for c in cells))
            worst = min(cells, key=lambda c: c[key])
            summary[f"{key}_geomean"] = geo
            summary[f"{key}_worst"] = {k: worst[k] for k in ("model", "batch", key)}
            lines.append(
                f"{what}: geometric mean {geo:.2f}x over {len(cells)} cells; worst "
                f"{worst[key]:.2f}x ({worst['model']}, batch {worst['batch']})"
            )
    if has_ort:
        reached = sum(1 for c in cells if c["ratio"] >= 1.2)
        lines.append(f"cells at 1.2x ORT or better: {reached} of {len(cells)}")
    for model, plan in plans.items():
        chunk = f", chunks of {chunks[model]} images" if chunks and model in chunks else ""
        lines.append(f"{model}: kernel plan {plan}{chunk}")
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    from convserve.core.architecture import parse_architecture
    from convserve.core.bench_models import BENCH_MODEL_NAMES, load_bench_model
    from convserve.core.errors import ModelError

    parser = argparse.ArgumentParser(
        prog="python -m convserve.core.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--models",
        default=",".join(BENCH_MODEL_NAMES),
        help="comma-separated benchmark model names, model files (.safetensors: their own "
        "weights) or architecture documents (.json: random weights); default: all bench models",
    )
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument(
        "--repeats", type=int, default=3, help="worker processes per engine and model"
    )
    parser.add_argument(
        "--compare-plan",
        action="store_true",
        help="also run our core with planning off (the built-in heuristic kernel choice)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--worker", choices=("ours", "unplanned", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--outputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.worker:
        print(json.dumps(worker(args.worker, models[0], batches, args.outputs)))
        return 0

    docs = {}
    for model in models:
        try:
            docs[model], _ = load_bench_model(model)
            parse_architecture(docs[model])
        except ModelError as exc:
            parser.error(str(exc))
    engines = ["ours", "unplanned"] if args.compare_plan else ["ours"]
    if _have_ort():
        engines.append("ort")
    else:
        print("onnxruntime/onnx not installed: measuring ours only")
    rates: dict[tuple[str, str, int], list[float]] = {}
    calib: list[float] = []
    peaks: list[float] = []
    fma_peaks: list[float] = []
    reads: dict[str, tuple[int, list[float]]] = {}
    diffs: dict[str, float] = {}
    plans: dict[str, dict[str, Any]] = {}
    chunks: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, model in enumerate(models):
            for rep in range(args.repeats):
                outs = {}
                for engine in engines:
                    path = os.path.join(tmp, f"{number}-{engine}-{rep}.npy")
                    try:
                        res = _run_worker(engine, model, batches, path)
                    except WorkerFailed as exc:
                        print(f"{parser.prog}: {exc}", file=sys.stderr)
                        return 1
                    outs[engine] = np.load(path)
                    if "sgemm_gflops" in res:
                        calib.append(res["sgemm_gflops"])
                    if "peak_gflops" in res:
                        peaks.append(res["peak_gflops"])
                        fma_peaks.append(res["fma_peak_gflops"])
                    if "read_gbps" in res:
                        reads.setdefault(model, (res["weight_bytes"], []))[1].append(
                            res["read_gbps"]
                        )
                    if "runtime" in res and rep == 0 and model == models[0]:
                        print(f"ours: {res['runtime']}")
                    if engine == "ours":
                        plans[model] = res["plan"]
                        chunks[model] = res["chunk"]
                    for n in batches:
                        rates.setdefault((model, engine, n), []).append(res["img_s"][str(n)])
                    print(
                        f"  {model} rep {rep + 1} {engine:9}: "
                        + ", ".join(f"b{n} {res['img_s'][str(n)]:,.0f} img/s" for n in batches),
                        flush=True,
                    )
                if "ort" in outs:
                    diffs[model] = max(
                        diffs.get(model, 0.0), float(np.abs(outs["ours"] - outs["ort"]).max())
                    )
    flops = {m: flops_per_image(docs[m], {int(k): v for k, v in plans[m].items()}) for m in models}
    ms = _median_table(rates, models, engines, batches)
    lines, summary = report(ms, flops, plans, calib, batches, peaks, reads, fma_peaks, chunks)
    print(f"\nmedian over {args.repeats} processes per engine; ms per batch")
    print("\n".join(lines))
    for model, d in diffs.items():
        print(f"{model}: max |ours - ORT| over 16 images = {d:.2e}")
    if args.json:
        summary.update(
            repeats=args.repeats, max_abs_diff_vs_ort=diffs, ms=ms, flops_per_image=flops
        )
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
