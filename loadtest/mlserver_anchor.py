"""Run the serving anchor on this machine: MLServer 1.7.1 + ONNX Runtime serving the bundled model.

    python -m venv /tmp/mls && /tmp/mls/bin/pip install mlserver==1.7.1 onnxruntime onnx numpy
    python loadtest/mlserver_anchor.py --mlserver /tmp/mls/bin/mlserver [--seconds 8 --repeat 3]

MLServer is not a dependency of convserve (it pins its own grpcio, protobuf and pydantic), so it
lives in its own virtual environment. This script exports the bundled model to ONNX (the same
export the core benchmark uses), writes an MLServer model directory with adaptive batching
(max batch 64, max batch time 2 ms, as in the anchor of BENCHMARKS.md), starts MLServer on
free loopback ports (inference in the server process, `parallel_workers: 0`: with the default
pool of inference processes this custom runtime did not become ready here), and drives it with `bench_throughput.py`'s generator: single-image UINT8
requests from 1 and 64 concurrent clients, every answer compared with the first one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_dir(folder: Path, batching: bool) -> tuple[int, int]:
    from convserve.core.interop.onnx_export import onnx_model
    from convserve.core.model import Model

    model = Model.load(ROOT / "models" / "fashion_mnist" / "1" / "model.safetensors")
    doc = model.architecture.to_dict()
    weights = {k: v for k, v in model.weights.items()}
    spec = doc["input"]
    model_dir = folder / "fashion_mnist"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(onnx_model(doc, weights))
    (model_dir / "preprocess.json").write_text(
        json.dumps(
            {
                "scale": spec.get("scale", 1.0),
                "mean": spec.get("mean", [0.0]),
                "std": spec.get("std", [1.0]),
            }
        )
    )
    shutil.copy(
        Path(__file__).parent / "mlserver_anchor" / "ort_runtime.py", model_dir / "ort_runtime.py"
    )
    settings = {
        "name": "fashion_mnist",
        "implementation": "ort_runtime.OrtRuntime",
        "parameters": {"uri": str(model_dir / "model.onnx")},
    }
    if batching:
        settings.update(max_batch_size=64, max_batch_time=0.002)
    (model_dir / "model-settings.json").write_text(json.dumps(settings))
    grpc_port, http_port = free_port(), free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": grpc_port,
                "http_port": http_port,
                "host": "127.0.0.1",
                "metrics_endpoint": None,
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    return grpc_port, http_port


def wait_ready(port: int, timeout: float = 120) -> None:
    import grpc
    from convserve.proto import grpc_service_pb2 as pb

    end = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        while time.monotonic() < end:
            try:
                if ready(pb.ModelReadyRequest(name="fashion_mnist"), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError("MLServer did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mlserver", default="/tmp/mls/bin/mlserver", help="the mlserver executable"
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument(
        "--no-batching", action="store_true", help="MLServer without adaptive batching"
    )
    parser.add_argument(
        "--h2load",
        action="store_true",
        help="also 64 h2load connections (answers not checked: MLServer has no ModelStatistics)",
    )
    args = parser.parse_args()
    import bench_throughput as bench

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grpc_port, _ = write_model_dir(folder, batching=not args.no_batching)
        log = open(folder / "mlserver.log", "w")
        proc = subprocess.Popen(
            [args.mlserver, "start", str(folder)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(grpc_port)
            target = f"127.0.0.1:{grpc_port}"
            print(
                f"# MLServer 1.7.1 + ONNX Runtime, adaptive batching {'off' if args.no_batching else 'on (64, 2 ms)'}, "
                f"{args.seconds:.0f} s per run, {args.procs} generator processes, median of {args.repeat}"
            )
            print("scenario   clients     img/s   p50 ms   p99 ms  errors")
            for name, clients in (("single-1", 1), ("single-64", 64)):
                runs = [
                    bench.run_load(target, "fashion_mnist", clients, 1, args.seconds, args.procs)
                    for _ in range(args.repeat)
                ]
                runs.sort(key=lambda r: r["img_per_s"])
                mid = runs[len(runs) // 2]
                print(
                    f"{name:10} {clients:7} {mid['img_per_s']:9.0f} {mid['p50_ms']:8.2f} {mid['p99_ms']:8.2f} "
                    f"{mid['errors']:7}",
                    flush=True,
                )
            if args.h2load:
                runs = sorted(
                    (
                        bench.run_h2load(target, "fashion_mnist", 64, args.seconds, verify=False)
                        for _ in range(args.repeat)
                    ),
                    key=lambda r: r["img_per_s"],
                )
                mid = runs[len(runs) // 2]
                print(
                    f"{'h2load-64':10} {64:7} {mid['img_per_s']:9.0f} {mid['p50_ms']:8.2f} {mid['p99_ms']:8.2f} "
                    f"{mid['errors']:7}",
                    flush=True,
                )
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if proc.returncode not in (0, -15, None):
                print((folder / "mlserver.log").read_text()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
