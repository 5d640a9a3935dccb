"""The server interceptor: Prometheus metrics for every call, the readiness gate, deadlines,
and the mapping of domain errors to status codes (server/errors.py), in one place.

A handler body runs inside try/finally so that every call is counted once with the status
it ended with, whatever it raised.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc

from server.auth import OPEN_SERVICES, Authenticator, PermissionDenied, set_current_caller
from server.errors import DeadlineExceeded, NotReady, status_for
from server.metrics import Metrics

log = logging.getLogger("qianjiang.server")

#: Services gated on readiness (health and reflection always answer).
GATED_PREFIX = "/qianjiang.v1."


def _rpc_type(handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics, ready: Callable[[], bool], authenticator: Authenticator):
        self.metrics = metrics
        self.ready = ready
        self.auth = authenticator
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, details):
        # grpc asks for every call: wrap each method's handler once and reuse it
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = self._wrap(handler, details.method)
        return wrapped

    def _wrap(self, handler, full_method: str):
        service, _, method = full_method.lstrip("/").partition("/")
        labels = dict(grpc_type=_rpc_type(handler), grpc_service=service, grpc_method=method)
        gated = full_method.startswith(GATED_PREFIX)
        open_service = service in OPEN_SERVICES
        short = f"{service.rsplit('.', 1)[-1]}/{method}"  # "EligibilityService/Check"
        auth = self.auth
        m = self.metrics
        started = m.started.labels(**labels)
        handling = m.handling.labels(**labels)
        handled = {code: m.handled.labels(**labels, grpc_code=code.name) for code in grpc.StatusCode}

        def finish(code: grpc.StatusCode, t0: float) -> None:
            handled[code].inc()
            handling.observe(time.perf_counter() - t0)

        def begin(context) -> float:
            started.inc()
            return time.perf_counter()

        def gone(context) -> grpc.StatusCode:
            remaining = context.time_remaining()
            return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED

        def fail(exc: BaseException, context) -> grpc.StatusCode | None:
            """Abort the call with the table's code for exc (raises), unless the client has
            already gone: its deadline passed or it cancelled, which is also what a request
            stream raising grpc.RpcError means. Then there is no one to answer, and the code
            to count is returned."""
            if isinstance(exc, grpc.RpcError) or not context.is_active():
                return gone(context)
            if isinstance(context.code(), grpc.StatusCode):  # a handler already aborted the call
                raise exc
            code = status_for(exc)
            if code is None:
                log.exception("internal error in %s", full_method)
                code, message = grpc.StatusCode.INTERNAL, "internal error"
            else:
                message = str(exc)
            context.abort(code, message)

        def precheck(context) -> None:
            """Identity first (nothing about a person is looked up before it), then the
            method grant, readiness and the deadline."""
            if not open_service:
                caller = auth.authenticate(context)
                if not caller.may_call(short):
                    raise PermissionDenied(f"{caller.identity} may not call {short}")
                set_current_caller(caller)
            if gated and not self.ready():
                raise NotReady()
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded()

        def code_of(context, ended: grpc.StatusCode | None) -> grpc.StatusCode:
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                return code
            if ended is not None:
                return ended
            remaining = context.time_remaining()
            if not context.is_active() or (remaining is not None and remaining <= 0):
                return gone(context)  # the client stopped waiting: it did not get an OK
            return grpc.StatusCode.OK

        if not handler.response_streaming:
            behaviour = handler.unary_unary or handler.stream_unary

            def unary(request_or_iterator, context):
                t0 = begin(context)
                ended = None
                try:
                    precheck(context)
                    return behaviour(request_or_iterator, context)
                except Exception as exc:  # noqa: BLE001 - mapped by the table
                    ended = fail(exc, context)
                finally:
                    finish(code_of(context, ended), t0)

            wrap = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return wrap(unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

        behaviour = handler.unary_stream or handler.stream_stream

        def streaming(request_or_iterator, context):
            t0 = begin(context)
            ended = None
            try:
                precheck(context)
                yield from behaviour(request_or_iterator, context)
            except Exception as exc:  # noqa: BLE001
                ended = fail(exc, context)
            finally:
                finish(code_of(context, ended), t0)

        wrap = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return wrap(streaming, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
