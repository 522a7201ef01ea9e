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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))

import bench_throughput as bench  # noqa: E402

SCENARIOS = ("single-1", "single-64", "batch64-8")


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


def start_ray(repo: Path, replica_cpus: float, model_server=None) -> str:

    from convserve.ray.serving import start
    from convserve.ray.settings import resolve

    port = bench.free_port()
    settings = resolve(
        flags=dict(
            model_repository=str(repo),
            grpc_port=port,
            http_port=bench.free_port(),
            replica_cpus=replica_cpus,
            num_cpus=max(1, round(replica_cpus)),
            instances=1,
            log_level="WARNING",
        ),
        environ={},
    )
    start(settings, model_server)
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
    args = parser.parse_args(argv)
    scenarios = args.scenario or list(SCENARIOS)
    servers = args.only or ["direct", "ray", "ray-serve-batch"]
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
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
