"""Giving memory back after a burst of large requests (glibc's malloc, Linux).

Two glibc behaviours keep a server's RSS near its peak long after a burst:

* malloc serves a freed block larger than its mmap threshold with mmap, returned to the system
  at free, but each such free raises the threshold (up to 32 MiB), so the next 25 MB request
  buffers come from the heap, where freed memory stays resident. Fixing the threshold
  (`mallopt(M_MMAP_THRESHOLD)`) turns that adjustment off.
* gRPC core and protobuf hold a request in many small blocks (network reads, arena chunks),
  spread over per-thread arenas; once freed they stay resident until `malloc_trim(0)`.

`prefer_mmap_for_large_blocks()` is called once at start-up, `freeze_startup_objects()` after
warm-up; `Trimmer` runs `malloc_trim(0)` when the server has gone quiet after holding more
memory than before.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Callable

from convserve.core.runtime import resident_mb

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB or more are mmapped, and unmapped when freed
TRIM_CHECK_SECONDS = 5.0  # how often an idle server checks whether to trim
TRIM_GROWTH_MB = 16.0  # trim when RSS is this much above its level after the last trim


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # pragma: no cover - not glibc
        return None


def prefer_mmap_for_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (no dynamic raise); False where that is not glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def freeze_startup_objects() -> None:
    """Move every object alive after warm-up (numba, the models, the modules: about 130,000) out
    of the garbage collector's view. Full collections then look at request-time objects only, so
    Python runs them often and cheaply, and request buffers caught in reference cycles (a
    cancelled call's traceback, for example) are freed within seconds instead of piling up until
    a rare full collection of everything."""
    gc.collect()
    gc.freeze()


def trim() -> None:
    """Hand freed heap memory back to the system (every arena)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class Trimmer:
    """Trims once the server is idle (`idle()` true) and RSS grew since the last trim."""

    def __init__(self, idle: Callable[[], bool]):
        self.idle = idle
        self.level_mb = resident_mb()
        self.trims = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TRIM_CHECK_SECONDS)
            if not self.idle() or resident_mb() < self.level_mb + TRIM_GROWTH_MB:
                continue
            before = resident_mb()
            gc.collect()  # request buffers caught in reference cycles (tracebacks, tasks)
            await loop.run_in_executor(None, trim)  # takes the arena locks: off the event loop
            self.level_mb = resident_mb()
            self.trims += 1
            log.debug("malloc_trim after a burst: RSS %.0f -> %.0f MB", before, self.level_mb)
