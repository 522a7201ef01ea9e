"""DynamicBatcher on its own: batch formation, chunking, limits and failure isolation.

`predict` here is plain NumPy (the per-image pixel sum) gated by events, so the tests control
exactly what is queued while the "model" is busy; no timing is asserted.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from convserve.server.batcher import DynamicBatcher, Job
from convserve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
    Unavailable,
)


def wait_all(jobs: list[Job], timeout: float | None = None) -> list[Job]:
    """Block until every job's (concurrent) future is done; returns the finished jobs."""
    return [job.future.result(timeout) for job in jobs]


class GatedModel:
    """predict = per-image sum; the first call blocks until `release()`; records batch sizes."""

    def __init__(self, fail_on: float | None = None):
        self.batches: list[int] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail_on = fail_on

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        if len(self.batches) == 1:
            self.started.set()
            assert self.gate.wait(10)
        flat = x.reshape(len(x), -1).astype(np.float32)
        if self.fail_on is not None and (flat[:, 0] == self.fail_on).any():
            raise ValueError("poisoned image")
        return np.stack([flat.sum(axis=1), flat[:, 0]], axis=1)

    def release(self) -> None:
        self.gate.set()


def imgs(n: int, first: float = 0.0) -> np.ndarray:
    x = np.ones((n, 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = first
    return x


@contextlib.contextmanager
def busy_batcher(model: GatedModel, **options):
    """A batcher over `model`, busy with a first one-image batch that blocks until release;
    yields the batcher and that first request, and closes the batcher afterwards."""
    batcher = DynamicBatcher(model.predict, name="m", **options)
    try:
        first = batcher.submit(imgs(1))
        assert model.started.wait(5)
        yield batcher, first
    finally:
        model.release()
        batcher.close(5)


@pytest.fixture
def gated():
    model = GatedModel()
    batcher = DynamicBatcher(model.predict, name="m", max_batch_size=8)
    yield model, batcher
    model.release()
    batcher.close(5)


def test_idle_request_starts_alone_and_queued_requests_form_one_batch(gated):
    model, batcher = gated
    first = batcher.submit(imgs(1))
    assert model.started.wait(5)  # ran at once, alone
    queued = [batcher.submit(imgs(n)) for n in (1, 3, 2)]  # arrive while busy: 6 images
    assert batcher.queued_requests == 3
    model.release()
    done = wait_all([first, *queued], timeout=10)
    assert model.batches == [1, 6]
    assert [j.batch_size for j in done] == [1, 6, 6, 6]
    for job, n in zip(done, (1, 1, 3, 2)):
        assert job.error is None and job.result.shape == (n, 2)
        np.testing.assert_array_equal(job.result[:, 0], np.full(n, 3.0))


def test_batches_stop_at_max_batch_size_in_arrival_order(gated):
    model, batcher = gated
    batcher.submit(imgs(1))
    assert model.started.wait(5)
    jobs = [batcher.submit(imgs(3, first=i)) for i in range(5)]  # 15 images, max 8 -> 6, 6, 3
    model.release()
    done = wait_all(jobs, timeout=10)
    assert model.batches == [1, 6, 6, 3]
    for i, job in enumerate(done):
        np.testing.assert_array_equal(job.result[:, 1], np.full(3, float(i)))


def test_large_request_is_split_in_chunks_and_reassembled(gated):
    model, batcher = gated
    x = imgs(20)
    x[:, 0, 0, 0] = np.arange(20)
    model.release()
    job = wait_all([batcher.submit(x)], timeout=10)[0]
    assert model.batches == [8, 8, 4]
    np.testing.assert_array_equal(job.result[:, 1], np.arange(20, dtype=np.float32))
    assert job.batch_size == 8


def test_priority_goes_first(gated):
    model, batcher = gated
    batcher.submit(imgs(1))
    assert model.started.wait(5)
    low = batcher.submit(imgs(6, first=1))
    high = batcher.submit(imgs(6, first=2), priority=1)
    model.release()
    wait_all([low, high], timeout=10)
    assert model.batches == [1, 6, 6]
    assert high.queue_ns < low.queue_ns


def test_queue_full_is_rejected_at_once():
    with busy_batcher(GatedModel(), max_batch_size=4, max_queue_size=2) as (batcher, _):
        batcher.submit(imgs(1))
        batcher.submit(imgs(1))
        with pytest.raises(
            QueueFull,
            match=r"Exceeds maximum queue size: 2 requests are queued for model 'm', "
            r"the maximum is 2",
        ):
            batcher.submit(imgs(1))


def test_expired_cancelled_and_timed_out_requests_leave_before_compute(gated):
    model, batcher = gated
    batcher.submit(imgs(1))
    assert model.started.wait(5)
    now = time.monotonic_ns()
    past_deadline = batcher.submit(imgs(2), deadline_ns=now + 1_000_000)  # 1 ms
    queue_timeout = batcher.submit(imgs(2), timeout_ns=now + 1_000_000)  # 1 ms
    cancelled = batcher.submit(imgs(2))
    cancelled.cancel()
    alive = batcher.submit(imgs(5), deadline_ns=now + 60_000_000_000)
    time.sleep(0.01)
    model.release()
    done = wait_all([past_deadline, queue_timeout, cancelled, alive], timeout=10)
    assert isinstance(done[0].error, DeadlineExceeded) and "before compute" in str(done[0].error)
    assert isinstance(done[1].error, RequestTimeout) and str(done[1].error).startswith(
        "Request timeout expired"
    )
    assert isinstance(done[2].error, Cancelled)
    assert done[3].error is None and done[3].result.shape == (5, 2)
    assert model.batches == [1, 5]  # none of the dropped images was computed


def test_failing_batch_is_rerun_member_by_member():
    model = GatedModel(fail_on=99.0)
    with busy_batcher(model, max_batch_size=16) as (batcher, _):
        good1 = batcher.submit(imgs(2, first=1))
        bad = batcher.submit(imgs(3, first=99))
        good2 = batcher.submit(imgs(4, first=2))
        model.release()
        done = wait_all([good1, bad, good2], timeout=10)
    assert model.batches == [1, 9, 2, 3, 4]  # the batch of 9 failed, then each member alone
    assert done[0].error is None and done[2].error is None
    np.testing.assert_array_equal(done[2].result[:, 1], np.full(4, 2.0))
    assert isinstance(done[1].error, InvalidRequest) and "poisoned image" in str(done[1].error)


def test_queue_delay_waits_for_more_after_a_busy_period():
    model = GatedModel()
    with busy_batcher(model, max_batch_size=8, max_queue_delay_us=300_000) as (batcher, _):
        early = batcher.submit(imgs(1))
        model.release()
        time.sleep(0.05)  # well inside the 300 ms window counted from `early`'s arrival
        late = batcher.submit(imgs(2))
        wait_all([early, late], timeout=10)
    assert model.batches == [1, 3]  # `late` joined the batch that was waiting for more


def test_a_held_batch_leaves_as_soon_as_it_is_full():
    model = GatedModel()
    with busy_batcher(model, max_batch_size=3, max_queue_delay_us=300_000_000) as (batcher, _):
        early = batcher.submit(imgs(1))
        model.release()
        deadline = time.monotonic() + 10
        while not batcher._holding[0]:  # the worker holds `early` for the 300 s window
            assert time.monotonic() < deadline, "the batch was not held"
            time.sleep(0.01)
        rest = [batcher.submit(imgs(1)) for _ in range(2)]  # the third image fills the batch
        wait_all([early, *rest], timeout=10)  # not after 300 s
    assert model.batches == [1, 3]


def test_closed_batcher_finishes_its_queue_and_refuses_new_work():
    model = GatedModel()
    batcher = DynamicBatcher(model.predict, name="m", max_batch_size=4)
    first = batcher.submit(imgs(1))
    assert model.started.wait(5)
    queued = batcher.submit(imgs(2))
    closer = threading.Thread(target=batcher.close, args=(10,))
    closer.start()
    time.sleep(0.05)
    with pytest.raises(Unavailable, match="Server exiting"):
        batcher.submit(imgs(1))
    model.release()
    closer.join(10)
    assert not closer.is_alive()
    assert [j.error for j in wait_all([first, queued], timeout=1)] == [None, None]


def test_abandoned_request_frees_its_queue_slot_at_once():
    model = GatedModel()
    with busy_batcher(model, max_batch_size=4, max_queue_size=1) as (batcher, running):
        queued = batcher.submit(imgs(3))
        with pytest.raises(QueueFull):
            batcher.submit(imgs(1))
        assert batcher.abandon(queued, RequestTimeout("Request timeout expired"))
        assert not batcher.abandon(running, RequestTimeout("too late: it is computing"))
        replacement = batcher.submit(imgs(2))  # the slot is free again
        model.release()
        done = wait_all([running, replacement], timeout=10)
    assert isinstance(queued.error, RequestTimeout) and queued.result is None
    assert [j.error for j in done] == [None, None]
    assert model.batches == [1, 2]  # the abandoned images were never computed


def test_small_batches_use_one_numba_thread():
    import numba
    from convserve.core.threads import threads_by_batch

    seen = []
    run = threads_by_batch(
        lambda x: seen.append(numba.get_num_threads()) or x, parallel_min_batch=4
    )
    worker = threading.Thread(target=lambda: [run(np.zeros((n, 1))) for n in (1, 3, 4, 64, 2)])
    worker.start()
    worker.join(10)
    most = numba.config.NUMBA_NUM_THREADS
    assert seen == ([1, 1, most, most, 1] if most > 1 else [1] * 5)
    assert numba.get_num_threads() == most  # other threads are not affected


def test_second_instance_computes_large_batches_side_by_side_and_leaves_small_ones():
    """Two instances: while the first is busy, single images queue for it (the second ignores
    fewer than `extra_instance_min_images`), and a large request's chunks run on both at once;
    every result is the one its own images give, in order."""
    first, second = GatedModel(), GatedModel()
    batcher = DynamicBatcher(
        [first.predict, second.predict], name="m", max_batch_size=8, extra_instance_min_images=4
    )
    try:
        busy = batcher.submit(imgs(1, first=1.0))
        assert first.started.wait(5)
        small = [batcher.submit(imgs(1, first=float(i))) for i in range(3)]
        time.sleep(0.2)  # give the second instance the chance to (wrongly) take them
        assert second.batches == []
        large = batcher.submit(np.concatenate([imgs(8, first=2.0), imgs(8, first=3.0)]))
        assert second.started.wait(5)  # it took a batch now: at least 4 images were queued
        second.release()
        # the second instance computes everything queued (oldest first) while the first is still busy
        assert large.future.result(timeout=10) is large and not busy.future.done()
        first.release()
        done = wait_all([busy, *small, large], timeout=10)
        assert all(job.error is None for job in done)
        np.testing.assert_array_equal(large.result[:, 1], [2.0] * 8 + [3.0] * 8)
        np.testing.assert_array_equal([job.result[0, 1] for job in small], [0.0, 1.0, 2.0])
        assert first.batches == [1] and second.batches == [3, 8, 8]
    finally:
        first.release()
        second.release()
        assert batcher.close(5)
