"""Deadlines and the retry policy: UNAVAILABLE is retried with capped exponential backoff.

The backoff follows gRPC's own retry design (proposal A6): before attempt n+1 the client
sleeps a uniformly random time in [0, min(initial * multiplier**(n-1), max)] ("full jitter"),
so many clients restarting at once do not hammer a recovering server in lockstep. Every
attempt carries the time left until the call's single deadline, and no sleep runs past it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from .errors import InferenceError, from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried. `attempts` counts the first try (1 = never retry)."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_on: frozenset = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError(
                "RetryPolicy needs initial_backoff >= 0, max_backoff >= 0 and multiplier >= 1, got "
                f"{self.initial_backoff}, {self.max_backoff}, {self.multiplier}"
            )

    @classmethod
    def of(cls, retries: int | RetryPolicy | None) -> RetryPolicy:
        """`retries` as the Client takes it: a policy, a number of retries (0 = none), or None."""
        if isinstance(retries, RetryPolicy):
            return retries
        if retries is None:
            return cls(attempts=1)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a RetryPolicy or an int >= 0, got {retries!r}")
        return cls(attempts=retries + 1)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep after failed attempt number `attempt` (1-based)."""
        cap = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return (rng or random).uniform(0.0, cap)


class Deadline:
    """One absolute deadline shared by every attempt and chunk of a call."""

    def __init__(self, timeout: float):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired_error(self, attempts: int, what: str) -> InferenceError:
        return InferenceError(
            f"{what}: deadline of {self.timeout:g} s exceeded",
            grpc.StatusCode.DEADLINE_EXCEEDED,
            attempts=attempts,
        )


class _Attempts:
    """The bookkeeping of one retried call, shared by `call` and `call_async`."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline, what: str):
        self.policy, self.deadline, self.what = policy, deadline, what
        self.count = 0

    def start(self) -> float:
        """Seconds left for the next attempt; raises DEADLINE_EXCEEDED when none are."""
        self.count += 1
        remaining = self.deadline.remaining()
        if remaining <= 0:
            raise self.deadline.expired_error(self.count - 1, self.what)
        return remaining

    def failed(self, error: grpc.RpcError | InferenceError) -> float:
        """The sleep before the next attempt; raises the failure when it is not retried.

        `error` is a grpc.RpcError (from the call) or an InferenceError (from checking the
        answer); both are retried when their code is in the policy, and end as an InferenceError.
        """
        if isinstance(error, grpc.RpcError):
            failure = from_rpc_error(error, attempts=self.count)
        else:  # raised by fn itself, e.g. "no model is ready yet"
            failure = error
            failure.attempts = self.count
        delay = self._delay() if failure.code in self.policy.retry_on else None
        if delay is None:
            raise failure from None
        return delay

    def _delay(self) -> float | None:
        """The sleep before the next attempt, or None when no further attempt fits."""
        if self.count >= self.policy.attempts:
            return None
        delay = self.policy.backoff(self.count)
        # An attempt needs some time to run; a retry that could only start at the deadline is
        # pointless.
        if self.deadline.remaining() - delay <= 0.001:
            return None
        return delay


def call(
    fn: Callable[[float], T],
    policy: RetryPolicy,
    deadline: Deadline,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn(seconds_left)` until it succeeds, retrying the codes in the policy."""
    attempts = _Attempts(policy, deadline, what)
    while True:
        remaining = attempts.start()
        try:
            return fn(remaining)
        except (grpc.RpcError, InferenceError) as error:
            delay = attempts.failed(error)
        sleep(delay)


async def call_async(
    fn: Callable[[float], Awaitable[T]], policy: RetryPolicy, deadline: Deadline, what: str
) -> T:
    """The asyncio twin of `call`."""
    attempts = _Attempts(policy, deadline, what)
    while True:
        remaining = attempts.start()
        try:
            return await fn(remaining)
        except (grpc.RpcError, InferenceError) as error:
            delay = attempts.failed(error)
        await asyncio.sleep(delay)
