"""Measure what one convserve pod needs: peak memory and CPU of a server, cold and warm start.

    python deploy/measure_resources.py [--threads 2] [--seconds 15] [--repository DIR]

Starts `convserve serve` on 127.0.0.1 with NUMBA_NUM_THREADS=--threads (the pod's CPU limit)
twice: with an empty Numba cache (the first start on a CPU the image was not built on: every
kernel compiles) and with the cache that start left (the usual start). Each is then driven by
the Client: single images from 32 threads, 64-image batches from 4 threads, and two requests of
8,192 images at once (the default --max-request-images). Printed per start: seconds to SERVING,
resident memory once ready, peak resident memory (VmHWM) and the cores used under each load.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB, and CPU seconds (user + system) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "peak_mb": int(fields["VmHWM"].split()[0]) / 1024,
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
    }


def drive(target: str, threads: int, batch: int, seconds: float, pid: int) -> float:
    """Run the load; returns the cores the server used meanwhile (CPU seconds / wall seconds)."""
    from convserve.client import Client

    x = np.random.default_rng(0).integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    stop = time.monotonic() + seconds
    with Client(target, timeout=120) as client:
        client.predict(x[:1])  # metadata cached before the clock starts

        def run() -> None:
            while time.monotonic() < stop:
                client.predict(x)

        workers = [threading.Thread(target=run) for _ in range(threads)]
        before, t0 = proc_status(pid)["cpu_s"], time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (proc_status(pid)["cpu_s"] - before) / (time.monotonic() - t0)


def measure(args: argparse.Namespace, cache: str, label: str) -> None:
    from convserve.client import Client

    port = free_port()
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "convserve", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "0"]
    if args.repository:
        command += ["--model-repository", args.repository]
    t0 = time.monotonic()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, timeout=600) as client:
            client.wait_until_ready(timeout=600)
        ready_s = time.monotonic() - t0
        at_ready = proc_status(server.pid)
        single = drive(target, 32, 1, args.seconds, server.pid)
        batched = drive(target, 4, 64, args.seconds, server.pid)
        drive(target, 2, 8192, 0.1, server.pid)  # two maximal requests at once
        end = proc_status(server.pid)
        print(
            f"{label}: SERVING after {ready_s:.1f} s; resident {at_ready['rss_mb']:.0f} MB when "
            f"ready, peak {end['peak_mb']:.0f} MB; cores used: {single:.2f} (single images, 32 "
            f"threads), {batched:.2f} (batches of 64, 4 threads); NUMBA_NUM_THREADS={args.threads}"
        )
    finally:
        server.terminate()
        server.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="NUMBA_NUM_THREADS (CPU limit)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load phase")
    parser.add_argument("--repository", help="model repository (default: the bundled one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convserve-numba-") as cache:
        measure(args, cache, "cold start (compiles)")
        measure(args, cache, "warm start (cached kernels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
