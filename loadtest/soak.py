"""Soak: mixed traffic for a given time while sampling the server's memory; prints a verdict.

    python loadtest/soak.py --duration 30m                 # starts `convserve serve` itself
    python loadtest/soak.py --duration 2m --rate 40        # what CI runs
    python loadtest/soak.py --target HOST:PORT --pid PID   # a running server (RSS read from PID)

Traffic (real Fashion-MNIST test images, paced to `--rate` calls per second over `--clients`
connections): requests of 1, 8 and 64 images as UINT8 and as FP32, whose answers are checked
(shape, probabilities, top-1 accuracy); malformed requests, which must be refused with
INVALID_ARGUMENT; calls cancelled by the client soon after they are sent; calls with a deadline
too short to finish. A failure is any other outcome: a wrong status, a wrong answer, an error.
A call refused UNAVAILABLE is tried once more, as the project's client does (the server closes
connections after --max-connection-age-secs; a call racing that GOAWAY is refused), and counted:
more than RETRIED_SHARE of the calls is a failure.

The server's RSS is sampled every few seconds. The verdict compares RSS after the warm-up
(minute 2, or half the run if shorter) with RSS at the end and passes when there were no
failures and the growth stays under `--max-growth` percent. With a server it started, the soak
also checks that the server's own metrics counted every successful request, then stops it with
SIGTERM (exit code 0 expected).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist_requests as mr  # noqa: E402

MODEL = "fashion_mnist"
# The most calls, as a share of all, that may need their one retry after UNAVAILABLE: a
# connection's GOAWAY race is rarer by far (1 of 1,600 calls with connections closed every
# 0.5 s, 120 times the default rate); more means the server itself refuses (a full queue).
RETRIED_SHARE = 0.01
WARMUP_SECONDS = 120.0  # RSS is compared from here (or half the run, if shorter)
SAMPLE_SECONDS = 5.0
# (kind, weight): what one call of the mix does
MIX = (
    ("uint8x1", 30),
    ("uint8x8", 15),
    ("uint8x64", 8),
    ("fp32x1", 10),
    ("fp32x8", 8),
    ("fp32x64", 5),
    ("bad", 8),
    ("cancel", 8),
    ("deadline", 8),
)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 2m or 1h, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Pacer:
    """Hands out call slots at `rate` per second over all threads (no bursts beyond one slot)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            self.next = max(self.next + self.interval, now)
            delay = self.next - now
        if delay > 0:
            time.sleep(delay)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()  # (kind, outcome)
        self.failures: collections.Counter = collections.Counter()  # "kind: what"
        self.images_ok = 0
        self.correct = 0
        self.retried = 0  # calls tried again after UNAVAILABLE (`Traffic.infer`)
        self.retry_reasons: collections.Counter = collections.Counter()  # their first answers

    def add(self, kind: str, outcome: str, failure: str | None = None) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if failure:
                self.failures[f"{kind}: {failure}"[:160]] += 1


class Traffic:
    """The request mix against one target; `run()` is one client thread."""

    def __init__(self, target: str, images: np.ndarray, labels: np.ndarray, seed: int):
        self.target = target
        self.images, self.labels = images, labels
        self.seed = seed
        self.tally = Tally()
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]

    def request(self, rng: random.Random, count: int, fp32: bool):
        start = rng.randrange(0, len(self.images) - count)
        x = self.images[start : start + count]
        request = pb.ModelInferRequest(model_name=MODEL, id=f"soak-{start}")
        tensor = request.inputs.add(name="input", datatype="FP32" if fp32 else "UINT8")
        tensor.shape.extend(x.shape)
        request.raw_input_contents.append(
            (x.astype(np.float32) if fp32 else x).tobytes()  # FP32 pixels 0-255, like UINT8
        )
        return request, self.labels[start : start + count]

    def infer(self, api, request, timeout: float):
        """ModelInfer, tried once more after UNAVAILABLE, as the project's client does: the
        server closes each connection after --max-connection-age-secs, and a call that races
        that GOAWAY is refused UNAVAILABLE without the server seeing it (gRPC's retryable
        status). A second UNAVAILABLE is the caller's to judge."""
        try:
            return api.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            with self.tally.lock:
                self.tally.retried += 1
                self.tally.retry_reasons[(exc.details() or "")[:120]] += 1
        return api.ModelInfer(request, timeout=timeout)

    def run(self, stop: threading.Event, pacer: Pacer, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        options = [("grpc.max_receive_message_length", 1 << 26)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            api = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                pacer.wait()
                if stop.is_set():
                    break
                kind = rng.choices(self.kinds, self.weights)[0]
                try:
                    self.call(api, kind, rng)
                except Exception as exc:  # noqa: BLE001 - a soak reports, never dies
                    self.tally.add(kind, "error", f"{type(exc).__name__}: {exc}")

    def call(self, api, kind: str, rng: random.Random) -> None:
        tally = self.tally
        if kind == "bad":
            request, _ = self.request(rng, 1, False)
            request.inputs[0].shape[1] = 27  # pixels for 28x28, shape says 27x28
            expect = grpc.StatusCode.INVALID_ARGUMENT
            try:
                self.infer(api, request, 30)
                tally.add(kind, "ok", "a malformed request was answered")
            except grpc.RpcError as exc:
                tally.add(kind, exc.code().name, None if exc.code() == expect else exc.details())
            return
        if kind in ("cancel", "deadline"):
            request, _ = self.request(rng, rng.choice((8, 64)), rng.random() < 0.5)
            if kind == "cancel":
                future = api.ModelInfer.future(request, timeout=30)
                time.sleep(rng.uniform(0.0, 0.005))
                future.cancel()
                allowed = (grpc.StatusCode.CANCELLED,)
                try:
                    future.result()
                    tally.add(kind, "ok")
                    return
                except grpc.FutureCancelledError:
                    tally.add(kind, "CANCELLED")
                    return
                except grpc.RpcError as exc:
                    code = exc.code()
            else:
                allowed = (grpc.StatusCode.DEADLINE_EXCEEDED,)
                try:
                    self.infer(api, request, rng.uniform(0.0005, 0.003))
                    tally.add(kind, "ok")
                    return
                except grpc.RpcError as exc:
                    code = exc.code()
            tally.add(kind, code.name, None if code in allowed else f"answered {code.name}")
            return
        count = int(kind.split("x")[1])
        request, labels = self.request(rng, count, kind.startswith("fp32"))
        try:
            response = self.infer(api, request, 60)
        except grpc.RpcError as exc:
            tally.add(kind, exc.code().name, f"{exc.code().name}: {exc.details()}")
            return
        try:
            predicted = mr.top1(response, count)
        except ValueError as exc:
            tally.add(kind, "wrong", str(exc))
            return
        tally.add(kind, "ok")
        with tally.lock:
            tally.images_ok += count
            tally.correct += int((predicted == labels).sum())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str, int, Path]:
    port, metrics_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="convserve-soak-", suffix=".log")[1])
    command = [sys.executable, "-m", "convserve", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", str(metrics_port), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    target = f"127.0.0.1:{port}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 300
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not become ready; its log:\n{log.read_text()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return process, target, metrics_port, log
            except grpc.RpcError:
                pass
            time.sleep(0.2)


def counted_requests(metrics_port: int) -> collections.Counter:
    """The server's convserve_requests_total for the model, by outcome."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counts: collections.Counter = collections.Counter()
    for line in text.splitlines():
        if line.startswith("convserve_requests_total{") and f'model="{MODEL}"' in line:
            outcome = re.search(r'outcome="(\w+)"', line)[1]
            counts[outcome] += float(line.rsplit(" ", 1)[1])
    return counts


def check_metrics(tally: Tally, counted: collections.Counter) -> list[str]:
    """The server's counts against the clients': a call cancelled or timed out on the client
    may still have been answered on the server, and one cancelled at once may never arrive."""
    calls = sum(tally.outcomes.values())
    ok = sum(n for (_, outcome), n in tally.outcomes.items() if outcome == "ok")
    raced = sum(
        n
        for (kind, outcome), n in tally.outcomes.items()
        if kind in ("cancel", "deadline") and outcome != "ok"
    )
    problems = []
    if not ok <= counted["success"] <= ok + raced:
        problems.append(
            f"server counted {counted['success']:.0f} successes, clients {ok} (+{raced} raced)"
        )
    total = sum(counted.values())
    if not calls - raced <= total <= calls:
        problems.append(
            f"server counted {total:.0f} requests, clients sent {calls} ({raced} raced)"
        )
    return [f"metrics: {p}" for p in problems]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--rate", type=float, default=40.0, help="calls per second, all clients")
    parser.add_argument(
        "--clients", type=int, default=8, help="client threads (one connection each)"
    )
    parser.add_argument("--target", help="a running server HOST:PORT (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's process id (for its RSS)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth bound, percent")
    parser.add_argument("--dataset", default=mr.DEFAULT_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("server_flags", nargs="*", help="after --: flags for `convserve serve`")
    args = parser.parse_args()
    if args.target and not args.pid:
        parser.error("--target needs --pid (the soak samples the server's RSS)")

    images, labels = mr.load_images(args.dataset)
    process = None
    if args.target:
        target, pid, metrics_port = args.target, args.pid, 0
    else:
        process, target, metrics_port, log = start_server(args.server_flags)
        pid = process.pid
        print(f"soak: server pid {pid} on {target}, log {log}", flush=True)
    traffic = Traffic(target, images, labels, args.seed)
    stop = threading.Event()
    pacer = Pacer(args.rate)
    threads = [
        threading.Thread(target=traffic.run, args=(stop, pacer, i), daemon=True)
        for i in range(args.clients)
    ]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    warm = min(WARMUP_SECONDS, args.duration / 2)
    samples: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
    next_report = 60.0
    while (elapsed := time.monotonic() - t0) < args.duration:
        time.sleep(min(SAMPLE_SECONDS, max(0.05, args.duration - elapsed)))
        samples.append((time.monotonic() - t0, rss_mb(pid)))
        if samples[-1][0] >= next_report:
            calls = sum(traffic.tally.outcomes.values())
            print(
                f"soak: {samples[-1][0] / 60:.0f} min, {calls} calls, "
                f"{sum(traffic.tally.failures.values())} failures, RSS {samples[-1][1]:.0f} MB",
                flush=True,
            )
            next_report += 60.0
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    tally = traffic.tally
    rss_warm = next(rss for t, rss in samples if t >= warm)
    rss_end = samples[-1][1]
    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    failures = sum(tally.failures.values())
    ok = sum(n for (_, outcome), n in tally.outcomes.items() if outcome == "ok")
    if process is not None:
        for problem in check_metrics(tally, counted_requests(metrics_port)):
            tally.failures[problem] += 1
            failures += 1
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        if code != 0:
            tally.failures[f"server exited with {code} after SIGTERM"] += 1
            failures += 1
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, outcome), n in sorted(tally.outcomes.items()):
        by_kind[kind][outcome] = n
    print("soak: outcomes by kind:")
    for kind, outcomes in by_kind.items():
        print(f"  {kind:9s} {outcomes}")
    calls = sum(tally.outcomes.values())
    print(f"soak: {tally.retried} call(s) tried again after UNAVAILABLE (a connection's GOAWAY)")
    for what, n in tally.retry_reasons.most_common(5):
        print(f"  retried x{n}: {what}")
    if tally.retried > RETRIED_SHARE * max(calls, 1):
        failures += 1
        print(
            f"  FAILURE: more than {RETRIED_SHARE:.0%} of the calls were refused UNAVAILABLE once"
        )
    for what, n in tally.failures.most_common(10):
        print(f"  FAILURE x{n}: {what}")
    accuracy = tally.correct / tally.images_ok if tally.images_ok else 0.0
    passed = failures == 0 and growth < args.max_growth
    print(
        f"soak verdict: {'PASS' if passed else 'FAIL'}: {args.duration / 60:.1f} min, "
        f"{calls} calls ({ok} answered, top-1 accuracy {accuracy:.3f}), "
        f"{failures} failures, RSS {samples[0][1]:.0f} MB at start, {rss_warm:.0f} MB at "
        f"{warm / 60:.1f} min, {rss_end:.0f} MB at the end, peak "
        f"{max(r for _, r in samples):.0f} MB, growth {growth:+.1f} % (bound {args.max_growth:g} %)",
        flush=True,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
