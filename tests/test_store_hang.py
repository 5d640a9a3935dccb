"""A HUNG PostgreSQL, for real: every process of this test's own server is SIGSTOPped (the
socket stays open and the kernel still acknowledges, like a partition) and SIGCONTed again.

While it is frozen: checks, score reads and ListChecks answer in milliseconds (reads have
their own thread pool); a write answers UNAVAILABLE within the store's bound, not the
client's deadline, and never holds the state's lock meanwhile; health turns NOT_SERVING and
``qianjiang_store_up`` 0 within the bound even if nobody writes. After SIGCONT everything
recovers by itself and nothing acknowledged is lost. Also: the store's own bound (the
watchdog), and the freshness rule of applying a write (server/state.py)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from loadtest.attack.store_hang import freeze, thaw
from server.store import NotFound, RecordIn, StoreUnavailable, open_store

RECORDS = "qianjiang.v1.RecordsService"
SOURCE = "itest"
BOUND = 2.0  # QJ_STORE_TIMEOUT for this test: shorter than the default 3 s, same code


def _until(predicate, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_store_bounds_a_call_to_a_hung_server_and_reconnects_after(own_pg):
    where, dsn, frozen = own_pg
    with open_store(dsn) as store:
        store.timeout = 1.0
        store.upsert_citizen("c-0", 7_000)
        frozen += freeze(where)
        waited = []

        def behind():  # another thread's call waits for the connection at most the bound
            time.sleep(0.2)  # after the main thread's call took the connection
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.citizen_row("c-0")
            waited.append(time.monotonic() - t0)

        t0 = time.monotonic()
        other = threading.Thread(target=behind)
        with pytest.raises(StoreUnavailable, match="no answer within 1 s"):
            other.start()
            store.upsert_citizen("c-1", 7_000)
        took = time.monotonic() - t0
        other.join(10)
        assert 0.9 < took < 1.6, took  # psycopg alone waits until SIGCONT
        assert waited and waited[0] < 1.3, waited  # it fails with the call it waited for
        thaw(frozen)
        frozen.clear()
        assert store.upsert_citizen("c-2", 7_000) == (store.citizen_row("c-2"), True)  # a new connection
        assert store.citizen_row("c-0") == 0


def test_a_hung_store_stalls_no_read_holds_no_lock_and_recovers(own_pg, tmp_path, monkeypatch):
    from clients.client import QianjiangClient
    from qianjiang.v1.records_pb2 import Record
    from server.app import Node, Runtime, ServerConfig, citizen_id
    from server.metrics import Metrics

    where, dsn, frozen = own_pg
    monkeypatch.setenv("QJ_STORE_TIMEOUT", str(BOUND))
    registry = CollectorRegistry()
    runtime = Runtime.prepare(ServerConfig(data_dir=tmp_path, store_url=dsn, seed_citizens=1500, metrics_port=0, port=0))
    node = Node(runtime, port=0, metrics=Metrics(registry)).start()
    runtime.load()
    node.attach()
    assert node.store_watch.bound == BOUND
    target = f"127.0.0.1:{node.port}"
    qj = QianjiangClient(target, timeout=10, channel=grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]))
    s = runtime.state
    acknowledged = []

    def ingest(k: int, row: int):
        ack = qj.ingest([Record(record_id=f"hang-{k}", citizen_id=citizen_id(row), variable="volunteer_hours",
                                date=dt.date.today().isoformat(), value=10.0, source=SOURCE)])
        acknowledged.append(f"hang-{k}")
        return ack

    try:
        rows = [r for r in range(100) if s.consent[r] and s.adult[r]]
        token = runtime.synthetic_card_token(rows[0])
        decision = qj.check("metro_pay_later", token)
        assert ingest(0, rows[0])[0].status == 1
        assert qj.health(RECORDS) == "SERVING"

        frozen += freeze(where)  # the store hangs
        t_freeze = time.monotonic()
        # More writes than the node has write threads: all of them wait on the store.
        results: dict[int, tuple[str, float]] = {}

        def write(k: int) -> None:
            t0 = time.monotonic()
            try:
                ingest(k, rows[1 + k % 5])
                results[k] = ("OK", time.monotonic() - t0)
            except grpc.RpcError as err:
                results[k] = (err.code().name, time.monotonic() - t0)

        writers = [threading.Thread(target=write, args=(k,)) for k in range(1, runtime.config.threads + 5)]
        for w in writers:
            w.start()
        time.sleep(0.3)  # the writes are in, waiting on the hung store
        assert s.lock.acquire(timeout=0.1), "a write holds the state's lock across a store round trip"
        s.lock.release()
        for call in (lambda: qj.check("metro_pay_later", token, timeout=2),
                     lambda: qj.get_score(citizen_id(rows[0]), timeout=2),
                     lambda: qj.explain(citizen_id(rows[1]), timeout=2),
                     lambda: qj.list_checks(citizen_id(rows[0]), timeout=2)):
            t0 = time.monotonic()
            call()
            assert time.monotonic() - t0 < 0.3, "a read waited for the writes"
        assert qj.check("metro_pay_later", token).outcome == decision.outcome

        for w in writers:
            w.join(10)
        assert {code for code, _ in results.values()} == {"UNAVAILABLE"}, results
        slowest = max(took for _, took in results.values())
        assert slowest < BOUND + 1.0, f"writes must be refused within the bound, not the deadline: {results}"
        # health and the gauge, with nobody writing after these
        _until(lambda: qj.health(RECORDS) == "NOT_SERVING", BOUND + 1.0)
        assert registry.get_sample_value("qianjiang_store_up") == 0
        assert time.monotonic() - t_freeze < BOUND + 1.0
        assert qj.health() == "SERVING" and qj.health("qianjiang.v1.ScoreService") == "SERVING"
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            qj.revoke_consent(citizen_id(rows[0]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 0.3  # known down

        thaw(frozen)  # the store answers again
        frozen.clear()
        t_thaw = time.monotonic()
        _until(lambda: qj.health(RECORDS) == "SERVING", BOUND * 3)
        assert registry.get_sample_value("qianjiang_store_up") == 1
        assert ingest(100, rows[0])[0].status == 1
        assert time.monotonic() - t_thaw < BOUND * 3
        assert qj.revoke_consent(citizen_id(rows[0])).granted is False
        with pytest.raises(grpc.RpcError) as err:
            qj.get_score(citizen_id(rows[0]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION or "AUTHORI" in err.value.details().upper()
    finally:
        thaw(frozen)
        qj.close()
        node.drain(0)
    with open_store(dsn) as store:
        for rid in acknowledged:  # nothing acknowledged was lost
            store.get_record(SOURCE, rid)
        with pytest.raises(NotFound):  # nothing refused once the store was known down was written
            store.get_record(SOURCE, f"hang-{runtime.config.threads + 4}")


def test_an_older_snapshot_never_overwrites_a_newer_one(served):
    """Two writers of one citizen may apply in either order (two workers: the store write
    and the snapshot are outside the lock): the row keeps the newest."""
    service = served.service
    s, store = service.state, service.store
    row = next(r for r in range(2500, 2600) if s.consent[r] and s.adult[r])
    old = s.snapshot(store, row)
    store.add_records([RecordIn("fresh-1", served.citizen(row), "court_listed_dishonest_debtor",
                                s.as_of_day - 1, 1.0, "itest")], sent_by="itest")
    new = s.snapshot(store, row)
    assert new.position > old.position
    with s.lock:
        assert s.apply(new, service.scenarios, service.rows)
        score = int(s.columns.score[row])
        assert not s.apply(old, service.scenarios, service.rows)  # late and older: refused
    assert int(s.columns.score[row]) == score < 550 and s.row_position[row] == new.position
    with s.lock:
        s.advance(0)  # monotone
        assert s.set_consent(row, True, position=new.position)  # granted, as it was: a newer change
        assert not s.set_consent(row, False, position=old.position)  # an older one, late: refused
    assert s.consent[row] == 1 and s.position >= new.position
