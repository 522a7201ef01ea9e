"""Admission in front of every gRPC handler: a byte budget for requests, and the shutdown hold.

**Byte budget.** gRPC reads a request's whole message before its handler runs, so a limit on
queued requests alone does not bound memory: 64 clients each sending a 25 MB request are held
in full before any of them can be refused. `Admission.wrap` serves every unary method as a
stream-unary one, so its wrapper runs before the message is read. Each unary call first
reserves the largest message it may carry (the gRPC message limit) from the budget
(`--max-queue-bytes`); once the message is in, the reservation shrinks to the message's real
size, which stays reserved until the call has answered. A call that
finds no room is refused at once with RESOURCE_EXHAUSTED and its bytes are never read (they
stay in the peer's HTTP/2 flow-control window). So the request bytes a server holds never
exceed the budget, whatever the number of clients.

**Shutdown hold.** When the server stops its transport, gRPC core answers the calls it has
received but not yet handed to Python with CANCELLED (grpc/grpc#41785), and those are lost to
clients that retry only UNAVAILABLE. During the refusal phase of a shutdown every new call is
therefore held here, unread, until `release()`; the server calls it once the transport has
sent GOAWAY, so the held calls are answered (UNAVAILABLE for inference) on a connection the
clients already know is closing, and their retries go to a new connection, which is refused
cleanly. Clients that wait for an answer before sending again (every retrying client) thus
never have a call waiting inside gRPC core when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from convserve.server.wire import run_first
from grpc._cython.cygrpc import ExecuteBatchError  # what a failed send raises (not re-exported)

log = logging.getLogger(__name__)

CONCURRENT_READS = 4  # calls reading and parsing their message at once


class ByteBudget:
    """Bytes reserved by calls in progress, never above `limit` (event-loop thread only)."""

    def __init__(self, limit: int, reserve: int):
        self.limit = limit  # bytes that calls may hold together
        self.reserve = reserve  # what a call reserves before its message is read
        self.in_use = 0
        self.peak = 0

    def try_take(self, size: int) -> bool:
        if self.in_use + size > self.limit:
            return False
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return True

    def give_back(self, size: int) -> None:
        self.in_use -= size


class Admission:
    """Applies the byte budget and a limit on calls in progress to unary calls, and holds new
    calls while the server stops. `wrap` is the handler wrapper that does it (outermost, see
    `wire.WrappingRegistrar`); `on_refused(method, reason)` counts each refusal made here."""

    def __init__(self, budget: ByteBudget, on_refused: Callable[[str, str], None], max_calls: int):
        self.budget = budget
        self.on_refused = on_refused
        self.max_calls = max_calls
        self.active = 0  # unary calls past the hold, not yet answered
        # Reading a message briefly takes about twice its size (gRPC core's buffers and the
        # bytes handed to Python): only a few at a time.
        self._reading = asyncio.Semaphore(CONCURRENT_READS)
        self.holding = False
        self._released = asyncio.Event()

    @property
    def idle(self) -> bool:
        return self.active == 0

    def hold(self) -> None:
        """From now on, new calls wait (unread) until `release()`."""
        self.holding = True

    def release(self) -> None:
        self._released.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted call is in progress (held ones aside); False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return not self.active

    async def _hold(self, _context=None) -> None:
        if self.holding:
            await self._released.wait()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` behind the hold, and for a unary method the budget and the call limit."""
        if handler.request_streaming or handler.response_streaming:
            # streams: the hold only (reflection's messages are small, bounded by the message
            # limit; ModelStreamInfer budgets each of its requests itself)
            return run_first(handler, self._hold)
        return grpc.stream_unary_rpc_method_handler(
            self._budgeted(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _budgeted(self, method: str, behaviour):
        """The unary `behaviour`, served as a stream-unary call so the read happens here."""
        budget = self.budget

        async def refuse(context, reason: str, message: str) -> None:
            self.on_refused(method, reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        async def serve(_requests, context):
            await self._hold()
            if self.active >= self.max_calls:
                await refuse(
                    context,
                    "concurrency",
                    f"Server busy: {self.active} calls are in progress, the most this server "
                    "takes at once; retry later",
                )
            self.active += 1
            held = 0
            try:
                # The reservation is taken by the few calls reading at once, so calls waiting
                # for their turn (unread) hold nothing, and the refusal comes before the read.
                async with self._reading:
                    if not budget.try_take(budget.reserve):
                        await refuse(
                            context,
                            "memory",
                            f"Server busy: requests in progress hold {budget.in_use} of the "
                            f"{budget.limit} bytes this server admits (--max-queue-bytes); "
                            "retry later",
                        )
                    held = budget.reserve
                    request = await context.read()
                if request is grpc.aio.EOF:
                    # gRPC refused the message (over the message limit) and answered
                    # RESOURCE_EXHAUSTED itself, or the client sent none: nothing left to answer,
                    # and gRPC ends a cancelled handler quietly.
                    self.on_refused(method, "message_size")
                    raise asyncio.CancelledError
                size = len(request) if isinstance(request, bytes) else request.ByteSize()
                budget.give_back(held - size)
                held = size
                try:
                    return await behaviour(request, context)
                except ExecuteBatchError:
                    remaining = context.time_remaining()
                    if not (context.cancelled() or (remaining is not None and remaining <= 0)):
                        raise
                    # the client cancelled or its deadline passed while the answer was being
                    # sent: nothing to answer, not an error (gRPC ends a cancelled handler quietly)
                    raise asyncio.CancelledError from None
            finally:
                self.active -= 1
                budget.give_back(held)

        return serve
