"""The server interceptor: Prometheus metrics for every call, the readiness gate, deadlines,
the limits on calls in flight, and the mapping of domain errors to statuses with their
google.rpc details (server/errors.py), in one place.

A handler body runs inside try/finally so that every call is counted once with the status
it ended with, whatever it raised. The server is grpc.aio: handlers are coroutines or async
generators, and a call the client gives up on is cancelled (asyncio.CancelledError, or
GeneratorExit in a response stream) and counted CANCELLED or DEADLINE_EXCEEDED.

Slots are taken only by authenticated callers. grpc's own ``maximum_concurrent_rpcs``
counts a call from its headers, and a unary handler runs (and so authenticates) only once
the request message has come: calls that never send one would hold every slot. So grpc is
given no limit; every handler of the services is registered with grpc as request-streaming
(the wire is the same: a unary call is a stream of one message), so that it runs as soon as
the headers arrive, authenticates the caller from the metadata or the TLS peer before any
message, and only then takes a place, under these limits (per worker process):

* ``calls``: calls of the services in flight (RESOURCE_EXHAUSTED, reason CALL_LIMIT);
* ``streams``: client- or bidi-streaming calls open (STREAM_LIMIT). grpc would count a
  long-lived stream as one call for its whole life, so a gateway's thousand StreamCheck
  streams would take every slot and leave none for unary checks;
* ``caller_calls`` / ``caller_streams``: the same per caller identity (CALLER_QUOTA), so
  that one partner cannot take the worker from the others (not in the insecure mode, where
  everyone is the one development identity);
* ``call_seconds``: the server's deadline on a unary call that set none or a later one
  (SERVER_DEADLINE), which also bounds the wait for its request message;
* ``stream_idle_seconds``: the longest wait for a stream's next message (STREAM_IDLE).

A refusal is sent at once and frees the call. An unauthenticated call is refused with
UNAUTHENTICATED without waiting for its message.

Health and reflection answer without an identity and disclose nothing about a person
(server/auth.py OPEN_SERVICES): they take none of the services' places (health answers while
a flood holds them all), but their long-lived calls (``Health.Watch``, reflection streams)
have a limit of their own, ``open_streams``, and a request that is not valid protobuf is
answered INVALID_ARGUMENT like the services' (grpc would log a traceback per call and answer
UNKNOWN), logged at most once per ``MALFORMED_LOG_SECONDS`` with a count.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from server.auth import OPEN_SERVICES, Authenticator, PermissionDenied, set_call_deadline, set_current_caller
from server.errors import (
    CallerQuota, CallLimit, DeadlineExceeded, InvalidArgument, NotReady, ServerDeadline, StreamIdle, StreamLimit, status_of,
)
from server.metrics import Metrics

log = logging.getLogger("qianjiang.server")

#: Services gated on readiness and identity.
GATED_PREFIX = "/qianjiang.v1."

COUNTED = object()  # the call has been counted already

_OK, _CANCELLED, _DEADLINE, _INTERNAL, _UNKNOWN, _INVALID = (
    grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT,
)

#: Malformed requests to health and reflection are logged at most once per this many seconds.
MALFORMED_LOG_SECONDS = 10.0

_EOF = grpc.aio.EOF


@dataclass(frozen=True)
class Limits:
    """What one worker process allows; 0 is no limit (ServerConfig resolves the defaults)."""

    calls: int = 0  # calls of the services in flight
    streams: int = 0  # client- or bidi-streaming calls open
    caller_calls: int = 0  # calls in flight per caller identity (token and mtls modes)
    caller_streams: int = 0  # streams open per caller identity
    call_seconds: float = 0.0  # the server's deadline on a unary call (and on a health check)
    stream_idle_seconds: float = 0.0  # the longest wait for a stream's next message
    open_streams: int = 0  # Health.Watch and reflection streams open


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


async def _valid_stream(requests, idle: float = 0.0):
    """The requests, each checked; with ``idle``, StreamIdle when the next one does not come
    within that many seconds.

    One timer per stream, re-armed from the time of the last message when it fires, not one
    per message (``asyncio.timeout`` around every read cost a gateway's StreamCheck about a
    sixth of its throughput). It cancels the call's task only while the task waits here for a
    message, and the cancellation is turned into StreamIdle."""
    if not idle:
        async for request in requests:
            yield _valid(request)
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    last = loop.time()
    waiting = expired = False

    def watch() -> None:
        nonlocal handle, expired
        due = last + idle
        if waiting and loop.time() >= due:
            expired = True
            task.cancel()
        else:
            handle = loop.call_at(max(due, loop.time() + 0.001), watch)

    handle = loop.call_at(last + idle, watch)
    it = requests.__aiter__()
    try:
        while True:
            waiting = True
            try:
                request = await it.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not expired:
                    raise
                task.uncancel()
                raise StreamIdle(idle) from None
            finally:
                waiting = False
            last = loop.time()
            yield _valid(request)
    finally:
        handle.cancel()


async def _respond(behaviour, requests, context, request_streaming: bool, idle: float, call_seconds: float):
    """The answer of a single-response call: a client stream's requests, bounded by the idle
    limit between messages, or a unary call's one request, the whole call bounded by
    ``call_seconds`` when the client set no earlier deadline."""
    if request_streaming:
        return await behaviour(_valid_stream(requests, idle), context)
    bound = _bound(context, call_seconds)

    async def answer():
        return await behaviour(await _first(context), context)

    return await (_bounded(answer(), bound) if bound else answer())


async def _first(context):
    """A unary call's request (its handler is request-streaming for grpc: see the module's
    docstring), read through the safe deserializer."""
    request = await context.read()
    if request is _EOF:
        raise InvalidArgument("request", "the call ended before its request message")
    return _valid(request)


async def _bounded(coro, seconds: float):
    """Await coro, ServerDeadline after ``seconds``."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            return await coro
    except TimeoutError:
        if timeout.expired():
            raise ServerDeadline(seconds) from None
        raise


def _bound(context, seconds: float) -> float:
    """The server's deadline for a call: ``seconds`` unless the client's own comes first (grpc
    core ends the call then) or there is none (0)."""
    if not seconds:
        return 0.0
    remaining = context.time_remaining()
    return seconds if remaining is None or remaining > seconds else 0.0


class _Throttled:
    """One log line per ``every`` seconds at most, with how many were left out."""

    def __init__(self, logger: logging.Logger, every: float):
        self.log, self.every = logger, every
        self.next_at = 0.0
        self.suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} more in the last {self.every:g} s not logged)"
            self.suppressed = 0
        self.next_at = now + self.every
        self.log.warning(message, *args)


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
    """``limits``: what this worker allows (see the module's docstring); ``max_streams``
    alone is the older form (only a stream limit)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], authenticator: Authenticator, max_streams: int = 0,
                 limits: Limits | None = None):
        self.metrics = metrics
        self.ready = ready
        self.auth = authenticator
        self.limits = limits or Limits(streams=max_streams)
        self.max_streams = self.limits.streams
        # Only the server's event loop thread touches these (every handler runs there).
        self.in_flight = 0  # calls of the services admitted and not yet ended
        self.open_streams = 0  # of which client- or bidi-streaming
        self.open_service_streams = 0  # Health.Watch and reflection streams
        self.by_caller: dict[str, list[int]] = {}  # identity -> [calls, streams] in flight
        self._quotas = authenticator.mode != "insecure" and bool(self.limits.caller_calls or self.limits.caller_streams)
        self._malformed = _Throttled(log, MALFORMED_LOG_SECONDS)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        # grpc asks for every call: wrap each method's handler once and reuse it
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            if details.method.startswith(GATED_PREFIX):
                wrapped = self._wrap(handler, details.method)
            elif details.method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
                wrapped = self._wrap_open(handler, details.method)
            else:
                return handler
            self._wrapped[details.method] = wrapped
        return wrapped

    def _admit(self, caller, streaming: bool):
        """Take a place for an authenticated caller's call, or raise why not (at once).
        Returns the caller's counters (None without quotas) for :meth:`_release`."""
        lim = self.limits
        if streaming and lim.streams and self.open_streams >= lim.streams:
            raise StreamLimit(lim.streams)
        if lim.calls and self.in_flight >= lim.calls:
            raise CallLimit(lim.calls)
        held = None
        if self._quotas:
            held = self.by_caller.get(caller.identity)
            if held is None:  # identities are the policy's few (a stranger never gets here)
                held = self.by_caller[caller.identity] = [0, 0]
            if lim.caller_calls and held[0] >= lim.caller_calls:
                raise CallerQuota("calls", lim.caller_calls)
            if streaming:
                if lim.caller_streams and held[1] >= lim.caller_streams:
                    raise CallerQuota("streams", lim.caller_streams)
                held[1] += 1
            held[0] += 1
        self.in_flight += 1
        if streaming:
            self.open_streams += 1
        return held

    def _release(self, held, streaming: bool) -> None:
        self.in_flight -= 1
        if streaming:
            self.open_streams -= 1
        if held is not None:
            held[0] -= 1
            if streaming:
                held[1] -= 1

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
        admit, release = self._admit, self._release
        call_seconds, idle = self.limits.call_seconds, self.limits.stream_idle_seconds

        def finish(code: grpc.StatusCode, t0: float) -> None:
            count_observe(handled[code], handling, time.perf_counter() - t0)

        def precheck(context):
            """Identity first (nothing about a person is looked up, and no place is taken,
            before it), then the method grant, readiness and the deadline."""
            caller = auth.authenticate(context)
            if not caller.may_call(short):
                raise PermissionDenied(f"{caller.identity} may not call {short}")
            caller = auth.bind(caller, short, context)  # a citizen app's end user (server/end_user.py)
            set_current_caller(caller)
            if not ready():
                raise NotReady()
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded()
            if call_seconds and not request_streaming and not (remaining is not None and remaining <= call_seconds):
                remaining = call_seconds  # the server's own bound on a unary call (SERVER_DEADLINE)
            set_call_deadline(remaining)  # no disclosure past it (auth.check_call_deadline)
            return caller

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

        def aborted_code(context) -> grpc.StatusCode:
            code = context.code()
            return code if isinstance(code, grpc.StatusCode) else _INTERNAL

        request_streaming = handler.request_streaming
        deserializer = _safe(handler.request_deserializer)

        if not handler.response_streaming:
            behaviour = handler.unary_unary or handler.stream_unary

            async def unary(requests, context):
                count(started)
                t0 = time.perf_counter()
                code = None
                admitted = False
                held = None
                try:
                    caller = precheck(context)
                    held = admit(caller, request_streaming)
                    admitted = True
                    response = await _respond(behaviour, requests, context, request_streaming, idle, call_seconds)
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
                    if admitted:
                        release(held, request_streaming)
                    if code is not COUNTED:
                        finish(code or _INTERNAL, t0)

            # request-streaming for grpc, whatever the method: see the module's docstring
            return grpc.stream_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer)

        behaviour = handler.unary_stream or handler.stream_stream

        async def streaming(requests, context):
            count(started)
            t0 = time.perf_counter()
            code = None
            admitted = False
            held = None
            try:
                caller = precheck(context)
                held = admit(caller, request_streaming)
                admitted = True
                if request_streaming:
                    request = _valid_stream(requests, idle)
                else:
                    bound = _bound(context, call_seconds)
                    request = await (_bounded(_first(context), bound) if bound else _first(context))
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
                if admitted:
                    release(held, request_streaming)
                if code is not COUNTED:
                    finish(code or _INTERNAL, t0)

        return grpc.stream_stream_rpc_method_handler(
            streaming, request_deserializer=deserializer, response_serializer=handler.response_serializer)

    def _wrap_open(self, handler, full_method: str):
        """Health and reflection: no identity and no place among the services' calls; a
        request that does not parse is INVALID_ARGUMENT (logged at most once per
        MALFORMED_LOG_SECONDS); their long-lived calls (Health.Watch, reflection) take one of
        the ``open_streams`` places, and wait for a message at most as long as the services do."""
        lim = self.limits
        call_seconds, idle = lim.call_seconds, lim.stream_idle_seconds
        request_streaming = handler.request_streaming
        deserializer = _safe(handler.request_deserializer)
        malformed = self._malformed

        async def refuse(exc: Exception, context) -> None:
            code, message, details = status_of(exc)
            if code is _INVALID:
                malformed.warning("malformed request to %s: %s", full_method, message)
            elif code is _INTERNAL:
                log.error("internal error in %s", full_method, exc_info=exc)
            if not context.done():
                await context.abort(code, message, details)

        if not handler.response_streaming:  # Health.Check
            behaviour = handler.unary_unary or handler.stream_unary

            async def unary(requests, context):
                try:
                    return await _respond(behaviour, requests, context, request_streaming, idle, call_seconds)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped by the table
                    await refuse(exc, context)

            return grpc.stream_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer)

        behaviour = handler.unary_stream or handler.stream_stream
        limit = lim.open_streams

        async def streaming(requests, context):  # the reader-writer form: grpc awaits it
            held = False
            try:
                if limit and self.open_service_streams >= limit:
                    raise StreamLimit(limit)
                self.open_service_streams += 1
                held = True
                if request_streaming:
                    request = _valid_stream(requests, idle)
                else:
                    bound = _bound(context, call_seconds)
                    request = await (_bounded(_first(context), bound) if bound else _first(context))
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await context.write(response)
                else:  # a coroutine writing with context.write (grpc's health Watch)
                    await result
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001
                await refuse(exc, context)
            finally:
                if held:
                    self.open_service_streams -= 1

        return grpc.stream_stream_rpc_method_handler(
            streaming, request_deserializer=deserializer, response_serializer=handler.response_serializer)
