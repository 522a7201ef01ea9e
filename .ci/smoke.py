"""Checks the CI scripts run against a live server (on the host or in the container).

    python3 .ci/smoke.py wait  --target 127.0.0.1:8001 --since EPOCH --timeout 120
    python3 .ci/smoke.py infer --target 127.0.0.1:8001 --images 512 --min-accuracy 0.8
    python3 .ci/smoke.py drain --target 127.0.0.1:8001 --grace 30 -- docker stop -t 30 NAME
    python3 .ci/smoke.py drain --target 127.0.0.1:8001 --grace 30 --pid PID

`wait` polls grpc.health.v1 until SERVING and prints the seconds since EPOCH (the moment the
caller started the server). `infer` classifies real Fashion-MNIST test images with Triton's own
client (`tritonclient.grpc`), an independent Open Inference Protocol implementation. `drain`
runs the stop command (or sends SIGTERM to --pid and waits for it to end) while calling health and ModelInfer every few milliseconds, and checks the
server drained: health NOT_SERVING first, inference still answered during the drain window, no
error other than UNAVAILABLE once it stops listening, and the stop command finished in time.
Each prints one `name: value` line per figure and exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import gzip
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

DATASET = "/usr/share/datasets/fashion-mnist"
SERVING = health_pb2.HealthCheckResponse.SERVING


def fail(message: str) -> int:
    print(f"FAIL: {message}", file=sys.stderr)
    return 1


def health_status(stub: health_pb2_grpc.HealthStub, timeout: float = 0.5) -> str:
    try:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(
            stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        )
    except grpc.RpcError as exc:
        return exc.code().name


def cmd_wait(args: argparse.Namespace) -> int:
    since = args.since or time.time()
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    with grpc.insecure_channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            last = health_status(stub)
            if last == "SERVING":
                print(f"seconds_to_serving: {time.time() - since:.2f}")
                return 0
            time.sleep(0.02)
    return fail(f"{args.target} not SERVING after {args.timeout:g} s (last answer: {last})")


def load_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(f"{DATASET}/t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(f"{DATASET}/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[:count], labels[:count].astype(np.int64)


def cmd_infer(args: argparse.Namespace) -> int:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(args.target)
    if not client.is_server_ready():
        return fail("ServerReady is false")
    meta = client.get_model_metadata(args.model)
    print(
        f"model: {meta.name} versions {list(meta.versions)} input {meta.inputs[0].datatype} "
        f"{list(meta.inputs[0].shape)} output {meta.outputs[0].name} {list(meta.outputs[0].shape)}"
    )
    images, labels = load_test_images(args.images)
    inp = tc.InferInput("input", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    t0 = time.perf_counter()
    result = client.infer(args.model, [inp], outputs=[tc.InferRequestedOutput("probabilities")])
    elapsed = time.perf_counter() - t0
    probs = result.as_numpy("probabilities")
    if probs is None or probs.shape != (len(images), 10):
        return fail(
            f"probabilities: expected shape ({len(images)}, 10), got {None if probs is None else probs.shape}"
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        return fail("probabilities do not sum to 1")
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    # The classification extension on single images, compared with the batch's answers.
    one = tc.InferInput("input", [1, 28, 28, 1], "UINT8")
    one.set_data_from_numpy(images[:1])
    top = client.infer(
        args.model, [one], outputs=[tc.InferRequestedOutput("probabilities", class_count=3)]
    )
    entries = [
        e.decode() if isinstance(e, bytes) else str(e)
        for e in top.as_numpy("probabilities").reshape(-1)
    ]
    client.close()
    print(f"one_request_images: {len(images)}")
    print(f"one_request_seconds: {elapsed:.3f}")
    print(f"top1_accuracy: {accuracy:.4f}")
    print(f"top3_of_image_0: {entries} (true class {labels[0]})")
    if int(entries[0].split(":")[1]) != int(probs[0].argmax()):
        return fail(
            f"classification top-1 {entries[0]} differs from the probabilities' argmax {probs[0].argmax()}"
        )
    if accuracy < args.min_accuracy:
        return fail(f"top-1 accuracy {accuracy:.4f} < {args.min_accuracy}")
    return 0


def stop_pid(pid: int, timeout: float) -> int:
    """SIGTERM `pid`, wait until it is gone or a zombie (our caller reaps it); 0, or 1 on timeout."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return 0
        except (FileNotFoundError, ProcessLookupError):
            return 0
        time.sleep(0.02)
    return 1


def infer_times_after(
    events: list[tuple[float, str, str]], outcome: str, since: float | None
) -> list[float]:
    """Times of inference calls that ended in `outcome` after `since` (none when `since` is None)."""
    if since is None:
        return []
    return [t for t, kind, result in events if kind == "infer" and result == outcome and t > since]


def cmd_drain(args: argparse.Namespace) -> int:
    import tritonclient.grpc as tc

    images, _ = load_test_images(1)
    events: list[tuple[float, str, str]] = []  # (time, kind, outcome)
    done = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(args.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            client = tc.InferenceServerClient(args.target)
            inp = tc.InferInput("input", [1, 28, 28, 1], "UINT8")
            inp.set_data_from_numpy(images)
            while not done.is_set():
                events.append((time.monotonic(), "health", health_status(stub)))
                try:
                    client.infer(args.model, [inp], client_timeout=5)
                    events.append((time.monotonic(), "infer", "OK"))
                except tc.InferenceServerException as exc:
                    events.append(
                        (time.monotonic(), "infer", str(exc.status()).replace("StatusCode.", ""))
                    )
                time.sleep(0.01)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    if args.pid:
        stop = subprocess.CompletedProcess(
            [], stop_pid(args.pid, args.grace + 30), "", "process still running"
        )
    else:
        try:
            stop = subprocess.run(
                args.command, timeout=args.grace + 30, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            done.set()
            return fail(f"stop command {args.command} still running after {args.grace + 30:g} s")
    stop_seconds = time.monotonic() - t0
    done.set()
    thread.join(10)
    before = [e for e in events if e[0] < t0]
    after = [e for e in events if e[0] >= t0]
    not_serving = [t for t, kind, outcome in after if kind == "health" and outcome != "SERVING"]
    first_not_serving = min(not_serving) if not_serving else None
    drained_ok = infer_times_after(after, "OK", first_not_serving)
    # Once the server refuses (UNAVAILABLE), the transport stops; gRPC core answers the calls it
    # holds but has not handed to a handler with CANCELLED (grpc/grpc#41785). Those were never
    # accepted, so they count apart; a CANCELLED before the refusal is a real failure.
    refused = [t for t, kind, outcome in after if kind == "infer" and outcome == "UNAVAILABLE"]
    first_refused = min(refused) if refused else None
    cancelled_at_stop = infer_times_after(after, "CANCELLED", first_refused)
    bad = sorted(
        {
            outcome
            for t, kind, outcome in after
            if kind == "infer"
            and outcome not in ("OK", "UNAVAILABLE")
            and t not in cancelled_at_stop
        }
    )
    print(f"stop_command_seconds: {stop_seconds:.2f}")
    print(f"requests_ok_before_stop: {sum(1 for e in before if e[1] == 'infer' and e[2] == 'OK')}")
    if first_not_serving is not None:
        print(f"health_not_serving_after_seconds: {first_not_serving - t0:.2f}")
    print(f"requests_ok_while_draining: {len(drained_ok)}")
    print(f"requests_cancelled_by_grpc_core_at_stop: {len(cancelled_at_stop)}")
    if stop.returncode != 0:
        return fail(f"stop command exited {stop.returncode}: {stop.stderr.strip()}")
    if stop_seconds > args.grace:
        return fail(f"stop took {stop_seconds:.1f} s, more than the grace period {args.grace:g} s")
    if not any(e[2] == "OK" for e in before if e[1] == "infer"):
        return fail("no inference succeeded before the stop")
    if first_not_serving is None:
        return fail("health never left SERVING after the stop signal")
    if not drained_ok:
        return fail("no inference was answered after health turned NOT_SERVING (no drain window)")
    if bad:
        return fail(
            f"inference failed with {bad} during the shutdown (only UNAVAILABLE is acceptable)"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    wait = sub.add_parser("wait")
    wait.add_argument("--target", required=True)
    wait.add_argument(
        "--since", type=float, default=0.0, help="epoch seconds the server was started at"
    )
    wait.add_argument("--timeout", type=float, default=120.0)
    wait.set_defaults(func=cmd_wait)
    infer = sub.add_parser("infer")
    infer.add_argument("--target", required=True)
    infer.add_argument("--model", default="fashion_mnist")
    infer.add_argument("--images", type=int, default=512)
    infer.add_argument("--min-accuracy", type=float, default=0.8)
    infer.set_defaults(func=cmd_infer)
    drain = sub.add_parser("drain")
    drain.add_argument("--target", required=True)
    drain.add_argument("--model", default="fashion_mnist")
    drain.add_argument(
        "--grace", type=float, default=30.0, help="the stop must finish within this many seconds"
    )
    drain.add_argument(
        "--pid", type=int, default=0, help="stop this process with SIGTERM (instead of a command)"
    )
    drain.add_argument("command", nargs="*", help="the stop command, after --")
    drain.set_defaults(func=cmd_drain)
    args = parser.parse_args()
    if args.command_name == "drain" and bool(args.pid) == bool(args.command):
        parser.error("drain: give either --pid or a stop command")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
