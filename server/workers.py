"""`convserve serve --workers N`: N server processes sharing one gRPC port.

Python gRPC handles one call at a time per process (the GIL): a single server process tops out
at a few thousand calls per second whatever the cores. Workers are separate `convserve serve`
processes binding the same port with SO_REUSEPORT, so the kernel spreads incoming connections
over them (per connection: a client with one channel stays on one worker). Each worker loads
every model, batches on its own and runs max(1, cores // N) Numba threads (unless
NUMBA_NUM_THREADS is set). The supervisor (this module) serves /metrics summed over the workers
(prometheus-client's multiprocess mode), forwards SIGTERM/SIGINT (each worker drains as a single
server does) and restarts a worker that dies, with backoff, while the others keep serving. ModelStatistics and
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
RESTART_FIRST_SECONDS = 0.5  # delay before restarting a dead worker, doubled per death in a row
RESTART_MAX_SECONDS = 30.0
RESTART_STABLE_SECONDS = 60.0  # a worker that ran this long resets its delay


def worker_command(config: ServerConfig) -> list[str]:
    """The command of one worker: the same configuration, one process, no metrics server."""
    flags = to_flags(config)
    command = [sys.executable, "-m", "convserve", "serve", *flags]
    return command + ["--workers", "1", "--metrics-port", "0"]


def supervise(config: ServerConfig) -> int:
    """Start `config.workers` workers, restart those that die, stop them on a signal; returns
    the exit code."""
    if config.port == 0:
        log.error(
            "cannot start: --workers %d needs a fixed --port (with port 0 each worker would pick "
            "a different one)",
            config.workers,
        )
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="convserve-metrics-")
    supervisor = Supervisor(config, metrics_dir)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: supervisor.stop(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    metrics_server = None
    try:
        supervisor.start()
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
                supervisor.stop(signal.SIGTERM)
                supervisor.run()
                return 2
            log.info(
                "metrics of all workers on http://%s:%d/metrics", config.host, config.metrics_port
            )
        return supervisor.run()
    finally:
        supervisor.kill_all()
        if metrics_server is not None:
            metrics_server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)


class Supervisor:
    """The worker processes: started, restarted with backoff when they die, stopped on a signal.

    A worker that dies on its own (a crash, SIGKILL, the OOM killer) is restarted after a delay
    that doubles with each death in a row (RESTART_FIRST_SECONDS up to RESTART_MAX_SECONDS; it
    starts over once a worker has run RESTART_STABLE_SECONDS), as gunicorn and uvicorn do; the
    others keep serving meanwhile. A worker that exits with 2 could not start (bad flags, bad
    models): restarting cannot help, so the supervisor stops the others and exits 2.
    """

    def __init__(self, config: ServerConfig, metrics_dir: str):
        self.config = config
        self.metrics_dir = metrics_dir
        self.command = worker_command(config)
        self.env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        self.env.setdefault(
            "NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.workers))
        )
        self.workers: list[subprocess.Popen | None] = [None] * config.workers
        self.started_at = [0.0] * config.workers
        self.deaths_in_a_row = [0] * config.workers
        self.restart_at: dict[int, float] = {}
        self.restarts = 0
        self.stopping: int | None = None  # the signal being forwarded
        self.exit_code = 0

    def start(self) -> None:
        log.info(
            "starting %d workers on %s:%d, %s Numba thread(s) each",
            self.config.workers,
            self.config.host,
            self.config.port,
            self.env["NUMBA_NUM_THREADS"],
        )
        for index in range(self.config.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
        # The worker asks for SIGTERM should the supervisor die (die_with_supervisor).
        self.workers[index] = subprocess.Popen(
            self.command, env={**self.env, WORKER_ENV: str(index)}, start_new_session=True
        )
        self.started_at[index] = time.monotonic()

    def stop(self, signum: int) -> None:
        """Forward `signum` to every worker (each drains as a single server does)."""
        if self.stopping is None:
            log.info("%s: stopping the workers", signal.Signals(signum).name)
        self.stopping = signum
        self.restart_at.clear()
        for worker in self.workers:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signum)

    def run(self) -> int:
        """Supervise until every worker has stopped after a stop signal; returns the exit code."""
        deadline = None
        while any(w is not None for w in self.workers) or (
            self.restart_at and self.stopping is None
        ):
            for index, worker in enumerate(self.workers):
                if worker is not None and worker.poll() is not None:
                    self._reap(index, worker)
            now = time.monotonic()
            for index, when in list(self.restart_at.items()):
                if now >= when and self.stopping is None:
                    del self.restart_at[index]
                    self.restarts += 1
                    log.info("restarting worker %d", index)
                    self._spawn(index)
            if self.stopping is not None and deadline is None:
                deadline = now + self.config.grace_period + 5.0
            if deadline is not None and now > deadline:
                log.error(
                    "workers still running %.0f s after the stop signal: killing them",
                    self.config.grace_period + 5,
                )
                self.kill_all()
                deadline = float("inf")
            time.sleep(POLL_SECONDS)
        log.info("all workers stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def _reap(self, index: int, worker: subprocess.Popen) -> None:
        from prometheus_client import multiprocess

        self.workers[index] = None
        code = worker.returncode
        # its live gauges (queue depth, readiness) leave the sums; its counters stay in them
        multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if self.stopping is not None:
            # killed by the forwarded signal itself: it was still starting (no handler yet) and
            # had accepted nothing, so that is a clean stop too
            if code not in (0, -self.stopping):
                log.warning("worker %d (pid %d) stopped with %s", index, worker.pid, how)
                self.exit_code = self.exit_code or (code if code > 0 else 1)
            return
        if code == 2:
            log.error(
                "worker %d (pid %d) could not start (exit code 2); stopping the others",
                index,
                worker.pid,
            )
            self.exit_code = 2
            self.stop(signal.SIGTERM)
            return
        lived = time.monotonic() - self.started_at[index]
        self.deaths_in_a_row[index] = (
            1 if lived >= RESTART_STABLE_SECONDS else (self.deaths_in_a_row[index] + 1)
        )
        delay = min(
            RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2 ** (self.deaths_in_a_row[index] - 1)
        )
        log.error(
            "worker %d (pid %d) died (%s) after %.0f s; restarting it in %.1f s, the others "
            "keep serving",
            index,
            worker.pid,
            how,
            lived,
            delay,
        )
        self.restart_at[index] = time.monotonic() + delay

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM if the supervisor dies (Linux), rather than linger alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _serve_metrics(config: ServerConfig, metrics_dir: str):
    from convserve.server.security import Security, serve_metrics
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return serve_metrics(config.metrics_port, config.host, registry, Security.from_config(config))
