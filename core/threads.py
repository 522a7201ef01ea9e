"""The core's thread policy, in one place: how many numba threads a forward pass uses, when a
step runs on the calling thread alone, and how a step's work is split so small batches still
feed every thread.

- Per call (`threads_by_batch`): batches below `parallel_min_batch` images use one thread, which
  leaves the other cores to the server's gRPC threads; bigger batches use every thread, or a
  model instance's `share` of them while other instances compute too.
- Per step (`SERIAL_MAX_WORK`): a step with less work than this runs a serial kernel, because a
  parallel region costs a few microseconds to start and join.
- Per kernel (`splits`): the tasks of a step are split further (by output channels or columns)
  until there are a few per thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SERIAL_MAX_WORK = 32768  # multiply-adds (or copied values) below which a step runs serially
DENSE_SERIAL_MAX_WORK = 4 * SERIAL_MAX_WORK  # dense layers: their weights stream from cache


def splits(tasks: int, groups: int, threads: int, per_thread: int = 4) -> int:
    """How many ways to split each of `tasks` tasks (at most `groups` ways, a power of two) so
    that there are at least `per_thread` pieces of work per thread."""
    ways = 1
    while tasks * ways < per_thread * threads and ways * 2 <= groups:
        ways *= 2
    return ways


def one_thread(batch: int, parallel_min_batch: int) -> bool:
    """Whether a batch of `batch` images runs on one numba thread under --parallel-min-batch
    (`threads_by_batch`; the planner times such batches the same way)."""
    return batch < parallel_min_batch


def thread_count_reader() -> Callable[[], int]:
    """A function returning numba's thread count for the calling thread: numba's own ctypes
    reader once the threading layer runs (`numba.get_num_threads` takes a lock and costs
    several times more, twice per forward pass), else `numba.get_num_threads` itself."""
    import numba

    numba.get_num_threads()  # starts the threading layer
    try:
        from numba.np.ufunc import parallel

        reader = getattr(parallel, "_get_num_threads", None)
        if callable(reader) and reader() == numba.get_num_threads():
            return reader
    except Exception:  # pragma: no cover - a numba without this private reader
        pass
    return numba.get_num_threads


def threads_by_batch(
    predict: Callable[[Any], Any],
    parallel_min_batch: int,
    share: int | None = None,
    alone: Callable[[], bool] | None = None,
) -> Callable[[Any], Any]:
    """Wrap `predict` so batches below `parallel_min_batch` images use one numba thread, bigger
    ones every thread, or with several model instances their `share` unless `alone()` says no
    other instance is computing. The setting is per calling thread (each instance's worker), so
    it never affects other threads."""
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    share = most if share is None else share
    if most <= 1:
        return predict
    state = {"threads": most}

    def run(x):
        if one_thread(x.shape[0], parallel_min_batch):
            want = 1
        else:
            want = most if share == most or (alone is not None and alone()) else share
        if want != state["threads"]:
            numba.set_num_threads(want)
            state["threads"] = want
        return predict(x)

    return run
