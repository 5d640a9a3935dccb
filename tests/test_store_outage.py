"""A PostgreSQL outage, for real: the server of this test is stopped and started again
(scripts/pg_test_server.sh pause/resume) under the running service.

While it is away: checks and score reads keep being answered from memory; writes fail fast
with UNAVAILABLE and are not in the store afterwards; health says RecordsService is
NOT_SERVING while the reading services stay SERVING. When it returns the service recovers by
itself: writes are accepted again and health is SERVING, with no restart."""

from __future__ import annotations

import datetime as dt
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient
from loadtest.attack.store_hang import pg
from qianjiang.v1.records_pb2 import Record
from server.app import Node, Runtime, ServerConfig, citizen_id
from server.metrics import Metrics
from server.store import open_store

RECORDS = "qianjiang.v1.RecordsService"
SOURCE = "itest"  # the development mode's caller writes under the source it names


def _record(k: int, row: int) -> Record:
    return Record(record_id=f"outage-{k}", citizen_id=citizen_id(row), variable="volunteer_hours",
                  date=dt.date.today().isoformat(), value=10.0, source=SOURCE)


def _until(predicate, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_reads_go_on_writes_fail_fast_and_it_recovers_by_itself(own_pg, tmp_path):
    where, dsn, _ = own_pg
    registry = CollectorRegistry()
    config = ServerConfig(data_dir=tmp_path, store_url=dsn, seed_citizens=1500, metrics_port=0, port=0)
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(registry)).start()
    runtime.load()
    node.attach()
    # No client retries: the point is how fast the server answers (QianjiangClient normally
    # retries UNAVAILABLE with backoff, which is what a gateway wants).
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}", options=[("grpc.enable_retries", 0)])
    qj = QianjiangClient(f"127.0.0.1:{node.port}", timeout=10, channel=channel)
    try:
        token = runtime.synthetic_card_token(3)
        before = qj.check("metro_pay_later", token).outcome
        consenting = next(r for r in range(50) if runtime.state.consent[r] and runtime.state.adult[r])
        score = qj.get_score(citizen_id(consenting)).score
        assert qj.ingest([_record(0, consenting)])[0].status == 1  # ACCEPTED
        assert qj.health(RECORDS) == "SERVING"

        assert pg("pause", where).returncode == 0  # the outage begins

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            qj.ingest([_record(1, consenting)])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        took = []
        for k, call in enumerate((
            lambda: qj.ingest([_record(2, consenting)]),
            lambda: qj.revoke_consent(citizen_id(consenting)),
            lambda: qj.register_card(citizen_id(consenting), bytes(range(16))),
            lambda: qj.withdraw_record("outage-0", source=SOURCE),
        )):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (k, err.value.details())
            took.append(round(time.monotonic() - t0, 3))
        assert time.monotonic() - t0 < 0.5, f"writes must fail fast once the store is known to be down: {took}"
        # reads are served from memory
        assert qj.check("metro_pay_later", token).outcome == before
        assert qj.get_score(citizen_id(consenting)).score >= score
        unread = next(r for r in range(1000, 1500) if runtime.state.consent[r] and runtime.state.adult[r])
        assert qj.get_score(citizen_id(unread)).citizen_id == citizen_id(unread)  # never read before
        assert len(qj.check_batch("metro_pay_later", [token] * 100).outcomes) == 100
        assert qj.health() == "SERVING" and qj.health("qianjiang.v1.EligibilityService") == "SERVING"
        assert qj.health(RECORDS) == "NOT_SERVING"
        assert registry.get_sample_value("qianjiang_store_up") == 0

        assert pg("resume", where).returncode == 0  # the outage ends
        _until(lambda: qj.health(RECORDS) == "SERVING")
        assert registry.get_sample_value("qianjiang_store_up") == 1
        assert qj.ingest([_record(3, consenting)])[0].status == 1
        assert qj.revoke_consent(citizen_id(consenting)).granted is False
    finally:
        qj.close()
        node.drain(0)
    store = open_store(dsn)
    try:
        kept = {r for r in ("outage-0", "outage-1", "outage-2", "outage-3") if _exists(store, r)}
    finally:
        store.close()
    assert kept == {"outage-0", "outage-3"}  # nothing refused was written, everything acknowledged was


def _exists(store, record_id: str) -> bool:
    from server.store import NotFound

    try:
        store.get_record(SOURCE, record_id)
        return True
    except NotFound:
        return False
