"""The method handlers every service is registered with: wrapped once, at registration.

**Raw requests.** grpc.aio answers UNKNOWN, with the protobuf exception's text, when a method's
request deserializer raises before the handler runs. `raw_requests` re-registers a method
without a deserializer, so its handler receives the raw bytes; it parses them itself and
answers a message that does not parse with INVALID_ARGUMENT naming the message type that was
expected. It is also the last line of defence: an exception escaping a handler (a server bug)
is logged with its traceback and answered INTERNAL without Python exception text; one escaping
after the call's deadline passed is the client's race and only logged at DEBUG.

**Wrapped at registration, not intercepted per call.** `WrappingRegistrar` stands in for the
server when a service's generated `add_..._to_server` runs, and registers each method's handler
passed through a chain of wrappers (admission, token check, raw requests; see `app.py`). A
`grpc.aio.ServerInterceptor` would do the same work again on every call, through grpc.aio's
interceptor pipeline: as interceptors they cost about 9 us more CPU per call (64 single-image
clients on 2 cores, 5 paired rounds; BENCHMARKS.md, "Serving against the grpc.aio ceiling").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc.aio import AbortError  # what context.abort raises

log = logging.getLogger(__name__)

WARNING_INTERVAL_S = 10.0  # at most one WARNING per method in this many seconds


class Throttled:
    """A WARNING logger for clients' mistakes: at most one line per key per interval."""

    def __init__(self, logger: logging.Logger, interval_s: float = WARNING_INTERVAL_S):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        more = f" ({skipped} more since the last such line)" if skipped else ""
        self.logger.warning("%s%s", message, more)


_throttled = Throttled(log)


def call_is_over(context: grpc.aio.ServicerContext) -> bool:
    """True once the client cancelled or the deadline passed: gRPC has answered the call itself."""
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


def message_name(deserializer: Callable[[bytes], Any]) -> str:
    """`inference.ModelInferRequest` for `ModelInferRequest.FromString`."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "the method's request message")


Refused = Callable[[str, str], None]


# message full name -> the parser used instead of protobuf's
Parsers = dict[str, Callable[[bytes], Any]]


def _parser(method: str, deserializer: Callable[[bytes], Any], refused: Refused, parsers: Parsers):
    expected = message_name(deserializer)
    deserializer = parsers.get(expected, deserializer)
    details = (
        f"{method}: the request does not parse as {expected}: expected a serialized "
        "protobuf message of that type"
    )

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, RecursionError, ...: the bytes are the client's mistake
            _throttled.warning(method, f"refused an undecodable request to {method}")
            refused(method, "undecodable")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    return parse


async def _guarded(method: str, context: grpc.aio.ServicerContext, run: Callable[[], Any]) -> Any:
    """Await `run()`; turn an unexpected exception into INTERNAL (or nothing after the deadline)."""
    try:
        return await run()
    except (AbortError, asyncio.CancelledError):
        raise
    except NotImplementedError:  # a generated servicer base method (e.g. health's List)
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server"
        )
    except Exception:
        if call_is_over(context):  # e.g. ExecuteBatchError: the call ended while we answered
            log.debug("%s: the call ended before its answer could be sent", method)
            raise asyncio.CancelledError from None
        log.exception("internal error in %s", method)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"{method}: internal server error (details in the server log)"
        )


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, refused: Refused, parsers: Parsers
) -> grpc.RpcMethodHandler:
    parse = _parser(method, handler.request_deserializer, refused, parsers)
    serialize = handler.response_serializer

    async def requests(raw_iterator: AsyncIterator[bytes], context) -> AsyncIterator[Any]:
        async for raw in raw_iterator:
            yield await parse(raw, context)

    if not handler.request_streaming and not handler.response_streaming:
        behavior = handler.unary_unary

        async def unary_unary(raw: bytes, context):
            request = await parse(raw, context)
            return await _guarded(method, context, lambda: behavior(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
    if not handler.request_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler

        async def first(raw, context):
            return await parse(raw, context)
    elif not handler.response_streaming:
        behavior = handler.stream_unary

        async def stream_unary(raw_iterator, context):
            return await _guarded(
                method, context, lambda: behavior(requests(raw_iterator, context), context)
            )

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
    else:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler

        async def first(raw_iterator, context):
            return requests(raw_iterator, context)

    if inspect.isasyncgenfunction(behavior):

        async def streaming(raw, context):
            responses = behavior(await first(raw, context), context)
            async for response in responses:
                yield response

    else:  # a coroutine that writes its responses with context.write

        async def streaming(raw, context):
            request = await first(raw, context)
            return await _guarded(method, context, lambda: behavior(request, context))

    return make(streaming, None, serialize)


Wrapper = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


def raw_requests(
    refused: Refused = lambda method, reason: None, parsers: Parsers | None = None
) -> Wrapper:
    """The wrapper that hands a handler raw bytes and parses them (see the module docstring);
    `refused(method, reason)` counts a request that does not parse; `parsers` replaces
    protobuf's parser for the messages it names (same errors for bytes that do not parse)."""
    parsers = parsers or {}

    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler  # already raw
        return _wrap(handler, method, refused, parsers)

    return wrap


_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def run_first(
    handler: grpc.RpcMethodHandler, first: Callable[[grpc.aio.ServicerContext], Any]
) -> grpc.RpcMethodHandler:
    """The same handler, whose behaviour awaits `first(context)` before it starts (which may
    wait, or abort the call)."""
    streams = (handler.request_streaming, handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[streams]
    if inspect.isasyncgenfunction(behavior):

        async def wrapped(request, context):
            await first(context)
            async for response in behavior(request, context):
                yield response

    else:

        async def wrapped(request, context):
            await first(context)
            return await behavior(request, context)

    return _MAKERS[streams](wrapped, handler.request_deserializer, handler.response_serializer)


class WrappingRegistrar:
    """Stands in for `server` in generated `add_<Service>Servicer_to_server(servicer, ...)`
    calls: registers every method's handler passed through `wrappers`, the first outermost."""

    def __init__(self, server: grpc.aio.Server, wrappers: list[Wrapper]):
        self._server = server
        self._wrappers = wrappers
        self._generic: set[str] = set()
        self._registered: set[str] = set()

    def add_generic_rpc_handlers(self, handlers) -> None:
        # generated code registers the same handlers by name right after (below)
        self._generic.update(h.service_name() for h in handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {}
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            for wrap in reversed(self._wrappers):
                handler = wrap(method, handler)
            wrapped[name] = handler
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)
        self._registered.add(service)

    def check(self) -> None:
        """Fail if a service came only as a generic handler, which this class cannot wrap."""
        missed = self._generic - self._registered
        if missed:
            raise RuntimeError(f"services registered without their method table: {sorted(missed)}")
