"""Latency-SLO batching in the batcher and through a real server on loopback (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
from convserve.proto import grpc_service_pb2 as pb
from convserve.server.batcher import DynamicBatcher
from convserve.server.slo import SloController, SloWindow

from tests import server_harness as h


class Gated:
    """predict = per-image sum; the first call blocks until `gate` is set; records batch sizes."""

    def __init__(self):
        self.gate, self.started, self.sizes = threading.Event(), threading.Event(), []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        if len(self.sizes) == 1:
            self.started.set()
            assert self.gate.wait(10)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float32)


def test_batcher_obeys_the_window_batch_limit_and_reports_every_batch():
    model = Gated()

    controller = SloController(0.5, 0.5, 8)
    window = SloWindow(controller)
    window.batch_limit = 3  # as if the service-time fit had capped the batch
    batcher = DynamicBatcher(model.predict, max_batch_size=8, window=window)
    try:
        first = batcher.submit(np.ones((1, 2, 2, 1), np.float32))
        assert model.started.wait(10)
        queued = [batcher.submit(np.full((1, 2, 2, 1), i, np.float32)) for i in range(7)]
        big = batcher.submit(np.ones((5, 2, 2, 1), np.float32))  # one chunk above the limit
        model.gate.set()
        for job in [first, *queued, big]:
            assert job.future.result(10).error is None
        assert [job.future.result().result[0, 0] for job in queued] == [4 * i for i in range(7)]
        assert model.sizes[:4] == [1, 3, 3, 1] and model.sizes[4] == 5  # a chunk runs whole, alone
        assert len(controller.service._samples) == len(model.sizes)
        assert len(controller._latencies) == 9  # every request's latency reached the controller
    finally:
        batcher.close(10)


def test_a_window_survives_another_instance_taking_the_queue():
    """Instance 0 holds a batch for the window; instance 1 takes the queue meanwhile."""
    model = Gated()

    batcher = DynamicBatcher(
        [model.predict, model.predict],
        max_batch_size=8,
        max_queue_delay_us=300_000,
        extra_instance_min_images=2,
    )
    try:
        image = np.ones((1, 2, 2, 1), np.float32)
        jobs = [batcher.submit(image)]
        assert model.started.wait(10)
        jobs.append(batcher.submit(image))  # waits for instance 0 (below the extra's minimum)
        model.gate.set()
        h.wait_until(lambda: batcher._holding[0], 10, "instance 0 to hold its batch")
        jobs.append(batcher.submit(image))  # two queued: instance 1 takes them
        for job in jobs:
            assert job.future.result(10).error is None
        time.sleep(0.5)  # instance 0's window ends with an empty queue
        assert batcher.alive
        assert batcher.submit(image).future.result(10).error is None
    finally:
        batcher.close(10)


def test_slo_window_holds_an_idle_start_only_after_a_batch_of_several_requests():
    """A lone caller never waits for the window; once batches join several callers, a request
    that finds the model idle waits for company (up to the window)."""
    model = Gated()
    model.gate.set()
    window = SloWindow(SloController(0.5, 0.5, 2))  # batches of at most 2 images
    window.delay_ns = 300_000_000_000  # 300 s: a held request would outlast the test
    batcher = DynamicBatcher(model.predict, max_batch_size=2, window=window)
    image = np.ones((1, 2, 2, 1), np.float32)
    try:
        for _ in range(3):  # one caller at a time: each runs at once, alone
            assert batcher.submit(image).future.result(10).error is None
        assert model.sizes == [1, 1, 1]
        batcher.close(10)
        model = Gated()
        window.delay_ns = 300_000_000_000
        batcher = DynamicBatcher(model.predict, max_batch_size=2, window=window)
        first = batcher.submit(image)
        assert model.started.wait(10)
        pair = [batcher.submit(image) for _ in range(2)]  # queued while busy: one batch of 2
        model.gate.set()
        for job in [first, *pair]:
            assert job.future.result(10).error is None
        held = batcher.submit(image)  # the model is idle, but the last batch joined two callers
        h.wait_until(lambda: batcher._holding[0], 10, "the idle-start batch to be held")
        assert not held.future.done()
        company = batcher.submit(image)  # fills the batch: it leaves at once, not after 300 s
        for job in (held, company):
            assert job.future.result(10).error is None
        assert model.sizes == [1, 2, 2]
    finally:
        model.gate.set()
        batcher.close(10)


def _load(target: str, stop: threading.Event, errors: list, count: list) -> None:
    api, channel = h.stub(target)
    request = h.infer_request("fashion", h.images(1, seed=5))
    try:
        while not stop.is_set():
            try:
                api.ModelInfer(request, timeout=30)
                count.append(1)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                return
    finally:
        channel.close()


def test_server_window_gauge_moves_under_load_and_requests_succeed():
    flags = ("--latency-slo-ms", "500", "--max-batch-size", "32", "--warmup-batch-sizes", "1,32")
    with h.serving(h.repository(), *flags, *h.quick_stop()) as server:
        labels = {"model": "fashion", "version": "2"}  # the latest: what requests reach
        text = server.metrics()
        assert "convserve_batch_window_seconds{" in text
        assert h.metric(text, "convserve_batch_window_seconds", **labels) == 0.0
        assert h.metric(text, "convserve_batch_limit", **labels) == 32.0
        stop, errors, count = threading.Event(), [], []
        clients = [
            threading.Thread(target=_load, args=(server.target, stop, errors, count))
            for _ in range(12)
        ]
        for client in clients:
            client.start()
        try:
            grown = h.wait_until(
                lambda: (
                    h.metric(server.metrics(), "convserve_batch_window_seconds", **labels) or errors
                ),
                timeout=60,
                what="the SLO window to grow",
                interval=0.5,
            )
        finally:
            stop.set()
            for client in clients:
                client.join(60)
        assert not errors, errors[0]
        assert 0 < grown <= 0.5
        assert len(count) > 0
        text = server.metrics()
        assert h.metric(text, "convserve_requests_total", outcome="success", **labels) >= len(count)
        api, channel = h.stub(server.target)
        try:  # ModelConfig reports the window's upper bound: the SLO (no --max-queue-delay-us)
            config = api.ModelConfig(pb.ModelConfigRequest(name="fashion"), timeout=10).config
            assert config.max_batch_size == 32
        finally:
            channel.close()


def test_delay_at_or_above_the_slo_is_refused_at_start():
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "convserve", "serve", "--port", "0", "--metrics-port", "0"]
        + ["--latency-slo-ms", "5", "--max-queue-delay-us", "5000"],
        capture_output=True,
        text=True,
        timeout=120,
        env=h.server_env(),
    )
    assert result.returncode == 2
    assert "--max-queue-delay-us 5000 (5 ms) must be below --latency-slo-ms 5" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 120
