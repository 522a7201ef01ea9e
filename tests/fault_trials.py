"""SIGTERM under load with clients that retry at once (shared by the fault tests; not a test module).

    python -m tests.fault_trials 10      # ten trials against fresh servers, one line each

A request is lost if it is answered anything but success or a clean refusal (UNAVAILABLE from
the server itself, or a connection refused once it is gone): CANCELLED, UNKNOWN, a reset or
closed connection, an internal error.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from tests import server_harness as h

CLEAN_UNAVAILABLE = ("Server exiting", "failed to connect", "Connection refused")


@dataclass
class TrialResult:
    ok: int = 0
    refused: int = 0
    refusals: collections.Counter = field(default_factory=collections.Counter)
    lost: collections.Counter = field(default_factory=collections.Counter)
    exit_code: int | None = None

    def line(self) -> str:
        lost = sum(self.lost.values())
        return (
            f"ok {self.ok}, refused cleanly {self.refused}, lost {lost}"
            + (f" {dict(self.lost)}" if lost else "")
            + f", exit code {self.exit_code}"
        )


def classify(exc: grpc.RpcError) -> str | None:
    """None for a clean refusal, else a short name of how the request was lost."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in CLEAN_UNAVAILABLE):
        return None
    return f"{code.name}: {details[:60]}"


def sigterm_trial(server: h.Server, clients: int = 32, load_seconds: float = 1.0) -> TrialResult:
    """`clients` threads (half on their own connection, half sharing two) send 1-image
    requests and retry refusals with no pause; SIGTERM after `load_seconds`; each client stops
    once the server process has exited and its own call was refused by a closed port."""
    result = TrialResult()
    lock = threading.Lock()
    exited = threading.Event()
    shared = [h.stub(server.target) for _ in range(2)]
    request = h.infer_request("fashion", h.images(1, seed=3))

    def client(index: int) -> None:
        own = h.stub(server.target) if index % 2 else None
        api = own[0] if own else shared[index % 4 // 2][0]
        try:
            while True:
                try:
                    api.ModelInfer(request, timeout=30)
                    outcome = "ok"
                except grpc.RpcError as exc:
                    outcome = classify(exc) or "refused"
                    if outcome == "refused":
                        with lock:
                            result.refusals[(exc.details() or "")[:40]] += 1
                with lock:
                    if outcome == "ok":
                        result.ok += 1
                    elif outcome == "refused":
                        result.refused += 1
                    else:
                        result.lost[outcome] += 1
                if exited.is_set() and outcome != "ok":
                    return
        finally:
            if own:
                own[1].close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(load_seconds)
    server.process.send_signal(signal.SIGTERM)
    result.exit_code = server.process.wait(timeout=60)
    exited.set()
    for thread in threads:
        thread.join(timeout=60)
    for _, channel in shared:
        channel.close()
    return result


def start_server(*flags: str) -> h.Server:
    return h.Server(
        h.repository(),
        "--warmup-batch-sizes",
        "1,64",
        "--drain-seconds",
        "0.3",
        "--grace-period",
        "20",
        *flags,
        metrics=False,
    ).wait_ready()


if __name__ == "__main__":
    lost = 0
    for trial in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        server = start_server()
        try:
            outcome = sigterm_trial(server)
        finally:
            server.stop()
        lost += sum(outcome.lost.values())
        print(f"trial {trial + 1}: {outcome.line()}", flush=True)
    print(f"requests lost over all trials: {lost}")
