"""Streaming against unary calls: 64 single-image requests in flight, over a few ModelStreamInfer
streams or as 64 concurrent ModelInfer calls, measured by perf_analyzer (native, the same
generator for both), alternating on one server so that machine noise hits both alike.

    python loadtest/bench_stream.py                     # 3 rounds of 10 s each, 4 streams
    python loadtest/bench_stream.py --rounds 5 --seconds 20 --streams 8
    python loadtest/bench_stream.py --target 127.0.0.1:8001 --model fashion_mnist

perf_analyzer runs asynchronously with `--streams` threads: unary, each thread keeps its share of
the 64 calls in flight; streaming, each thread holds one stream with its share of the 64
requests in flight. Prints img/s and client p50/p99 per round, then the medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_analyzer as pa  # noqa: E402
from bench_throughput import stop_server  # noqa: E402

IN_FLIGHT = 64


def measure(target: str, model: str, streaming: bool, seconds: float, streams: int) -> dict:
    """One perf_analyzer measurement of IN_FLIGHT requests: img/s, p50 and p99 in ms."""
    flags = ["--async", "--max-threads", str(streams)]
    [row] = pa.run_sweep(
        target, model, [IN_FLIGHT], int(seconds * 1000), streaming, flags, echo=False
    )
    return {
        "img_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--model", help="model name (default: the first in the repository)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window (s)")
    parser.add_argument("--streams", type=int, default=4, help="streams / generator threads")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag")
    args = parser.parse_args(argv)

    proc = None
    results: dict[str, list[dict]] = {"unary": [], "stream": []}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            target, model = args.target, args.model
            if target is None:
                proc, target, model = pa.start_default_server(
                    Path(tmp), None, model, args.server_arg
                )
            if model is None:
                parser.error("--model is needed with --target")
            for round_ in range(1, args.rounds + 1):
                order = ("unary", "stream") if round_ % 2 else ("stream", "unary")
                for mode in order:
                    r = measure(target, model, mode == "stream", args.seconds, args.streams)
                    results[mode].append(r)
                    print(
                        f"round {round_} {mode:6s}: {r['img_s']:8.0f} img/s  p50 "
                        f"{r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms",
                        flush=True,
                    )
        except (pa.SetupError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if proc is not None:
                stop_server(proc)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    print(
        f"\n{IN_FLIGHT} single-image requests in flight, {args.streams} generator threads, "
        f"median of {args.rounds} alternating rounds:"
    )
    print("| mode | img/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for mode, label in (
        ("unary", f"{IN_FLIGHT} unary calls"),
        ("stream", f"{args.streams} streams"),
    ):
        print(
            f"| {label} | {median(mode, 'img_s'):.0f} | {median(mode, 'p50_ms'):.2f} | "
            f"{median(mode, 'p99_ms'):.2f} |"
        )
    ratios = [s["img_s"] / u["img_s"] for s, u in zip(results["stream"], results["unary"])]
    print(f"streaming / unary throughput, per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
