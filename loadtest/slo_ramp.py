"""Latency-SLO batching on a load ramp: fixed windows against `--latency-slo-ms`, side by side.

    python loadtest/slo_ramp.py                                  # default ramp, about 4 minutes
    python loadtest/slo_ramp.py --rounds 3                       # three ramps, medians
    python loadtest/slo_ramp.py --slo-ms 20 --rates 50,200,500,900,500,200,50 --seconds 8

Three servers run on loopback with the bundled model: `fixed-small` (--max-queue-delay-us 0,
take what is queued), `fixed-large` (--max-queue-delay-us 3/4 of the SLO: large batches) and
`slo` (--latency-slo-ms). The load is open-loop, like independent callers: single-image
requests of real Fashion-MNIST test images sent at Poisson times at each step's rate from
`--procs` generator processes, whatever the answers take. Every step runs against each server
in turn (the order rotates per step), so a disturbance on a shared machine hits all three
alike; each server sees the ramp in order, and the first `--settle` seconds of each step are
not measured (time for the controller to follow).

Per step and server it prints the offered and achieved rate (img/s), p50/p99 of the server's
queue + compute time (what the SLO bounds: the response's `queue_us` + `compute_us`), p99 of
the end-to-end latency seen by the client, the mean batch size (images per execution, from the
server's metrics), the server's CPU per request and the SLO server's window at the step's end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_throughput import METRICS, server_counts, start_server, stop_server  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL = "fashion_mnist"


def _requests(count: int) -> list[bytes]:
    from mnist_requests import build_requests, load_images

    images, labels = load_images()
    prepared = build_requests(images, labels, per_request=1, model=MODEL, limit=count)
    return [p.message.SerializeToString() for p in prepared]


async def _open_loop(target: str, rate: float, settle: float, seconds: float, seed: int) -> dict:
    """Send at Poisson times for settle + seconds; measure requests sent after `settle`."""
    import grpc
    from convserve.proto import grpc_service_pb2 as pb

    bodies = _requests(1000)
    rng = random.Random(seed)
    server_ms: list[float] = []
    client_ms: list[float] = []
    failures: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )

        async def one(body: bytes, measured: bool) -> None:
            sent = time.perf_counter()
            try:
                response = await call(body, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if measured:
                    failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
                return
            if measured:
                client_ms.append((time.perf_counter() - sent) * 1e3)
                p = response.parameters
                server_ms.append((p["queue_us"].int64_param + p["compute_us"].int64_param) / 1e3)

        start = time.perf_counter()
        due, tasks, index = start, [], 0
        while due < start + settle + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(one(bodies[index % len(bodies)], due >= start + settle))
            )
            index += 1
            due += rng.expovariate(rate)
        lag = time.perf_counter() - due  # > 0: the generator could not keep up
        await asyncio.gather(*tasks)
    return {"server_ms": server_ms, "client_ms": client_ms, "failures": failures, "lag": lag}


def _generator(args: tuple) -> dict:
    return asyncio.run(_open_loop(*args))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _window_ms(target: str) -> float:
    with urllib.request.urlopen(METRICS[target], timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("convserve_batch_window_seconds{") and f'model="{MODEL}"' in line:
                return float(line.rsplit(" ", 1)[1]) * 1e3
    return float("nan")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_step(pool, proc, target: str, rate: float, args, seed: int) -> dict:
    share = [
        (target, rate / args.procs, args.settle, args.seconds, seed + i) for i in range(args.procs)
    ]
    images0, executions0 = server_counts(target, MODEL)
    cpu0 = _cpu_seconds(proc.pid)
    parts = pool.map(_generator, share)
    cpu = _cpu_seconds(proc.pid) - cpu0
    images1, executions1 = server_counts(target, MODEL)
    server = [v for p in parts for v in p["server_ms"]]
    client = [v for p in parts for v in p["client_ms"]]
    sent = images1 - images0
    codes = sorted({code for p in parts for code in p["failures"]})
    return {
        "achieved": len(client) / args.seconds,
        "p50": _quantile(server, 0.5),
        "p99": _quantile(server, 0.99),
        "client_p99": _quantile(client, 0.99),
        "batch": sent / max(1, executions1 - executions0),
        "cpu_us": cpu / max(1, sent) * 1e6,  # settle included on both sides of the ratio
        "failures": {code: sum(p["failures"].get(code, 0) for p in parts) for code in codes},
        "lag": max(p["lag"] for p in parts),
        "window": _window_ms(target),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slo-ms", type=float, default=20.0, help="the SLO of the slo server")
    parser.add_argument(
        "--large-us", type=int, default=0, help="fixed-large window (default: 3/4 of the SLO)"
    )
    parser.add_argument("--rates", default="50,200,500,900,500,200,50", help="requests/s per step")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per step")
    parser.add_argument("--settle", type=float, default=3.0, help="unmeasured seconds per step")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1, help="ramps run back to back; the table shows medians"
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    large_us = args.large_us or int(args.slo_ms * 750)
    flavours = {
        "fixed-small": ["--max-queue-delay-us", "0"],
        "fixed-large": ["--max-queue-delay-us", str(large_us)],
        "slo": ["--latency-slo-ms", f"{args.slo_ms:g}"],
    }
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    servers = {}
    with tempfile.TemporaryDirectory():
        try:
            for name, flags in flavours.items():
                servers[name] = start_server(ROOT / "models", args.max_batch_size, flags)
            ctx = mp.get_context("spawn")
            with ctx.Pool(args.procs) as pool:
                for _, target in servers.values():  # first calls on a fresh server are slow
                    pool.map(_generator, [(target, 50, 0, 2.0, 0)] * args.procs)
                rounds = []  # per round, per step: {server: figures}
                for round_index in range(args.rounds):
                    print(f"round {round_index + 1} of {args.rounds}", flush=True)
                    steps = []
                    for step, rate in enumerate(rates):
                        turn = step + round_index
                        order = list(flavours)[turn % 3 :] + list(flavours)[: turn % 3]
                        results = {}
                        for name in order:
                            proc, target = servers[name]
                            seed = 1000 * round_index + 100 * step
                            results[name] = run_step(pool, proc, target, rate, args, seed)
                        steps.append(results)
                        _print_step(rate, results, args.slo_ms)
                    rounds.append(steps)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    _print_table(rates, list(flavours), rounds, args, large_us)
    return 0


def _print_step(rate: float, results: dict, slo_ms: float) -> None:
    for name, r in results.items():
        flag = " MISS" if r["p99"] > slo_ms else ""
        print(
            f"  {rate:6.0f}/s {name:11s} {r['achieved']:7.0f} img/s  p99 {r['p99']:7.2f} ms{flag}"
            f"  batch {r['batch']:5.1f}  cpu {r['cpu_us']:6.0f} us/req  window {r['window']:.2f} ms"
            f"  failures {r['failures'] or 0}  lag {r['lag'] * 1e3:.0f} ms",
            flush=True,
        )


def _print_table(rates: list, names: list, rounds: list, args, large_us: int) -> None:
    """Medians over the rounds of every figure, one row per step, one column group per server."""
    print(
        f"\nSLO {args.slo_ms:g} ms (server queue + compute, p99); fixed-small: window 0; "
        f"fixed-large: window {large_us / 1000:g} ms; {args.seconds:g} s measured per step "
        f"after {args.settle:g} s; median of {len(rounds)} round(s); {args.procs} open-loop "
        "generator processes on the same host\n"
    )
    head = "| offered req/s | " + " | ".join(
        f"{n} img/s | {n} p99 ms | {n} batch | {n} CPU us/req" for n in names
    )
    print(head + " | slo window ms |")
    print("|" + " --- |" * (2 + 4 * len(names)))
    held = dict.fromkeys(names, 0)
    for step, rate in enumerate(rates):

        def median(name: str, key: str, step: int = step) -> float:
            return statistics.median(r[step][name][key] for r in rounds)

        cells = []
        for name in names:
            p99 = median(name, "p99")
            held[name] += p99 <= args.slo_ms
            miss = " (miss)" if p99 > args.slo_ms else ""
            cells += [
                f"{median(name, 'achieved'):.0f}",
                f"{p99:.1f}{miss}",
                f"{median(name, 'batch'):.1f}",
                f"{median(name, 'cpu_us'):.0f}",
            ]
        print(f"| {rate:.0f} | " + " | ".join(cells) + f" | {median('slo', 'window'):.1f} |")
    print(
        "\nsteps with p99 within the SLO: "
        + ", ".join(f"{name} {held[name]}/{len(rates)}" for name in names)
    )


if __name__ == "__main__":
    sys.exit(main())
