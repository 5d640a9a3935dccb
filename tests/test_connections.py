"""Connections through the real server and client: connection ageing (calls go on across
reconnections; streams end and are reopened), and the limit on open streams, which keeps
unary checks answering while gateways open far more streams than the worker takes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients.cli import parser, serve_config
from clients.client import KEEPALIVE_OPTIONS, KEEPALIVE_SECONDS, QianjiangClient, QianjiangError, Record
from server.app import Node, Runtime, ServerConfig, citizen_id, connection_options
from server.metrics import Metrics
from server.state import iso_of


class Server:
    def __init__(self, data_dir, **config):
        # no audit log: these tests send hundreds of thousands of checks in seconds, and what
        # they measure is the transport
        self.config = ServerConfig(data_dir=data_dir, seed_citizens=300, metrics_port=0, port=0, audit=False, **config)
        self.runtime = Runtime.prepare(self.config)
        self.node = Node(self.runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
        self.runtime.load()
        self.node.attach()
        self.port = self.node.port
        self.target = f"127.0.0.1:{self.port}"

    def token(self, row: int) -> bytes:
        return self.runtime.synthetic_card_token(row)

    def stop(self):
        self.node.drain(0)


def client_ports(server_port: int) -> set[int]:
    """Local ports of this process's established TCP connections to server_port (Linux)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


# --- connection ageing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ageing(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("ageing"), max_connection_age_seconds=1.0, max_connection_age_grace_seconds=2.0)
    yield s
    s.stop()


def test_calls_go_on_across_connection_ages_and_the_channel_reconnects(ageing):
    # No retry policy on this channel: a call cut by the ageing would fail here, not be
    # retried out of sight.
    channel = grpc.insecure_channel(ageing.target, options=KEEPALIVE_OPTIONS)
    qj = QianjiangClient(ageing.target, channel=channel, timeout=5)
    failures, calls, ports = [], [0], set()
    stop = threading.Event()

    def batch_checks():  # longer calls, in flight when a GOAWAY comes
        while not stop.is_set():
            try:
                qj.check_batch("campus_fitness", ageing.token(1) * 5_000)
            except grpc.RpcError as exc:
                failures.append(exc)

    other = threading.Thread(target=batch_checks)
    other.start()
    t_end = time.monotonic() + 4.5  # over three ages of 1 s (+-10 %)
    try:
        while time.monotonic() < t_end:
            try:
                assert qj.check("campus_fitness", ageing.token(0)).outcome > 0
                calls[0] += 1
            except grpc.RpcError as exc:
                failures.append(exc)
            ports |= client_ports(ageing.port)
            time.sleep(0.005)
    finally:
        stop.set()
        other.join()
        qj.close()
    assert not failures, [str(QianjiangError.of(f)) for f in failures[:3]]
    assert calls[0] > 100
    assert len(ports) >= 3, f"one connection per age expected, saw local ports {sorted(ports)}"


def test_a_stream_outliving_age_and_grace_ends_unavailable_and_is_reopened(ageing):
    """What partners must handle: a StreamCheck stream ends (UNAVAILABLE) after about
    max_connection_age + grace; a new stream on the same client answers at once."""
    qj = QianjiangClient(ageing.target, timeout=5)
    release = threading.Event()

    def requests():
        while not release.wait(0.1):
            yield "campus_fitness", ageing.token(0)

    t0 = time.monotonic()
    got = 0
    with pytest.raises(QianjiangError) as info:
        for _ in qj.check_stream(requests(), timeout=30):
            got += 1
    lasted = time.monotonic() - t0
    release.set()
    try:
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, str(info.value)
        assert info.value.reason is None  # grpc's own status: no details
        assert got > 5 and 2.0 < lasted < 8.0, (got, lasted)
        release.clear()
        reopened = qj.check_stream(iter([("campus_fitness", ageing.token(0))] * 3), timeout=5)
        assert len(list(reopened)) == 3
    finally:
        release.set()
        qj.close()


# --- the stream limit -------------------------------------------------------------------------

STREAMS, CALLS = 4, 16  # max_streams, max_concurrent_rpcs


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("streams"), max_concurrent_rpcs=CALLS, max_streams=STREAMS, threads=4)
    yield s
    s.stop()


class HeldStream:
    """A gateway's StreamCheck stream: one check, then held open until released."""

    def __init__(self, qj: QianjiangClient, token: bytes):
        self.release = threading.Event()

        def requests():
            yield "campus_fitness", token
            self.release.wait(30)

        self.call = qj.check_stream(requests(), timeout=30)

    def opened(self) -> bool:
        """True if the server took it (its first answer came); False if refused."""
        try:
            next(self.call)
            return True
        except QianjiangError as exc:
            self.release.set()
            self.error = exc
            return False

    def close(self) -> None:
        self.release.set()
        list(self.call)


def test_streams_beyond_the_limit_are_refused_and_unary_checks_go_on(limited):
    qj = QianjiangClient(limited.target, timeout=5)
    token = limited.token(0)
    held, refused, unary_failures = [], [], []
    lock = threading.Lock()

    def open_streams(n: int) -> None:
        for _ in range(n):
            s = HeldStream(qj, token)
            if s.opened():
                with lock:
                    held.append(s)
            else:
                refused.append(s.error)

    # 1,000 attempts from 8 gateways at once, against 4 stream places and 16 call slots
    gateways = [threading.Thread(target=open_streams, args=(125,)) for _ in range(8)]
    for g in gateways:
        g.start()
    checks = 0
    while any(g.is_alive() for g in gateways) or checks < 50:
        try:
            assert qj.check("campus_fitness", token).outcome > 0
        except grpc.RpcError as exc:
            unary_failures.append(exc)
        checks += 1
    for g in gateways:
        g.join()
    try:
        assert not unary_failures, [str(QianjiangError.of(e)) for e in unary_failures[:3]]
        assert len(held) == STREAMS and len(refused) == 1000 - STREAMS
        assert {(e.code(), e.reason) for e in refused} == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_LIMIT")}
        assert refused[0].metadata == {"limit": str(STREAMS)}
        assert limited.node.interceptor.open_streams == STREAMS

        # IngestRecords is a stream too
        day = iso_of(limited.runtime.state.as_of_day)
        with pytest.raises(QianjiangError) as info:
            qj.ingest([Record(record_id="conn-1", citizen_id=citizen_id(2), variable="honours", date=day, value=1.0)])
        assert info.value.reason == "STREAM_LIMIT"

        # a stream that ends, or that its client cancels, gives its place back at once
        held.pop().close()
        s = HeldStream(qj, token)
        assert s.opened()
        held.append(s)
        victim = held.pop()
        victim.call.cancel()
        victim.release.set()
        deadline = time.monotonic() + 5
        while limited.node.interceptor.open_streams != STREAMS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limited.node.interceptor.open_streams == STREAMS - 1
        s = HeldStream(qj, token)
        assert s.opened()
        held.append(s)
    finally:
        for s in held:
            s.close()
        qj.close()
    assert limited.node.interceptor.open_streams == 0


# --- configuration ----------------------------------------------------------------------------


def test_the_server_permits_the_client_librarys_keepalive_pings():
    cfg = ServerConfig()
    assert cfg.min_client_ping_seconds < KEEPALIVE_SECONDS
    options = dict(connection_options(cfg))
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] < dict(KEEPALIVE_OPTIONS)["grpc.keepalive_time_ms"]
    assert options["grpc.max_connection_age_ms"] == 300_000 and options["grpc.max_connection_age_grace_ms"] == 30_000


def test_the_stream_limit_defaults_to_half_the_call_limit():
    assert ServerConfig().stream_limit == 64
    assert ServerConfig(max_concurrent_rpcs=10).stream_limit == 5
    assert ServerConfig(max_concurrent_rpcs=0).stream_limit == 0  # no call limit: none for streams
    assert ServerConfig(max_streams=7).stream_limit == 7
    assert ServerConfig(max_streams=0).stream_limit == 0


def test_serve_options_reach_the_server_config():
    defaults = serve_config(parser().parse_args(["serve"]))
    for name in ("max_streams", "keepalive_seconds", "keepalive_timeout_seconds", "max_connection_age_seconds",
                 "max_connection_age_grace_seconds", "max_connection_idle_seconds", "min_client_ping_seconds"):
        assert getattr(defaults, name) == getattr(ServerConfig(), name), name
    cfg = serve_config(parser().parse_args([
        "serve", "--max-streams", "8", "--keepalive", "30", "--keepalive-timeout", "5", "--max-connection-age", "60",
        "--max-connection-age-grace", "10", "--max-connection-idle", "0", "--min-client-ping-interval", "15",
    ]))
    assert (cfg.stream_limit, cfg.keepalive_seconds, cfg.keepalive_timeout_seconds, cfg.max_connection_age_seconds,
            cfg.max_connection_age_grace_seconds, cfg.max_connection_idle_seconds, cfg.min_client_ping_seconds) == (
        8, 30, 5, 60, 10, 0, 15)
    assert dict(connection_options(cfg))["grpc.max_connection_idle_ms"] == 2**31 - 1  # 0: never
    for bad in (["--max-connection-age", "-1"], ["--keepalive", "soon"], ["--max-streams", "-2"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["serve", *bad])
