"""`convserve serve --workers N`: N server processes sharing one gRPC port.

Python gRPC handles one call at a time per process (the GIL): a single server process tops out
at a few thousand calls per second whatever the cores. Workers are separate `convserve serve`
processes binding the same port with SO_REUSEPORT, so the kernel spreads incoming connections
over them (per connection: a client with one channel stays on one worker). Each worker loads
every model, batches on its own and runs max(1, cores // N) Numba threads (unless
NUMBA_NUM_THREADS is set). The supervisor (this module) serves /metrics summed over the workers
(prometheus-client's multiprocess mode), forwards SIGTERM/SIGINT (each worker drains as a single
server does) and, if a worker dies, stops the others and exits non-zero. ModelStatistics and
health are per worker: they describe the worker a connection landed on.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from convserve.server.config import WORKER_ENV, ServerConfig, to_flags

log = logging.getLogger("convserve.server")
POLL_SECONDS = 0.2


def worker_command(config: ServerConfig) -> list[str]:
    """The command of one worker: the same configuration, one process, no metrics server."""
    flags = to_flags(config)
    command = [sys.executable, "-m", "convserve", "serve", *flags]
    return command + ["--workers", "1", "--metrics-port", "0"]


def supervise(config: ServerConfig) -> int:
    """Start `config.workers` workers and wait for them; returns the exit code."""
    if config.port == 0:
        log.error(
            "cannot start: --workers %d needs a fixed --port (with port 0 each worker would pick "
            "a different one)",
            config.workers,
        )
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="convserve-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    env.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.workers)))
    stopping = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    workers: list[subprocess.Popen] = []
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_server = None
    try:
        log.info(
            "starting %d workers on %s:%d, %s Numba thread(s) each",
            config.workers,
            config.host,
            config.port,
            env["NUMBA_NUM_THREADS"],
        )
        command = worker_command(config)
        for index in range(config.workers):
            # own session: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
            # Started before the metrics thread: preexec_fn is only safe in a single-threaded parent.
            workers.append(
                subprocess.Popen(
                    command,
                    env={**env, WORKER_ENV: str(index)},
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
        if config.metrics_port:
            try:
                metrics_server = _serve_metrics(config, metrics_dir)
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s:%d: %s; stopping the workers",
                    config.host,
                    config.metrics_port,
                    exc,
                )
                forward(signal.SIGTERM, None)
                _wait(workers, stopping, config, metrics_dir)
                return 2
            log.info(
                "metrics of all workers on http://%s:%d/metrics", config.host, config.metrics_port
            )
        return _wait(workers, stopping, config, metrics_dir)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        if metrics_server is not None:
            metrics_server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait(
    workers: list[subprocess.Popen], stopping: list[int], config: ServerConfig, metrics_dir: str
) -> int:
    from prometheus_client import multiprocess

    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < len(workers):
        for index, worker in enumerate(workers):
            if index in codes or worker.poll() is None:
                continue
            codes[index] = worker.returncode
            multiprocess.mark_process_dead(worker.pid, metrics_dir)
            if not stopping:  # a worker died on its own: take the others down too
                log.error(
                    "worker %d (pid %d) exited with %d; stopping the others",
                    index,
                    worker.pid,
                    worker.returncode,
                )
                stopping.append(signal.SIGTERM)
                for other in workers:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        if stopping and deadline is None:
            deadline = time.monotonic() + config.grace_period + 5.0
        if deadline is not None and time.monotonic() > deadline:
            log.error(
                "workers still running %.0f s after the stop signal: killing them",
                config.grace_period + 5,
            )
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
            deadline = float("inf")
        time.sleep(POLL_SECONDS)
    worst = max(codes.values(), key=abs)
    log.info(
        "all workers stopped (exit codes %s)", ", ".join(str(codes[i]) for i in range(len(workers)))
    )
    return worst if worst > 0 else (1 if worst < 0 else 0)


def _die_with_parent() -> None:
    """In the worker before exec: get SIGTERM if the supervisor dies (Linux), not linger alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _serve_metrics(config: ServerConfig, metrics_dir: str):
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    server, _ = start_http_server(config.metrics_port, config.host, registry=registry)
    return server
