"""Closed-loop gRPC throughput benchmark for `convserve serve` (Open Inference Protocol ModelInfer).

    python loadtest/bench_throughput.py                      # starts its own servers, all scenarios
    python loadtest/bench_throughput.py --seconds 5 --procs 2
    python loadtest/bench_throughput.py --target 127.0.0.1:8001 --scenario single-64

The generator is lean: requests are serialized once, sent as bytes on a grpc.aio channel by
`--procs` processes each running its share of the concurrent clients, and every response is
checked byte for byte against the expected probabilities (the server is batch-invariant, so a
response must not depend on which batch it ran in). Each scenario prints images/s and p50/p99
latency. Scenarios:

* single-1:   1 client, 1 image per request, dynamic batching (--max-batch-size 64)
* single-64:  64 clients, 1 image per request, dynamic batching
* nobatch-1 / nobatch-64: the same with the server started with --max-batch-size 1
* batch64-8:  8 clients, 64 images per request
* batch64-1:  1 client, 64 images per request (the latency of a lone large request)
* core:       model.predict on batches of 64 in-process (no server), the ceiling for batch64-8
* h2load-64 / h2load-nobatch-64 (with --h2load): single-image load from h2load (nghttp2-client),
  a native generator that costs far less CPU than Python; correctness checked on the server

With --versus-noop it runs paired rounds instead (FP32 requests, the order alternating by round):
the no-op grpc.aio server of loadtest/noop_server.py, the same behind convserve's handler wrappers,
convserve, and with --before-python an older checkout's convserve, each at single-64, single-1
(and batch64-8 for convserve), then the core in process; it prints img/s, p50/p99, the server's
CPU per call (from /proc/<pid>/stat, warm-up included) and the ratios of each round.

The load generator shares the 2 cores with the server; it costs about 0.3-0.4 ms CPU per request
(BENCHMARKS.md), so single-image figures at high rates are bounded by the generator as well.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"
SCENARIOS = {  # name: (clients, images per request, server flavour)
    "single-1": (1, 1, "batching"),
    "single-64": (64, 1, "batching"),
    "batch64-8": (8, 64, "batching"),
    "batch64-1": (1, 64, "batching"),
    "h2load-64": (64, 1, "batching"),
    "nobatch-1": (1, 1, "nobatch"),
    "nobatch-64": (64, 1, "nobatch"),
    "h2load-nobatch-64": (64, 1, "nobatch"),
}
H2LOAD = ("h2load-64", "h2load-nobatch-64")  # only with --h2load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_repository(path: Path) -> Path:
    """A repository with the reference architecture (random weights) when no trained model is bundled."""
    from convserve.core import Model
    from convserve.core.architecture import parse_architecture
    from convserve.core.presets import preset

    doc = preset("fashion_mnist")
    rng = np.random.default_rng(0)
    weights = {
        k: (rng.standard_normal(s) * 0.1).astype(np.float32)
        for k, s in parse_architecture(doc).weight_shapes().items()
    }
    Model(doc, weights).save(path / "fashion_mnist" / "1" / "model.safetensors")
    return path


def start_server(
    repo: Path, max_batch: int, extra: list[str], python: str = sys.executable
) -> tuple[subprocess.Popen, str]:
    port, metrics_port = free_port(), free_port()
    cmd = [
        python,
        "-m",
        "convserve",
        "serve",
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--max-batch-size",
        str(max_batch),
        "--log-level",
        "WARNING",
        *extra,
    ]
    METRICS[f"127.0.0.1:{port}"] = f"http://127.0.0.1:{metrics_port}/metrics"
    return wait_ready(subprocess.Popen(cmd), f"127.0.0.1:{port}")


def start_noop_server(*extra: str) -> tuple[subprocess.Popen, str]:
    """The no-op grpc.aio server of loadtest/noop_server.py (the ceiling of the stack)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "loadtest" / "noop_server.py"), "--port", str(port), *extra]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL), f"127.0.0.1:{port}")


def wait_ready(proc: subprocess.Popen, target: str) -> tuple[subprocess.Popen, str]:
    """Wait until the server at `target` answers health SERVING; returns (proc, target)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                channel.close()
                return proc, target
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 180 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        proc.kill()


def build_request(model: str, images: np.ndarray, datatype: str = "UINT8") -> bytes:
    """A serialized request for `images` (uint8), sent as UINT8 or as FP32 pixel values."""
    from convserve.proto import grpc_service_pb2 as pb

    if datatype == "FP32":
        images = images.astype("<f4")
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype=datatype, shape=images.shape)
    req.outputs.add(name="probabilities")
    req.raw_input_contents.append(images.tobytes())
    return req.SerializeToString()


def _worker(
    target: str,
    model: str,
    clients: int,
    images_per_request: int,
    seconds: float,
    warmup: float,
    seed: int,
    queue: mp.Queue,
    shape: tuple[int, ...] = (28, 28, 1),
    datatype: str = "UINT8",
) -> None:
    """One generator process: `clients` concurrent closed-loop callers; reports latencies (s)
    and the number of calls it made in all (warm-up included)."""
    import grpc
    from convserve.proto import grpc_service_pb2 as pb

    calls = 0

    async def main() -> tuple[list[float], int, int, str]:
        nonlocal calls
        rng = np.random.default_rng(seed)
        options = [
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30),
        ]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary(
                METHOD,
                request_serializer=None,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            # Distinct images per client; the expected output of each comes from a first call.
            payloads = []
            for _ in range(clients):
                imgs = rng.integers(0, 256, (images_per_request, *shape), dtype=np.uint8)
                body = build_request(model, imgs, datatype)
                first = await call(body, timeout=60)
                calls += 1
                payloads.append((body, first.raw_output_contents[0]))
            latencies: list[float] = []
            errors = inexact = 0
            first_error = ""
            t_start = time.perf_counter()
            t_measure = t_start + warmup
            t_end = t_measure + seconds

            async def client(body: bytes, expected: bytes) -> None:
                nonlocal errors, inexact, first_error, calls
                perf = time.perf_counter
                want = np.frombuffer(expected, np.float32)
                while True:
                    t0 = perf()
                    if t0 >= t_end:
                        return
                    try:
                        resp = await call(body, timeout=30)
                        got = resp.raw_output_contents[0]
                        ok = got == expected
                        if (
                            not ok
                        ):  # not bit-identical: the core is not batch-invariant; check closeness
                            ok = len(got) == len(expected) and np.allclose(
                                np.frombuffer(got, np.float32), want, rtol=1e-4, atol=1e-6
                            )
                            inexact += t0 >= t_measure
                            if not ok and not first_error:
                                first_error = "response differs from the expected probabilities"
                    except grpc.RpcError as exc:
                        ok = False
                        if not first_error:
                            first_error = f"{exc.code()}: {exc.details()}"
                    t1 = perf()
                    calls += 1
                    if t0 >= t_measure:
                        if ok:
                            latencies.append(t1 - t0)
                        else:
                            errors += 1

            await asyncio.gather(*(client(b, e) for b, e in payloads))
            return latencies, errors, inexact, first_error

    lat, errors, inexact, first_error = asyncio.run(main())
    queue.put((lat, errors, inexact, first_error, calls))


METRICS: dict[str, str] = {}  # target -> its /metrics URL, for servers with several workers


def counters(target: str, model: str) -> dict[str, int]:
    """A model's success and failure counts, images inferred and executions, from the server's
    /metrics when known (summed over `--workers`), else from ModelStatistics (per process)."""
    if target in METRICS:
        import urllib.request

        with urllib.request.urlopen(METRICS[target], timeout=10) as response:
            text = response.read().decode()
        out = {"success": 0, "fail": 0, "images": 0, "executions": 0}
        for line in text.splitlines():
            if line.startswith("#") or f'model="{model}"' not in line:
                continue
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            if name == "convserve_requests_total":
                out["success" if 'outcome="success"' in line else "fail"] += int(value)
            elif name == "convserve_inference_images_total":
                out["images"] += int(value)
            elif name == "convserve_batch_size_count":
                out["executions"] += int(value)
        return out
    import grpc
    from convserve.proto import grpc_service_pb2 as pb
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stats = (
            pb_grpc.GRPCInferenceServiceStub(channel)
            .ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
            .model_stats
        )
    return {
        "success": sum(s.inference_stats.success.count for s in stats),
        "fail": sum(s.inference_stats.fail.count for s in stats),
        "images": sum(s.inference_count for s in stats),
        "executions": sum(s.execution_count for s in stats),
    }


def server_counts(target: str, model: str) -> tuple[int, int]:
    """(images inferred, executions) of a model: their ratio is the mean batch."""
    c = counters(target, model)
    return c["images"], c["executions"]


def run_load(
    target: str,
    model: str,
    clients: int,
    images: int,
    seconds: float,
    procs: int,
    warmup: float = 1.0,
    shape: tuple[int, ...] = (28, 28, 1),
    datatype: str = "UINT8",
    server_pid: int | None = None,
) -> dict:
    """Closed-loop load from `procs` processes: img/s, p50/p99 latency and errors; `shape` is
    one image's (H, W, C). With `server_pid`, also the server's CPU time per call (its CPU over
    the whole run, warm-up included, over every call the generator made)."""
    import resource

    procs = max(1, min(procs, clients))
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(target, model, n, images, seconds, warmup, 1000 + i, queue, shape, datatype),
        )
        for i, n in enumerate(shares)
    ]
    for w in workers:
        w.start()
    results = []
    give_up = time.monotonic() + seconds + warmup + 180
    while len(results) < len(workers):
        try:
            results.append(queue.get(timeout=1.0))
        except Exception:  # queue.Empty: check that the workers are still alive
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead or time.monotonic() > give_up:
                for w in workers:
                    w.kill()
                raise RuntimeError(
                    f"load generator process failed (exit codes {[w.exitcode for w in workers]})"
                ) from None
    for w in workers:
        w.join()
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else float("nan")
    gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen_cpu = gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime
    calls = sum(r[4] for r in results)
    latencies = sorted(x for lat, *_ in results for x in lat)
    errors = sum(r[1] for r in results)
    inexact = sum(r[2] for r in results)
    first_error = next((r[3] for r in results if r[3]), "")
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "inexact": inexact,
        "first_error": first_error,
        "img_per_s": n * images / seconds,
        "p50_ms": 1e3 * latencies[n // 2] if n else float("nan"),
        "p99_ms": 1e3 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
        "server_us_per_call": 1e6 * cpu / max(1, calls),
        "generator_us_per_call": 1e6 * gen_cpu / max(1, calls),
    }


def error_note(result: dict) -> str:
    """The first error of a run, for the end of its line ("" when none)."""
    return f"  first error: {result['first_error']}" if result["first_error"] else ""


def run_h2load(target: str, model: str, clients: int, seconds: float, verify: bool = True) -> dict:
    """The same single-image load from h2load (nghttp2-client, native): `clients` HTTP/2
    connections with one stream each, a fixed request count sized from a calibration run (which
    also warms up). h2load does not read gRPC trailers, so correctness is checked on the server:
    its failure count must not move and its success count must equal h2load's answers. With
    `verify=False` (a server without these counters) only non-200 answers count as errors."""
    import shutil
    import struct

    if shutil.which("h2load") is None:
        raise RuntimeError("h2load not found (Debian package nghttp2-client)")
    with tempfile.TemporaryDirectory() as tmp:
        body = build_request(
            model, np.random.default_rng(7).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
        )
        data, log = Path(tmp, "request.bin"), Path(tmp, "requests.log")
        data.write_bytes(
            b"\x00" + struct.pack(">I", len(body)) + body
        )  # gRPC length-prefixed message

        def stats() -> tuple[int, int]:
            if not verify:
                return 0, 0
            c = counters(target, model)
            return c["success"], c["fail"]

        def h2load(requests: int) -> tuple[list[list[str]], float]:
            log.unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(
                [
                    "h2load",
                    "-c",
                    str(clients),
                    "-m",
                    "1",
                    "-t",
                    "1",
                    "-n",
                    str(requests),
                    "--data",
                    str(data),
                    "--log-file",
                    str(log),
                    "-H",
                    "content-type: application/grpc",
                    "-H",
                    "te: trailers",
                    f"http://{target}{METHOD}",
                ],
                check=True,
                capture_output=True,
            )
            elapsed = time.perf_counter() - t0
            return [
                line.split("\t") for line in log.read_text().splitlines() if line.strip()
            ], elapsed

        calibration, elapsed = h2load(clients * 20)  # also the warm-up
        total = max(clients * 20, int(len(calibration) / elapsed * seconds))
        ok0, fail0 = stats()
        rows, elapsed = h2load(total)  # a fixed count: h2load never cuts calls off
        ok1, fail1 = stats()
    latencies = sorted(int(r[2]) / 1e6 for r in rows if r[1] == "200")
    n = len(latencies)
    errors = (len(rows) - n) + ((fail1 - fail0) + abs(n - (ok1 - ok0)) if verify else 0)
    return {
        "requests": n,
        "errors": errors,
        "inexact": 0,
        "first_error": ""
        if not errors
        else f"{fail1 - fail0} server-side failures, {len(rows) - n} non-200 responses, "
        f"{ok1 - ok0} server successes for {n} answers",
        "img_per_s": n / elapsed,
        "p50_ms": 1e3 * latencies[n // 2] if n else float("nan"),
        "p99_ms": 1e3 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
    }


def core_throughput(repo: Path, model: str, seconds: float, batch: int = 64) -> float:
    from convserve.core import Model

    version = max(
        (p for p in (repo / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    m = Model.load(version / "model.safetensors")
    m.warmup((batch,))
    x = np.random.default_rng(0).integers(0, 256, (batch, *m.input_shape), dtype=np.uint8)
    runs = []
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            m.predict(x)
            n += batch
        runs.append(n / (time.perf_counter() - t0))
    return statistics.median(runs)


VERSUS = (  # scenario, clients, images per request, servers it runs against
    ("single-64", 64, 1, "all"),
    ("single-1", 1, 1, "all"),
    ("batch64-8", 8, 64, "convserve"),
)


def versus_noop(args: argparse.Namespace, repo: Path, model: str) -> int:
    """Paired rounds: the no-op grpc.aio server, convserve (and convserve run by
    `--before-python`, e.g. an older checkout) under the same FP32 load, one after the other,
    the order alternating by round; then the core in process. Prints every run, then medians
    and the ratios of each round."""
    # noop+wrappers: the same no-op handler behind convserve's admission and parsing wrappers;
    # noop+wrappers+handoff: also through a worker thread and back, as every batched request
    # goes; what these cost apart from the rest of the request path
    flags = {
        "noop": [],
        "noop+wrappers": ["--with-wrappers"],
        "noop+wrappers+handoff": ["--with-wrappers", "--thread-handoff"],
    }
    servers = {**dict.fromkeys(flags), "convserve": sys.executable}
    if args.before_python:
        servers["before"] = args.before_python
    rows: dict[tuple[str, str], list[dict]] = {}
    print(
        f"{'round':>5} {'server':<21} {'scenario':<10} {'img/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'server us/call':>14} {'generator us/call':>17} {'errors':>6}"
    )
    for round_ in range(args.repeat):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for kind in order:
            if kind.startswith("noop"):
                proc, target = start_noop_server(*flags[kind])
            else:
                proc, target = start_server(repo, 64, args.server_arg, servers[kind])
            try:
                for name, clients, images, where in VERSUS:
                    if where != "all" and kind.startswith("noop"):
                        continue
                    r = run_load(
                        target,
                        model,
                        clients,
                        images,
                        args.seconds,
                        args.procs,
                        datatype="FP32",
                        server_pid=proc.pid,
                    )
                    rows.setdefault((kind, name), []).append(r)
                    print(
                        f"{round_ + 1:>5} {kind:<21} {name:<10} {r['img_per_s']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                        f"{r['server_us_per_call']:>14.0f} {r['generator_us_per_call']:>17.0f} {r['errors']:>6}"
                        + error_note(r),
                        flush=True,
                    )
            finally:
                stop_server(proc)
        core = core_throughput(repo, model, args.seconds)
        rows.setdefault(("core", "batch-64"), []).append({"img_per_s": core})
        print(f"{round_ + 1:>5} {'core':<10} {'batch-64':<10} {core:>8.0f}", flush=True)

    def median(kind: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[(kind, name)])

    def ratios(a: tuple[str, str], b: tuple[str, str], key: str = "img_per_s") -> str:
        each = [x[key] / y[key] for x, y in zip(rows[a], rows[b])]
        return f"{statistics.median(each):.1%} (rounds: {', '.join(f'{v:.1%}' for v in each)})"

    print(f"\n# medians of {args.repeat} round(s), {args.seconds:g} s per run, FP32 requests")
    print(
        f"{'server':<21} {'scenario':<10} {'img/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'server us/call':>14}"
    )
    for kind, name in rows:
        if kind == "core":
            print(f"{kind:<21} {name:<10} {median(kind, name, 'img_per_s'):>8.0f}")
            continue
        print(
            f"{kind:<21} {name:<10} {median(kind, name, 'img_per_s'):>8.0f} {median(kind, name, 'p50_ms'):>7.2f} "
            f"{median(kind, name, 'p99_ms'):>7.2f} {median(kind, name, 'server_us_per_call'):>14.0f}"
        )
    for kind in servers:
        if kind.startswith("noop"):
            if kind != "noop":
                print(
                    f"{kind}/noop at 64 single-image clients: {ratios((kind, 'single-64'), ('noop', 'single-64'))}"
                )
            continue
        print(
            f"{kind}/noop at 64 single-image clients: {ratios((kind, 'single-64'), ('noop', 'single-64'))}"
        )
        print(
            f"{kind} 64-image requests / core batch 64: {ratios((kind, 'batch64-8'), ('core', 'batch-64'))}"
        )
    if "before" in servers:
        print(
            f"p50 at 1 client, convserve/before: {ratios(('convserve', 'single-1'), ('before', 'single-1'), 'p50_ms')}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start servers)")
    parser.add_argument(
        "--metrics-target",
        help="HOST:PORT of that server's metrics, to count over all its "
        "workers (default: ModelStatistics, which is per worker process)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="repository to serve (default: models/ or a "
        "generated one with the reference architecture)",
    )
    parser.add_argument(
        "--model", default=None, help="model name (default: the first in the repository)"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIOS, "core"],
        help="scenario(s) to run (default: all)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per scenario (the median is reported)"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for started servers"
    )
    parser.add_argument(
        "--h2load",
        action="store_true",
        help="also load with h2load (native, nghttp2-client), "
        "to see the server's capacity without the Python generator's CPU cost",
    )
    parser.add_argument(
        "--versus-noop",
        action="store_true",
        help="paired rounds against the no-op grpc.aio server (loadtest/noop_server.py) with "
        "FP32 requests: single-64, single-1, batch64-8 and the core; --repeat is the rounds",
    )
    parser.add_argument(
        "--before-python",
        help="with --versus-noop: also run convserve with this interpreter (a venv holding an "
        "older checkout), to compare before and after in the same rounds",
    )
    args = parser.parse_args(argv)
    scenarios = args.scenario or [*(s for s in SCENARIOS if args.h2load or s not in H2LOAD), "core"]

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repository
        if repo is None:
            bundled = ROOT / "models"
            repo = (
                bundled
                if any(bundled.glob("*/*/model.safetensors"))
                else make_repository(Path(tmp))
            )
        model = (
            args.model
            or sorted(p.parent.parent.name for p in repo.glob("*/*/model.safetensors"))[0]
        )
        if args.versus_noop:
            return versus_noop(args, repo, model)
        print(
            f"# model '{model}' from {repo}; {args.seconds:g} s per run, {args.procs} generator process(es), "
            f"median of {args.repeat}; cpu count {os.cpu_count()}"
        )
        print(
            f"{'scenario':<12} {'clients':>7} {'img/req':>7} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'not-bit-identical':>17} {'avg batch':>9}"
        )
        for flavour in ("batching", "nobatch"):
            names = [s for s in scenarios if s in SCENARIOS and SCENARIOS[s][2] == flavour]
            if not names:
                continue
            proc = None
            if args.target:
                target = args.target
                if args.metrics_target:
                    METRICS[target] = f"http://{args.metrics_target}/metrics"
            else:
                proc, target = start_server(
                    repo, 64 if flavour == "batching" else 1, args.server_arg
                )
            try:
                for name in names:
                    clients, images, _ = SCENARIOS[name]
                    before = server_counts(target, model)
                    if name in H2LOAD:
                        runs = [
                            run_h2load(target, model, clients, args.seconds)
                            for _ in range(args.repeat)
                        ]
                    else:
                        runs = [
                            run_load(target, model, clients, images, args.seconds, args.procs)
                            for _ in range(args.repeat)
                        ]
                    r = sorted(runs, key=lambda r: r["img_per_s"])[len(runs) // 2]
                    done_images, executions = (
                        a - b for a, b in zip(server_counts(target, model), before)
                    )
                    print(
                        f"{name:<12} {clients:>7} {images:>7} {r['img_per_s']:>9.0f} {r['p50_ms']:>8.2f} "
                        f"{r['p99_ms']:>8.2f} {r['errors']:>6} {r['inexact']:>17} {done_images / max(1, executions):>9.1f}"
                        + error_note(r),
                        flush=True,
                    )
            finally:
                if proc is not None:
                    stop_server(proc)
        if "core" in scenarios:
            print(
                f"{'core':<12} {'-':>7} {64:>7} {core_throughput(repo, model, args.seconds):>9.0f} "
                f"{'-':>8} {'-':>8} {'-':>6}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
