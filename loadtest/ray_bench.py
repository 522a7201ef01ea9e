"""Convserve through Ray Serve against `convserve serve`, on the same load and the same CPUs.

    python loadtest/ray_bench.py [--seconds 6] [--replica-cpus 2] [--scenario single-1 ...]

Three servers, one after the other, each given the whole machine:

* direct:       `convserve serve --instances 1` (one model copy, all Numba threads);
* ray:          convserve.ray on a local Ray cluster, one replica with --replica-cpus CPUs
                (default: every core), convserve's own batcher in the replica;
* ray-serve-batch: the same application with the replica's ModelInfer batched by Serve's
                `@serve.batch` instead (decoding and encoding still server/protocol.py's).

Each is driven by bench_throughput.py's generator (the same scenarios, every answer checked
against the first). The difference between `direct` and `ray` on single-1 is the cost of the
Ray hop per request (gRPC proxy -> ingress -> model replica, two actor calls); on the batched
scenarios it is what that hop costs in throughput. `ray` against `ray-serve-batch` is the batcher
choice of convserve.ray.

    python loadtest/ray_bench.py --scaling [--rounds 3] [--seconds 6] [--clients 4]

Scaling out instead, on a compute-bound model (`heavy_document`, made here with random weights)
so that replicas, not the hop, are the bottleneck: 4 clients sending 64-image requests to Ray
with 1 and then 2 replicas (1 CPU and 1 Numba thread each), then to `convserve serve
--instances 1` and `--instances 2` (2 Numba threads), alternated for --rounds rounds (medians
reported), after the ceiling: the model's Model.predict in-process with 1 and with 2 threads.
The Ray cluster stays up (idle) while `convserve serve` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))

import bench_throughput as bench  # noqa: E402

SCENARIOS = ("single-1", "single-64", "batch64-8")
HEAVY_MODEL, HEAVY_SHAPE = "cifar10_wide", (32, 32, 3)


def heavy_document() -> dict:
    """The cifar10 preset with twice its filters (3x3 convs of 64, 64, 128, 128 channels): about
    155 MFLOP an image, 15x the reference model, so replicas, not the Ray hop, are the bottleneck."""
    from convserve.core.presets import preset

    document = preset("cifar10")
    document["name"] = HEAVY_MODEL
    for layer in document["layers"]:
        if layer["type"] == "conv2d":
            layer["filters"] *= 2
    return document


def write_heavy_repository(root: Path, seed: int = 0) -> Path:
    """A model repository holding the heavy model (random He-initialised weights) as version 1."""
    from convserve.core import Model
    from convserve.core.bench import random_weights

    document = heavy_document()
    Model(document, random_weights(document, seed)).save(
        root / HEAVY_MODEL / "1" / "model.safetensors"
    )
    return root


def serve_batch_model_server():
    """The model deployment with Serve's @serve.batch in place of convserve's batcher."""
    from convserve.server.errors import ServingError
    from convserve.server.protocol import decode_request, encode_response
    from ray import serve

    from convserve.ray.deployments import ModelServer

    class ServeBatchModelServer(ModelServer):
        async def call(self, method: str, request):
            if method != "ModelInfer":
                return await super().call(method, request)
            try:
                entry = self.servicer.repository.get(request.model_name, request.model_version)
                sig = self.servicer.signatures[(entry.name, entry.version)]
                decoded = decode_request(request, sig)
            except ServingError as exc:
                return None, exc.code, str(exc), ()
            t0 = time.perf_counter_ns()
            result, batch = await self.batched(entry.model, decoded.images)
            elapsed = (time.perf_counter_ns() - t0) // 1000
            response = encode_response(
                request, entry.version_str, decoded, result, sig, 0, elapsed, batch
            )
            return response, None, "", ()

        # max_batch_size counts requests here (Serve batches calls, not images)
        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
        async def batched(self, models, images):
            import numpy as np

            sizes = [x.shape[0] for x in images]
            stacked = np.concatenate(images)
            # compute off the event loop, so requests keep arriving into the next batch
            out = await asyncio.to_thread(models[0].predict, stacked)
            bounds = np.cumsum(sizes)[:-1]
            return [(part, stacked.shape[0]) for part in np.split(out, bounds)]

    return ServeBatchModelServer


def ray_settings(repo: Path, port: int, replica_cpus: float, replicas: int = 1):
    from convserve.ray.settings import resolve

    return resolve(
        flags=dict(
            model_repository=str(repo),
            grpc_port=port,
            http_port=bench.free_port(),
            replica_cpus=replica_cpus,
            num_cpus=max(replicas, round(replica_cpus * replicas)),
            min_replicas=replicas,
            max_replicas=replicas,
            instances=1,
            log_level="WARNING",
        ),
        environ={},
    )


def start_ray(repo: Path, replica_cpus: float, model_server=None) -> str:
    from convserve.ray.serving import start

    port = bench.free_port()
    start(ray_settings(repo, port, replica_cpus), model_server)
    target = f"127.0.0.1:{port}"
    wait_serving(target)
    return target


def wait_serving(target: str, timeout: float = 180.0) -> None:
    import grpc
    from convserve.proto import grpc_service_pb2 as pb
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{target} not ready after {timeout} s")


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def measure(label: str, target: str, model: str, scenarios, seconds: float, procs: int) -> dict:
    results = {}
    for name in scenarios:
        clients, images, _ = bench.SCENARIOS[name]
        r = bench.run_load(target, model, clients, images, seconds, procs)
        results[name] = r
        print(
            f"{label:<16} {name:<10} {clients:>7} {images:>7} {r['img_per_s']:>9.0f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}"
            + (f"  first error: {r['first_error']}" if r["first_error"] else ""),
            flush=True,
        )
    return results


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _ceiling_worker(path: str, rounds: int, seconds: float, queue) -> None:
    """In its own process (its Numba pool gone afterwards): Model.predict img/s on batches of
    64, with 1 and then 2 Numba threads, alternated for `rounds` rounds."""
    import numba
    import numpy as np
    from convserve.core import Model

    model = Model.load(path)
    x = np.random.default_rng(0).integers(0, 256, (64, *HEAVY_SHAPE), dtype=np.uint8)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (1, 2):
            numba.set_num_threads(threads)
            model.predict(x)
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                model.predict(x)
                done += len(x)
            rates[threads].append(done / (time.perf_counter() - t0))
    queue.put(rates)


def ceiling(repo: Path, rounds: int, seconds: float) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    path = str(repo / HEAVY_MODEL / "1" / "model.safetensors")
    worker = ctx.Process(target=_ceiling_worker, args=(path, rounds, seconds, queue))
    worker.start()
    rates = queue.get(timeout=600)
    worker.join()
    return rates


def deploy_replicas(repo: Path, port: int, replicas: int) -> None:
    """Redeploy the application with `replicas` replicas of 1 CPU (1 Numba thread) each and
    wait until exactly those run (Serve replaces every replica: a new version)."""
    from ray import serve

    from convserve.ray.serving import APP_NAME, build, deployment_name

    serve.run(build(ray_settings(repo, port, 1.0, replicas)), name=APP_NAME)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        state = app and app.deployments.get(deployment_name(HEAVY_MODEL))
        if state and state.status == "HEALTHY" and state.replica_states == {"RUNNING": replicas}:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{replicas} replicas not running after 300 s")


def scaling(args) -> int:
    """1 against 2 replicas of a compute-bound model through Ray, `convserve serve --instances 1`
    against 2 on the same load, and the in-process ceiling (1 against 2 Numba threads)."""
    from convserve.ray.serving import start

    median = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_heavy_repository(Path(tmp))
        print(
            f"# {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at "
            f"start; model {HEAVY_MODEL} ({'x'.join(map(str, HEAVY_SHAPE))}), {args.clients} "
            f"clients x 64 images, {args.seconds:g} s per run, {args.rounds} rounds alternated",
            flush=True,
        )
        top = ceiling(repo, args.rounds, min(args.seconds, 3.0))
        print(
            f"ceiling, Model.predict batch 64 in-process: 1 thread {median(top[1]):.0f} img/s, "
            f"2 threads {median(top[2]):.0f} img/s ({median(top[2]) / median(top[1]):.2f}x)",
            flush=True,
        )
        port = bench.free_port()
        ray_target = f"127.0.0.1:{port}"
        rates: dict[tuple[str, int], list[float]] = {}
        try:
            start(ray_settings(repo, port, 1.0, 2))
            wait_serving(ray_target)
            for _ in range(args.rounds):
                for label, n in (("ray", 1), ("ray", 2), ("direct", 1), ("direct", 2)):
                    if label == "ray":
                        deploy_replicas(repo, port, n)
                        target, proc = ray_target, None
                    else:
                        proc, target = bench.start_server(repo, 64, ["--instances", str(n)])
                    try:
                        r = bench.run_load(
                            target,
                            HEAVY_MODEL,
                            args.clients,
                            64,
                            args.seconds,
                            1,
                            shape=HEAVY_SHAPE,
                        )
                    finally:
                        if proc is not None:
                            bench.stop_server(proc)
                    rates.setdefault((label, n), []).append(r["img_per_s"])
                    print(
                        f"{label:<7} {n} {'replicas' if label == 'ray' else 'instances':<9} "
                        f"{r['img_per_s']:>8.0f} img/s  p50 {r['p50_ms']:>7.1f} ms  "
                        f"errors {r['errors']}" + (f" ({r['first_error']})" if r["errors"] else ""),
                        flush=True,
                    )
        finally:
            stop_ray()
    m = {key: median(values) for key, values in rates.items()}
    print(
        f"# medians: Ray 1 replica {m['ray', 1]:.0f}, 2 replicas {m['ray', 2]:.0f} img/s "
        f"({m['ray', 2] / m['ray', 1]:.2f}x); convserve serve --instances 1 {m['direct', 1]:.0f}, "
        f"--instances 2 {m['direct', 2]:.0f} img/s ({m['direct', 2] / m['direct', 1]:.2f}x); "
        f"in-process 2 threads / 1: {median(top[2]) / median(top[1]):.2f}x"
    )
    print(
        f"# Ray hop on this load: 2 replicas reach {m['ray', 2] / m['direct', 2]:.0%} of "
        f"--instances 2, 1 replica {m['ray', 1] / m['direct', 1]:.0%} of --instances 1 "
        "(which computes each batch on both cores)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, help="default: the bundled models/")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--procs", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--replica-cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs of the replica"
    )
    parser.add_argument(
        "--only", action="append", choices=("direct", "ray", "ray-serve-batch"), help="default: all"
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: 1 against 2 replicas of a compute-bound model (and the ceilings)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--scaling: alternated rounds")
    parser.add_argument("--clients", type=int, default=4, help="--scaling: concurrent clients")
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    if args.scaling:
        return scaling(args)
    scenarios = args.scenario or list(SCENARIOS)
    servers = args.only or ["direct", "ray", "ray-serve-batch"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repository or (
            ROOT / "models"
            if any((ROOT / "models").glob("*/*/model.safetensors"))
            else bench.make_repository(Path(tmp))
        )
        model = sorted(p.parent.parent.name for p in repo.glob("*/*/model.safetensors"))[0]
        print(
            f"# model '{model}' from {repo}; {args.seconds:g} s per run, {args.procs} generator "
            f"process(es); cpu count {os.cpu_count()}; replica CPUs {args.replica_cpus:g}"
        )
        print(
            f"{'server':<16} {'scenario':<10} {'clients':>7} {'img/req':>7} {'img/s':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        )
        results = {}
        for label in servers:
            if label == "direct":
                proc, target = bench.start_server(repo, 64, ["--instances", "1"])
                try:
                    results[label] = measure(
                        label, target, model, scenarios, args.seconds, args.procs
                    )
                finally:
                    bench.stop_server(proc)
                continue
            custom = serve_batch_model_server() if label == "ray-serve-batch" else None
            try:
                target = start_ray(repo, args.replica_cpus, custom)
                results[label] = measure(label, target, model, scenarios, args.seconds, args.procs)
            finally:
                stop_ray()
        if "direct" in results and "ray" in results and "single-1" in scenarios:
            hop = results["ray"]["single-1"]["p50_ms"] - results["direct"]["single-1"]["p50_ms"]
            print(f"# cost of the Ray hop (single-1 p50, ray - direct): {hop:.2f} ms per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
