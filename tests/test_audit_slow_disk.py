"""The audit log never stalls the event loop, through the real server and client.

The server's audit disk is made slow for real in this process (each sync sleeps 200 ms, as a
saturated or failing disk would): checks keep being answered on the loop while the log can
take them, the health service answers within milliseconds throughout (nothing blocks the
loop), disclosures past the bound are refused with UNAVAILABLE / AUDIT_UNAVAILABLE (never
answered unaudited), and once the disk is fast again every acknowledged decision is in the
log and checks are answered again without a restart.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient
from server.app import Node, Runtime, ServerConfig
from server.metrics import Metrics

MAX_PENDING = 3_000


@pytest.fixture(scope="module")
def slow_disk_server(tmp_path_factory):
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("slow-disk"), seed_citizens=600, metrics_port=0, port=0,
                       audit_flush_seconds=0.01, audit_max_pending=MAX_PENDING)
    runtime = Runtime.prepare(cfg)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    service = node.attach()
    slow = threading.Event()
    real_sync = node.audit._sync

    def sync(fd: int) -> None:
        if slow.is_set():
            time.sleep(0.2)
        real_sync(fd)

    node.audit._sync = sync
    client = QianjiangClient(f"127.0.0.1:{node.port}", timeout=5.0)
    yield runtime, node, service, client, slow
    slow.clear()
    client.close()
    node.drain(0)


def test_a_slow_audit_disk_refuses_disclosures_but_never_stalls_the_loop(slow_disk_server):
    runtime, node, service, client, slow = slow_disk_server
    tokens = [runtime.synthetic_card_token(r) for r in range(500)]
    answered: list[str] = []  # batch ids of every acknowledged batch
    refused: list[grpc.RpcError] = []
    health_ms: list[float] = []
    stop = threading.Event()

    def probe_health():
        while not stop.is_set():
            t0 = time.perf_counter()
            assert client.health() == "SERVING"
            health_ms.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)

    prober = threading.Thread(target=probe_health)
    slow.set()
    prober.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                answered.append(client.check_batch("metro_pay_later", tokens).batch_id)
            except grpc.RpcError as exc:
                refused.append(exc)
    finally:
        stop.set()
        prober.join()

    assert refused, "the bounded queue must refuse disclosures while the disk cannot keep up"
    assert {e.code() for e in refused} == {grpc.StatusCode.UNAVAILABLE}
    assert {e.reason for e in refused} == {"AUDIT_UNAVAILABLE"}
    assert answered, "what the queue could take was answered"
    # The loop never waited for the disk: each health answer came in milliseconds while every
    # audit sync took 200 ms (with the old synchronous back-pressure a call waited for them).
    assert len(health_ms) >= 20
    assert max(health_ms) < 150, f"health answered in up to {max(health_ms):.0f} ms while the disk was slow"

    slow.clear()
    deadline = time.monotonic() + 10
    while True:  # the log catches up by itself; checks are answered again, no restart
        try:
            answered.append(client.check_batch("metro_pay_later", tokens).batch_id)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.05)
    node.audit.flush()
    for batch_id in answered:  # every acknowledged decision was audited
        for i in (0, len(tokens) - 1):
            entry = node.audit.find(f"{batch_id}-{i}")
            assert entry is not None and entry.method == "EligibilityService/BatchCheck"
