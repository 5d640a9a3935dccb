"""A Locust user that speaks gRPC: one channel to ``self.host``, timed calls in Locust's stats.

    from locust import between, task
    from loadtest.grpc_user import GrpcUser
    from qianjiang.v1 import eligibility_pb2, eligibility_pb2_grpc

    class Gate(GrpcUser):
        wait_time = between(0.01, 0.1)

        def on_start(self):
            self.stub = eligibility_pb2_grpc.EligibilityServiceStub(self.channel)

        @task
        def check(self):
            req = eligibility_pb2.CheckRequest(scenario="metro_pay_later", card_token=b"\\0" * 16)
            self.call("Check", self.stub.Check, req)

    $ locust -f that_file.py --host 127.0.0.1:50051     # host:port, no scheme

:meth:`GrpcUser.call` times one RPC to its last response and reports it as request type
``grpc`` under the given name; a status code listed in ``ok_codes`` counts as a success
(an expected answer, such as FAILED_PRECONDITION for a citizen who has not authorised),
any other as a failure named by its code. Streaming responses are read to the end inside
the timing.

Locust runs users as gevent greenlets. grpc's own gevent integration
(``grpc.experimental.gevent.init_gevent()``, after the standard library is patched and
before any grpc object exists) makes blocking calls yield to other greenlets instead of
blocking the whole process; importing this module does both, so import it before creating
any channel. The channel is plain text, so ``host`` must be a loopback address (the
server's insecure development mode only listens there).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Callable, Iterable

import locust  # noqa: F401 - patches the standard library for gevent (before grpc is set up)
from locust import User
from locust.exception import LocustError

import grpc
import grpc.experimental.gevent

grpc.experimental.gevent.init_gevent()


class RpcFailure(Exception):
    """A failed call, as Locust's failure table shows it: ``CODE: details`` (grpc's own
    exception text carries timestamps, which would make every failure a distinct row)."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        super().__init__(f"{code.name}: {details or ''}")
        self.code = code


def _is_loopback(target: str) -> bool:
    host = target[1:].partition("]")[0] if target.startswith("[") else target.rpartition(":")[0]
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GrpcUser(User):
    """Abstract: subclass it, make stubs on ``self.channel`` and give tasks that use :meth:`call`."""

    abstract = True
    #: Deadline of each call, seconds.
    timeout: float = 5.0
    #: Channel options (BatchCheck of 100,000 tokens needs 1.6 MB messages).
    channel_options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ]

    def __init__(self, environment):
        super().__init__(environment)
        if not self.host:
            raise LocustError("give the target as --host host:port (e.g. 127.0.0.1:50051)")
        if not _is_loopback(self.host):
            raise LocustError(f"--host {self.host}: a plain-text channel may only go to a loopback address")
        self.channel = grpc.insecure_channel(self.host, options=self.channel_options)

    def on_stop(self) -> None:
        """Closes the channel; a subclass overriding it calls ``super().on_stop()``."""
        self.channel.close()

    def call(self, name: str, method: Callable, request: Any, *, ok_codes: Iterable[grpc.StatusCode] = (),
             timeout: float | None = None, metadata=None) -> Any:
        """Call ``method`` (a stub's method) with ``request`` (a message, or an iterator of
        messages for a client stream) and report the call to Locust as ``name``. Returns the
        response (a list of them for a server stream), or None if the call ended in error."""
        start = time.perf_counter()
        response, length, exception = None, 0, None
        try:
            response = method(request, timeout=self.timeout if timeout is None else timeout, metadata=metadata)
            if hasattr(response, "ByteSize"):
                length = response.ByteSize()
            else:  # a server stream: read it to the end
                response = list(response)
                length = sum(m.ByteSize() for m in response)
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in ok_codes:
                exception = RpcFailure(code, exc.details())
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
        return response
