"""No caller can freeze the service by holding its call slots, through the real server in
token mode with small limits: calls without credentials are refused before their message and
hold nothing, each identity has its quota, idle calls and streams are ended by the server,
Health.Watch and reflection streams have their own bound, and health answers throughout.

Half-open unary calls are made with grpc's client-streaming API on the unary method's path:
the client sends the call's headers and no message (the request iterator never yields). On
the wire that is exactly a unary call whose body never comes (gRPC frames a unary request as
a stream of one message); grpc's unary API cannot do it, as it always sends the message."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient, QianjiangError
from qianjiang.v1 import eligibility_pb2
from server.app import Node, Runtime, ServerConfig
from server.metrics import Metrics
from tests.conftest import dev_token

CHECK = "/qianjiang.v1.EligibilityService/Check"
STREAM_CHECK = "/qianjiang.v1.EligibilityService/StreamCheck"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

CALLS, PER_CALLER, STREAMS, OPEN_STREAMS = 8, 2, 4, 4
CALL_SECONDS, IDLE_SECONDS = 1.0, 1.0
IDENTITIES = ("metro_gateway", "bus_gateway")


class SlotServer:
    """A real server in token mode with small limits, and a client per identity."""

    def __init__(self, data_dir):
        tokens = data_dir / "tokens.toml"
        tokens.write_text("".join(f'"{dev_token(i)}" = "{i}"\n' for i in IDENTITIES))
        self.config = ServerConfig(
            data_dir=data_dir, seed_citizens=600, metrics_port=0, port=0, security="token", tokens_path=tokens,
            max_concurrent_rpcs=CALLS, max_calls_per_caller=PER_CALLER, max_streams=STREAMS, max_streams_per_caller=1,
            call_timeout_seconds=CALL_SECONDS, stream_idle_seconds=IDLE_SECONDS, max_open_service_streams=OPEN_STREAMS,
        )
        self.runtime = Runtime.prepare(self.config)
        self.node = Node(self.runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
        self.runtime.load()
        self.node.attach()
        self.target = f"127.0.0.1:{self.node.port}"
        self.clients = {i: QianjiangClient(self.target, timeout=5, token=dev_token(i)) for i in IDENTITIES}
        self.card = self.runtime.synthetic_card_token(0)

    def check(self, identity: str = "metro_gateway", scenario: str = "metro_pay_later"):
        return self.clients[identity].check(scenario, self.card)

    @property
    def interceptor(self):
        return self.node.interceptor

    def close(self):
        for c in self.clients.values():
            c.close()
        self.node.drain(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = SlotServer(tmp_path_factory.mktemp("slots"))
    yield s
    s.close()


def wait_until(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Attacker:
    """Calls held open from grpc.aio channels on their own loop (no thread per call), a
    connection per batch: one connection carries at most the server's HTTP/2 limit of open
    calls (grpc.max_concurrent_streams; beyond it the server refuses the stream,
    REFUSED_STREAM), so an attacker spreads over connections."""

    def __init__(self, target: str):
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.release = self.run(self._event())
        self.calls = []
        self.channels = []

    @property
    def channel(self):
        """A new connection (a local subchannel pool: grpc would share one otherwise)."""
        channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return channel

    async def _event(self):
        return asyncio.Event()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _never_sends(self):
        await self.release.wait()
        return
        yield

    def half_open(self, method: str, n: int, metadata=()) -> None:
        """n calls to ``method`` that send their headers and never a message."""
        async def start():
            call = self.channel.stream_unary(method)
            for _ in range(n):
                self.calls.append(call(self._never_sends(), metadata=metadata))
        self.run(start())

    def watches(self, n: int) -> None:
        async def start():
            watch = self.channel.unary_stream(HEALTH_WATCH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                              response_deserializer=health_pb2.HealthCheckResponse.FromString)
            for _ in range(n):
                self.calls.append(watch(health_pb2.HealthCheckRequest()))
        self.run(start())

    def codes(self) -> list[grpc.StatusCode | None]:
        """Each call's status, None while it is open."""
        async def get():
            return [await c.code() if c.done() else None for c in self.calls]
        return self.run(get())

    def close(self) -> None:
        async def stop():
            self.release.set()
            for c in self.calls:
                c.cancel()
            for channel in self.channels:
                await channel.close()
        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def health(target: str) -> str:
    with QianjiangClient(target, timeout=2) as qj:
        return qj.health()


def test_half_open_calls_without_credentials_and_watch_floods_hold_nothing_checks_and_health_answer(server):
    attacker = Attacker(server.target)
    try:
        # 16x the worker's call slots in calls that never send their message, with no
        # credentials or a wrong token; health checks that never send theirs; and 8x the
        # Watch places in Health.Watch streams
        attacker.half_open(CHECK, 64)
        attacker.half_open(CHECK, 64, metadata=(("authorization", "Bearer not-a-known-token-at-all"),))
        attacker.half_open(STREAM_CHECK, 32)
        attacker.half_open(HEALTH_CHECK, 64)
        attacker.watches(8 * OPEN_STREAMS)
        # the unauthenticated calls are refused at once, without their message
        assert wait_until(lambda: attacker.codes()[:160].count(grpc.StatusCode.UNAUTHENTICATED) == 160)
        assert wait_until(lambda: server.interceptor.open_service_streams == OPEN_STREAMS)
        codes = attacker.codes()
        assert codes[224:].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7 * OPEN_STREAMS
        assert codes[160:224] == [None] * 64  # the health checks wait for their message (bounded below)
        # what the flood holds of what legitimate calls need: nothing
        assert server.interceptor.in_flight == 0 and server.interceptor.open_streams == 0
        for _ in range(20):
            assert server.check().outcome > 0
            assert server.check("bus_gateway", "bus_pay_later").outcome > 0
        assert health(server.target) == "SERVING"
        # the half-open health checks end at the server's bound on a call
        assert wait_until(lambda: attacker.codes()[160:224] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 64,
                          CALL_SECONDS + 5)
    finally:
        attacker.close()
    assert wait_until(lambda: server.interceptor.open_service_streams == 0)


def test_an_identity_over_its_quota_is_refused_while_another_is_served(server):
    attacker = Attacker(server.target)
    try:
        # a real partner's token, calls held open without their message: its quota, no more
        attacker.half_open(CHECK, PER_CALLER, metadata=(("authorization", f"Bearer {dev_token('metro_gateway')}"),))
        assert wait_until(lambda: server.interceptor.by_caller.get("metro_gateway", [0])[0] == PER_CALLER)
        t0 = time.perf_counter()
        with pytest.raises(QianjiangError) as info:
            server.check()
        assert time.perf_counter() - t0 < 0.5, "refused at once"
        assert (info.value.code(), info.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CALLER_QUOTA")
        assert info.value.metadata == {"limit": str(PER_CALLER), "quota": "calls"}
        assert server.check("bus_gateway", "bus_pay_later").outcome > 0  # another partner is served
        assert health(server.target) == "SERVING"
        # the held calls end at the server's deadline, and metro_gateway is served again
        assert wait_until(lambda: attacker.codes() == [grpc.StatusCode.DEADLINE_EXCEEDED] * PER_CALLER, CALL_SECONDS + 5)
        assert server.check().outcome > 0
    finally:
        attacker.close()
    assert wait_until(lambda: server.interceptor.in_flight == 0)


def test_a_partners_streams_have_their_own_quota(server):
    metro = server.clients["metro_gateway"]
    release = threading.Event()

    def requests():
        yield "metro_pay_later", server.card
        release.wait(10)

    held = metro.check_stream(requests(), timeout=10)
    try:
        assert next(held).outcome > 0
        second = metro.check_stream(iter([("metro_pay_later", server.card)]), timeout=5)
        with pytest.raises(QianjiangError) as info:
            list(second)
        assert (info.value.reason, info.value.metadata) == ("CALLER_QUOTA", {"limit": "1", "quota": "streams"})
        bus = server.clients["bus_gateway"].check_stream(iter([("bus_pay_later", server.card)] * 2), timeout=5)
        assert len(list(bus)) == 2
    finally:
        release.set()
        list(held)


def test_an_idle_call_without_a_deadline_is_ended_by_the_server(server):
    channel = grpc.insecure_channel(server.target)
    metadata = (("authorization", f"Bearer {dev_token('metro_gateway')}"),)
    release = threading.Event()

    def never():
        release.wait(30)
        return
        yield

    try:
        # a unary call whose message never comes, no deadline: the server's bound on a call
        check = channel.stream_unary(CHECK, request_serializer=eligibility_pb2.CheckRequest.SerializeToString,
                                     response_deserializer=eligibility_pb2.Decision.FromString)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            check(never(), metadata=metadata)
        took = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        status = rpc_status.from_call(info.value)
        assert status is not None and "SERVER_DEADLINE" in str(status.details[0].value)
        assert CALL_SECONDS * 0.9 < took < CALL_SECONDS + 3, took

        # a stream that stops sending: its idle bound
        def one_then_nothing():
            yield eligibility_pb2.CheckRequest(scenario="metro_pay_later", card_token=server.card)
            release.wait(30)

        stream = channel.stream_stream(STREAM_CHECK, request_serializer=eligibility_pb2.CheckRequest.SerializeToString,
                                       response_deserializer=eligibility_pb2.Decision.FromString)
        t0 = time.monotonic()
        call = stream(one_then_nothing(), metadata=metadata)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for decision in call:
                got.append(decision)
        assert len(got) == 1 and info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert IDLE_SECONDS * 0.9 < time.monotonic() - t0 < IDLE_SECONDS + 3
        assert QianjiangError.of(info.value).reason == "STREAM_IDLE"
    finally:
        release.set()
        channel.close()
    assert wait_until(lambda: server.interceptor.in_flight == 0 and server.interceptor.open_streams == 0)


def test_the_worker_limit_counts_only_admitted_calls(server):
    """Past --max-concurrent-rpcs admitted calls: CALL_LIMIT (with details), not grpc's bare
    RESOURCE_EXHAUSTED; health still answers."""
    interceptor = server.interceptor
    before = interceptor.in_flight
    interceptor.in_flight = CALLS  # as if every slot were held by admitted calls
    try:
        with pytest.raises(QianjiangError) as info:
            server.check()
        assert (info.value.code(), info.value.reason, info.value.metadata) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "CALL_LIMIT", {"limit": str(CALLS)})
        assert health(server.target) == "SERVING"
    finally:
        interceptor.in_flight = before
    assert server.check().outcome > 0


@pytest.mark.parametrize("method, garbage", [
    (HEALTH_CHECK, b"\xff\xff\xff\xff"),
    (HEALTH_WATCH, b"\x0a\xff\x01"),
    (REFLECTION, b"\xff\xff\xff\xff"),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", b"\x0a\xff\x01"),
])
def test_garbage_to_health_and_reflection_is_invalid_argument_and_logged_once(server, caplog, method, garbage):
    channel = grpc.insecure_channel(server.target)
    try:
        if method == HEALTH_CHECK:
            def call():
                return channel.unary_unary(method)(garbage, timeout=5)
        elif method == HEALTH_WATCH:
            def call():
                return list(channel.unary_stream(method)(garbage, timeout=5))
        else:
            def call():
                return list(channel.stream_stream(method)(iter([garbage]), timeout=5))
        with caplog.at_level("INFO"):
            codes = set()
            for _ in range(100):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                codes.add(info.value.code())
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) <= 1, [r.getMessage()[:200] for r in lines]
        assert all("\n" not in r.getMessage() and r.exc_info is None for r in lines)
        # a well-formed request is answered as before
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = list(channel.stream_stream(REFLECTION, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(
            iter([request]), timeout=5))
        assert any(s.name == "grpc.health.v1.Health" for s in answer[0].list_services_response.service)
    finally:
        channel.close()

