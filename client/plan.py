"""Plans: each client operation written once, without I/O, and run by a sync or an async driver.

A plan is a generator (the sans-I/O design of h11 and hyper-h2). It yields the I/O it needs
next, an effect: `Call` (one unary RPC, retried), `Concurrently` (several calls, replies in
order) or `Sleep`. The client's driver performs the effect and sends the reply back into the
plan, or raises the effect's InferenceError inside it, where the plan may catch it. What the
plan returns is the operation's result. `Client` drives plans with blocking calls and
`AsyncClient` with coroutines, so every step between the I/O exists once.

`@operation` makes a plan a public method: `Client.predict(...)` returns the plan's result,
`AsyncClient.predict(...)` a coroutine of it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from .errors import InferenceError
from .retry import Deadline, RetryPolicy

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Call:
    """One unary RPC: `method` of the GRPCInferenceService stub with `request`, retried by
    `policy` within `deadline`, each attempt carrying `metadata`.

    `check` turns each answer into the plan's reply; an InferenceError it raises counts as the
    attempt's failure, so it is retried like one (e.g. "no model is ready yet", UNAVAILABLE).
    """

    method: str
    request: Any
    deadline: Deadline
    policy: RetryPolicy
    metadata: tuple[tuple[str, str], ...] = ()
    check: Callable[[Any], Any] | None = None

    def answer(self, response: Any) -> Any:
        """The plan's reply to one attempt's `response`."""
        return response if self.check is None else self.check(response)


@dataclass(frozen=True)
class Concurrently:
    """Several calls, at most the client's `concurrency` at a time; the replies come in order.

    Each item makes its Call only when the call starts, so a large input is not copied into
    request messages all at once. The first failure is raised.
    """

    calls: Sequence[Callable[[], Call]]


@dataclass(frozen=True)
class Sleep:
    seconds: float


Effect = Call | Concurrently | Sleep
Plan = Generator[Effect, Any, T]


class Running(Generic[T]):
    """A plan being driven: `effect` is the I/O it waits for; once `done`, `result` is set."""

    def __init__(self, plan: Plan[T]):
        self._plan = plan
        self.done = False
        self.result: T
        self.effect: Effect
        self.resume(None)

    def resume(self, reply: Any, failure: InferenceError | None = None) -> None:
        """Send the reply to `effect` into the plan, or raise its failure there (the plan may
        catch it); the plan runs on to its next effect or its end."""
        try:
            if failure is None:
                self.effect = self._plan.send(reply)
            else:
                self.effect = self._plan.throw(failure)
        except StopIteration as finished:
            self.done, self.result = True, finished.value


class _Blocking(Protocol):
    def _run(self, plan: Plan[T]) -> T: ...


class _Awaiting(Protocol):
    def _run(self, plan: Plan[T]) -> Coroutine[Any, Any, T]: ...


class operation(Generic[P, T]):
    """A public client method written once as a plan: it returns `self._run(plan)`, so the
    result itself in `Client` and a coroutine of it in `AsyncClient` (whose `_run` is async).

    The method keeps the plan's name, signature and docstring for help() and IDEs.
    """

    def __init__(self, plan: Callable[Concatenate[Any, P], Plan[T]]):
        @functools.wraps(plan)
        def blocking(client: Any, *args: Any, **kwargs: Any) -> Any:
            return client._run(plan(client, *args, **kwargs))

        @functools.wraps(plan)
        async def awaiting(client: Any, *args: Any, **kwargs: Any) -> Any:
            return await client._run(plan(client, *args, **kwargs))

        # Two functions, so that inspect.iscoroutinefunction (used by frameworks to decide
        # whether to await a callback) tells the truth for each client.
        self._blocking, self._awaiting = blocking, awaiting

    @overload
    def __get__(self, client: _Blocking, owner: type | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(
        self, client: _Awaiting, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...

    def __get__(self, client: Any, owner: type | None = None) -> Callable[..., Any]:
        cls: Any = owner if owner is not None else type(client)
        method: Any = self._awaiting if inspect.iscoroutinefunction(cls._run) else self._blocking
        return method.__get__(client, cls)  # a function bound to `client` (on a class: itself)
