"""The server interceptor: Prometheus metrics for every call, the readiness gate, deadlines,
the limit on open streams, and the mapping of domain errors to statuses with their
google.rpc details (server/errors.py), in one place.

A handler body runs inside try/finally so that every call is counted once with the status
it ended with, whatever it raised. The server is grpc.aio: handlers are coroutines or async
generators, and a call the client gives up on is cancelled (asyncio.CancelledError, or
GeneratorExit in a response stream) and counted CANCELLED or DEADLINE_EXCEEDED.

Streams get their own limit: grpc's ``maximum_concurrent_rpcs`` counts a long-lived stream as
one call for its whole life, so a gateway's thousand StreamCheck streams would take every
slot and leave none for unary checks. A client- or bidi-streaming call beyond ``max_streams``
open ones (per worker process) is refused at once with RESOURCE_EXHAUSTED, reason
STREAM_LIMIT, which frees its slot at once.

Health and reflection pass through untouched: they answer without an identity and disclose
nothing about a person (server/auth.py OPEN_SERVICES).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from server.auth import OPEN_SERVICES, Authenticator, PermissionDenied, set_current_caller
from server.errors import DeadlineExceeded, InvalidArgument, NotReady, StreamLimit, status_of
from server.metrics import Metrics

log = logging.getLogger("qianjiang.server")

#: Services gated on readiness and identity.
GATED_PREFIX = "/qianjiang.v1."

COUNTED = object()  # the call has been counted already

_OK, _CANCELLED, _DEADLINE, _INTERNAL, _UNKNOWN = (
    grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)


class _Malformed:
    """What a request that did not parse becomes (grpc would answer UNKNOWN or INTERNAL if
    the deserializer raised): the handler raises InvalidArgument naming the message."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


def _safe(deserializer):
    """The request deserializer, never raising: a malformed message becomes _Malformed."""
    if deserializer is None:
        return None
    name = getattr(getattr(deserializer, "__self__", None), "__name__", "request")

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's input
            return _Malformed(f"not a valid {name} message ({type(exc).__name__})")

    return parse


def _valid(request):
    if type(request) is _Malformed:
        raise InvalidArgument("request", request.problem)
    return request


async def _valid_stream(requests):
    async for request in requests:
        yield _valid(request)


def _rpc_type(handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _gone(context) -> grpc.StatusCode:
    """Why a call ended without an answer: its deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    return _DEADLINE if remaining is not None and remaining <= 0 else _CANCELLED


def _ended(context) -> grpc.StatusCode:
    """The code of a call whose handler returned normally."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return _DEADLINE  # the client stopped waiting: it did not get an OK
    return _CANCELLED if context.cancelled() else _OK


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """``max_streams``: client- or bidi-streaming calls open at once in this process (0: no
    limit of their own)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], authenticator: Authenticator, max_streams: int = 0):
        self.metrics = metrics
        self.ready = ready
        self.auth = authenticator
        self.max_streams = max_streams
        # Only the server's event loop thread touches it (every handler runs there).
        self.open_streams = 0
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        # grpc asks for every call: wrap each method's handler once and reuse it
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None or not details.method.startswith(GATED_PREFIX):
                return handler
            wrapped = self._wrapped[details.method] = self._wrap(handler, details.method)
        return wrapped

    def _wrap(self, handler, full_method: str):
        service, _, method = full_method.lstrip("/").partition("/")
        assert service not in OPEN_SERVICES
        labels = dict(grpc_type=_rpc_type(handler), grpc_service=service, grpc_method=method)
        short = f"{service.rsplit('.', 1)[-1]}/{method}"  # "EligibilityService/Check"
        auth, ready = self.auth, self.ready
        m = self.metrics
        started = m.started.labels(**labels)
        handling = m.handling.labels(**labels)
        handled = {code: m.handled.labels(**labels, grpc_code=code.name) for code in grpc.StatusCode}
        count, count_observe = m.calls.inc, m.calls.inc_observe  # buffered until the next flush (server/metrics.py)

        def finish(code: grpc.StatusCode, t0: float) -> None:
            count_observe(handled[code], handling, time.perf_counter() - t0)

        def precheck(context) -> None:
            """Identity first (nothing about a person is looked up before it), then the
            method grant, readiness and the deadline."""
            caller = auth.authenticate(context)
            if not caller.may_call(short):
                raise PermissionDenied(f"{caller.identity} may not call {short}")
            set_current_caller(caller)
            if not ready():
                raise NotReady()
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded()

        async def fail(exc: Exception, context, t0: float) -> None:
            """Count the call with the table's code for exc, then abort it with that code,
            message and google.rpc details (raises AbortError). Counted first: abort sends
            the status at once, and whoever sees it may flush and read the metrics."""
            code, message, details = status_of(exc)
            if code is _INTERNAL:
                log.error("internal error in %s", full_method, exc_info=exc)
            elif code is _UNKNOWN:  # the store should have said whether a retry helps
                log.warning("unclassified store error in %s: %s", full_method, exc, exc_info=exc)
            if context.done():  # nobody to answer
                finish(_gone(context), t0)
                return
            finish(code, t0)
            # grpc.aio sends trailing metadata given to abort with the status; the details
            # travel as grpc-status-details-bin (grpc_status.rpc_status.from_call reads them).
            await context.abort(code, message, details)

        limit = self.max_streams if handler.request_streaming else 0

        def open_stream() -> bool:
            """Take a stream's place (True), or raise StreamLimit."""
            if self.open_streams >= limit:
                raise StreamLimit(limit)
            self.open_streams += 1
            return True

        def aborted_code(context) -> grpc.StatusCode:
            code = context.code()
            return code if isinstance(code, grpc.StatusCode) else _INTERNAL

        request_streaming = handler.request_streaming
        deserializer = _safe(handler.request_deserializer)

        if not handler.response_streaming:
            behaviour = handler.unary_unary or handler.stream_unary

            async def unary(request_or_iterator, context):
                count(started)
                t0 = time.perf_counter()
                code = None
                held = False
                try:
                    precheck(context)
                    held = open_stream() if limit else False
                    request = _valid_stream(request_or_iterator) if request_streaming else _valid(request_or_iterator)
                    response = await behaviour(request, context)
                    code = _ended(context)
                    return response
                except asyncio.CancelledError:
                    code = _gone(context)
                    raise
                except grpc.aio.AbortError:
                    code = aborted_code(context)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped by the table
                    code = COUNTED
                    await fail(exc, context, t0)
                finally:
                    if held:
                        self.open_streams -= 1
                    if code is not COUNTED:
                        finish(code or _INTERNAL, t0)

            wrap = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return wrap(unary, request_deserializer=deserializer, response_serializer=handler.response_serializer)

        behaviour = handler.unary_stream or handler.stream_stream

        async def streaming(request_or_iterator, context):
            count(started)
            t0 = time.perf_counter()
            code = None
            held = False
            try:
                precheck(context)
                held = open_stream() if limit else False
                request = _valid_stream(request_or_iterator) if request_streaming else _valid(request_or_iterator)
                async for response in behaviour(request, context):
                    yield response
                code = _ended(context)
            except (asyncio.CancelledError, GeneratorExit):
                code = _gone(context)
                raise
            except grpc.aio.AbortError:
                code = aborted_code(context)
                raise
            except Exception as exc:  # noqa: BLE001
                code = COUNTED
                await fail(exc, context, t0)
            finally:
                if held:
                    self.open_streams -= 1
                if code is not COUNTED:
                    finish(code or _INTERNAL, t0)

        wrap = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return wrap(streaming, request_deserializer=deserializer, response_serializer=handler.response_serializer)
